"""Enrollment with a TPM against a real server and a software TPM 2.0 (swtpm): a device
proves its TPM (credential activation with its endorsement key) and its boot state (a
quote of PCRs 0-7 checked against the server's allow-list). Refused, with nothing issued:
no attestation, a boot state not on the list, a replayed quote, a credential the device's
TPM did not activate, an attestation key made outside a TPM."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import cli
from cryptography.hazmat.primitives.asymmetric import ec
from test_enrollment import token_states

from fedge.launch import Launcher, free_port, wait_for
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.security import ca_pin
from fedge.security import enroll as device
from fedge.security.tpm import Tpm

pytestmark = pytest.mark.integration


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[str]:
    """A software TPM 2.0 on 127.0.0.1 with no EK certificate; yields its TCTI."""
    with running_swtpm(tmp_path / "swtpm") as tcti:
        yield tcti


@pytest.fixture
def certified_swtpm(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A software TPM "manufactured" with an EK certificate from a local CA (swtpm_setup,
    as a TPM vendor does); yields its TCTI and the CA that issued the certificate."""
    ca, state = tmp_path / "vendor-ca", tmp_path / "certified"
    ca.mkdir()
    state.mkdir()
    (tmp_path / "localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    (tmp_path / "setup.conf").write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {tmp_path}/localca.conf\n"
        "create_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n"
    )
    subprocess.run(
        ["swtpm_setup", "--tpm2", "--tpmstate", state, "--create-ek-cert",
         "--config", tmp_path / "setup.conf"],
        check=True, capture_output=True,
    )  # fmt: skip
    with running_swtpm(state) as tcti:
        yield tcti, ca / "issuercert.pem"


@contextlib.contextmanager
def running_swtpm(state: Path) -> Iterator[str]:
    assert shutil.which("swtpm"), "swtpm is missing: scripts/system-deps.sh installs it"
    state.mkdir(exist_ok=True)
    port = control_pair()
    ctrl = port + 1  # where the swtpm TCTI looks for it
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
         "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
         "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
         "--flags", "not-need-init,startup-clear"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "swtpm did not start"
                time.sleep(0.05)
        yield f"swtpm:host=127.0.0.1,port={port}"
    finally:
        proc.terminate()
        proc.wait(10)


def control_pair() -> int:
    """A free port whose successor is free too."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def pcrs(tcti: str, work: Path) -> list[bytes]:
    out = work / "pcrs.bin"
    subprocess.run(["tpm2_pcrread", "sha256:0,1,2,3,4,5,6,7", "-o", out, "-T", tcti], check=True)
    values = out.read_bytes()
    return [values[i : i + 32] for i in range(0, 256, 32)]


def extend_pcr7(tcti: str) -> None:
    """What booting with another Secure Boot policy does to PCR 7."""
    digest = hashlib.sha256(b"another bootloader").hexdigest()
    subprocess.run(["tpm2_pcrextend", f"7:sha256={digest}", "-T", tcti], check=True)


@pytest.fixture
def attesting(fleet: Launcher, swtpm: str) -> tuple[Launcher, str, str]:
    """A server that enrolls only devices in the swtpm's present boot state."""
    policy = fleet.work / "pcrs.json"
    policy.write_text(
        json.dumps({str(i): [v.hex()] for i, v in enumerate(pcrs(swtpm, fleet.work))})
    )
    address = f"127.0.0.1:{free_port()}"
    fleet.server("--wait-for", "4", "--enroll-address", address, "--tpm-policy", policy)
    wait_for(fleet.status, "the server's Control service")
    return fleet, address, swtpm


def tokens(fleet: Launcher, count: int) -> list[str]:
    done = cli(
        fleet, "tokens", "create", "--server", fleet.address, "--certs", fleet.certs,
        "--prefix", "dev-", "--count", str(count),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def enroll(fleet: Launcher, address: str, token: str, name: str, *tpm: str) -> str:
    done = cli(
        fleet, "node", "enroll", "--server", address, "--token", token, "--ca-pin",
        ca_pin(fleet.certs), "--name", name, "--certs", fleet.work / name, *tpm,
    )  # fmt: skip
    return "ok" if done.returncode == 0 else done.stderr


def shown(fleet: Launcher, name: str) -> str:
    done = cli(fleet, "nodes", "show", name, "--server", fleet.address, "--certs", fleet.certs)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_device_in_a_known_boot_state_enrolls_and_others_do_not(
    attesting: tuple[Launcher, str, str],
) -> None:
    fleet, address, tcti = attesting
    first, second, third = tokens(fleet, 3)
    assert enroll(fleet, address, first, "dev-a", "--tpm", "--tpm-tcti", tcti) == "ok"
    assert "tpm.ek=" in shown(fleet, "dev-a")

    refused = enroll(fleet, address, second, "dev-b")  # no attestation
    assert "enrolls only devices that attest their TPM" in refused
    assert not (fleet.work / "dev-b" / "dev-b.crt").exists()

    extend_pcr7(tcti)  # the device booted into another state
    refused = enroll(fleet, address, second, "dev-b", "--tpm", "--tpm-tcti", tcti)
    assert "PCR 7 is" in refused and "not a known-good value" in refused, refused
    assert not (fleet.work / "dev-b" / "dev-b.crt").exists()
    assert token_states(fleet)[second.split(".")[0]] == ("unused", "")  # nothing issued

    refused = enroll(fleet, address, third, "dev-c", "--tpm", "--tpm-tcti", "swtpm:port=1")
    assert "tpm2_createek failed (TPM at swtpm:port=1)" in refused  # no TPM there


def test_forged_attestations_are_refused(attesting: tuple[Launcher, str, str]) -> None:
    fleet, address, tcti = attesting
    (token,) = tokens(fleet, 1)
    root = device.discover_root(address, ca_pin(fleet.certs))
    _, csr = device.make_request("dev-x")
    with (
        grpc.secure_channel(address, grpc.ssl_channel_credentials(root)) as channel,
        Tpm(tcti) as tpm,
    ):
        stub = pb_grpc.EnrollmentStub(channel)

        def refused(request: pb.EnrollRequest | pb.ChallengeRequest) -> tuple[grpc.StatusCode, str]:
            call = stub.Enroll if isinstance(request, pb.EnrollRequest) else stub.Challenge
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=30)
            return info.value.code(), info.value.details()

        ek_public, ak_public, _ = tpm.keys()
        challenge = pb.ChallengeRequest(token=token, ek_public=ek_public, ak_public=ak_public)
        # an attestation with no challenge asked
        code, message = refused(
            pb.EnrollRequest(token=token, csr_pem=csr, attestation=pb.TpmAttestation())
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "ask Challenge first" in message

        # an attestation key made in software: its attributes cannot claim a TPM, and a
        # forged public area that does claim one cannot activate the credential
        software = software_ak()
        code, message = refused(
            pb.ChallengeRequest(token=token, ek_public=ek_public, ak_public=software)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "attributes" in message
        forged = software_ak(attributes=0x00050072)
        reply = stub.Challenge(
            pb.ChallengeRequest(token=token, ek_public=ek_public, ak_public=forged), timeout=30
        )
        with pytest.raises(Exception, match="tpm2_activatecredential failed"):
            tpm.activate(reply.credential, reply.encrypted_secret)  # the TPM has no such AK
        code, message = refused(
            pb.EnrollRequest(
                token=token, csr_pem=csr, attestation=pb.TpmAttestation(secret=b"\0" * 32)
            )
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "wrong secret" in message

        # a real quote, replayed: made over another nonce
        reply = stub.Challenge(challenge, timeout=30)
        secret = tpm.activate(reply.credential, reply.encrypted_secret)
        quote, signature, values = tpm.quote(hashlib.sha256(b"an old nonce" + csr).digest())
        code, message = refused(
            pb.EnrollRequest(
                token=token, csr_pem=csr,
                attestation=pb.TpmAttestation(
                    secret=secret, quote=quote, signature=signature, pcr_values=values
                ),
            )
        )  # fmt: skip
        assert code == grpc.StatusCode.PERMISSION_DENIED and "nonce" in message

        # PCR values that do not match what the TPM quoted
        reply = stub.Challenge(challenge, timeout=30)
        secret = tpm.activate(reply.credential, reply.encrypted_secret)
        quote, signature, values = tpm.quote(hashlib.sha256(reply.nonce + csr).digest())
        lied = [b"\x01" * 32, *values[1:]]
        code, message = refused(
            pb.EnrollRequest(
                token=token, csr_pem=csr,
                attestation=pb.TpmAttestation(
                    secret=secret, quote=quote, signature=signature, pcr_values=lied
                ),
            )
        )  # fmt: skip
        assert code == grpc.StatusCode.PERMISSION_DENIED and "do not match" in message

        # and the honest answer to a fresh challenge enrolls, with the unused token
        reply = stub.Challenge(challenge, timeout=30)
        secret = tpm.activate(reply.credential, reply.encrypted_secret)
        quote, signature, values = tpm.quote(hashlib.sha256(reply.nonce + csr).digest())
        enrolled = stub.Enroll(
            pb.EnrollRequest(
                token=token, csr_pem=csr,
                attestation=pb.TpmAttestation(
                    secret=secret, quote=quote, signature=signature, pcr_values=values
                ),
            ),
            timeout=30,
        )  # fmt: skip
        assert b"BEGIN CERTIFICATE" in enrolled.chain_pem


def software_ak(attributes: int = 0x00040072) -> bytes:
    """TPM2B_PUBLIC of a P-256 signing key made in software (sign, not restricted)."""
    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    area = (
        (0x0023).to_bytes(2, "big") + (0x000B).to_bytes(2, "big")
        + attributes.to_bytes(4, "big") + (0).to_bytes(2, "big")  # no policy
        + (0x0010).to_bytes(2, "big")  # no symmetric
        + (0x0018).to_bytes(2, "big") + (0x000B).to_bytes(2, "big")  # ECDSA/SHA-256
        + (0x0003).to_bytes(2, "big") + (0x0010).to_bytes(2, "big")  # P-256, no KDF
        + (32).to_bytes(2, "big") + numbers.x.to_bytes(32, "big")
        + (32).to_bytes(2, "big") + numbers.y.to_bytes(32, "big")
    )  # fmt: skip
    return len(area).to_bytes(2, "big") + area


def test_with_manufacturer_cas_only_tpms_with_their_ek_certificate_enroll(
    fleet: Launcher, swtpm: str, certified_swtpm: tuple[str, Path]
) -> None:
    certified, vendor_ca = certified_swtpm
    policy = fleet.work / "pcrs.json"
    policy.write_text(
        json.dumps({str(i): [v.hex()] for i, v in enumerate(pcrs(certified, fleet.work))})
    )
    address = f"127.0.0.1:{free_port()}"
    fleet.server(
        "--wait-for", "4", "--enroll-address", address, "--tpm-policy", policy,
        "--tpm-ek-ca", vendor_ca,
    )  # fmt: skip
    wait_for(fleet.status, "the server's Control service")
    first, second = tokens(fleet, 2)
    # a software TPM without the vendor's certificate (the same boot state): refused
    refused = enroll(fleet, address, first, "dev-soft", "--tpm", "--tpm-tcti", swtpm)
    assert "no endorsement key certificate" in refused, refused
    assert enroll(fleet, address, first, "dev-chip", "--tpm", "--tpm-tcti", certified) == "ok"
    assert token_states(fleet)[second.split(".")[0]] == ("unused", "")
