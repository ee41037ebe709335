"""`fedge node enroll`: a device trades a one-time token and a CSR for its certificate."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc

from fedge.errors import FedgeError
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc


def enroll(
    server: str,
    token: str,
    pin: str,
    name: str,
    certs: Path,
    *,
    force: bool = False,
    tpm: str | None = None,
) -> Path:
    """Enroll as `name` at `server` (its enrollment listener); write ca.crt, NAME.key and
    NAME.crt under `certs` and return the certificate's path. With `tpm` (a TCTI; "" for
    the default), the device's TPM attests it first (`fedge.security.tpm`)."""
    from fedge.security import enroll as device

    existing = [str(p) for p in (certs / f"{name}.key", certs / f"{name}.crt") if p.exists()]
    if existing and not force:
        raise FedgeError(
            f"{', '.join(existing)} exist already; pass --force to enroll again with a new key"
        )
    root = device.discover_root(server, pin)
    key, csr = device.make_request(name)
    token = token.strip()
    with grpc.secure_channel(server, grpc.ssl_channel_credentials(root)) as channel:
        stub = pb_grpc.EnrollmentStub(channel)
        request = pb.EnrollRequest(token=token, csr_pem=csr)
        if tpm is not None:
            request.attestation.CopyFrom(_attest(stub, token, csr, tpm))
        reply = stub.Enroll(request, timeout=30, wait_for_ready=False)
    return device.save(certs, name, key, reply.chain_pem, reply.ca_pem, pin)


def _attest(stub: pb_grpc.EnrollmentStub, token: str, csr: bytes, tcti: str) -> pb.TpmAttestation:
    """Step one with the server, then the TPM's answer: the activated credential, and a
    quote of the boot PCRs over the server's nonce and this CSR."""
    from fedge.security.tpm import Tpm

    with Tpm(tcti) as tpm:
        ek_public, ak_public, ek_certificate = tpm.keys()
        challenge = stub.Challenge(
            pb.ChallengeRequest(
                token=token, ek_public=ek_public, ak_public=ak_public, ek_certificate=ek_certificate
            ),
            timeout=30,
        )
        secret = tpm.activate(challenge.credential, challenge.encrypted_secret)
        quote, signature, pcrs = tpm.quote(hashlib.sha256(challenge.nonce + csr).digest())
    return pb.TpmAttestation(secret=secret, quote=quote, signature=signature, pcr_values=pcrs)
