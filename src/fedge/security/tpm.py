"""The device's TPM 2.0, through Debian's tpm2-tools: what `fedge node enroll --tpm` asks of
it. The endorsement key (EK) and the attestation key (AK) are made inside the TPM and
never leave it; only their public parts, a quote and an activated secret come out.

The TPM is found through a TCTI string (`--tpm-tcti`, else $TPM2TOOLS_TCTI, else the
kernel's resource manager /dev/tpmrm0); a software TPM answers as
``swtpm:host=127.0.0.1,port=P``. TPMs hold three or so loaded objects: every command runs
on saved contexts and transient objects are flushed after it.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from fedge.errors import FedgeError

PCR_SELECTION = "sha256:0,1,2,3,4,5,6,7"
CREDENTIAL_FILE = struct.pack(">II", 0xBADCC0DE, 1)
"""Header of tpm2-tools' credential file: TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET follow."""
TIMEOUT_S = 60
EK_CERTIFICATE_INDEX = "0x01c00002"
"""Where TPMs keep the manufacturer's certificate of the RSA-2048 EK (TCG EK profile)."""


class TpmError(FedgeError):
    """The TPM (or tpm2-tools) refused or is not there; the message has its words."""


class Tpm:
    """One enrollment's session with the TPM: keys made, a credential activated, a quote."""

    def __init__(self, tcti: str = "") -> None:
        if shutil.which("tpm2_createek") is None:
            raise TpmError("tpm2-tools is not installed (Debian: apt install tpm2-tools)")
        self.tcti = tcti or os.environ.get("TPM2TOOLS_TCTI", "") or "device:/dev/tpmrm0"
        self._dir = Path(tempfile.mkdtemp(prefix="fedge-tpm-"))

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *_: object) -> None:
        self._flush()
        shutil.rmtree(self._dir, ignore_errors=True)

    def keys(self) -> tuple[bytes, bytes, bytes]:
        """(EK public, AK public, EK certificate): the publics as TPM2B_PUBLIC, the EK from
        the standard RSA-2048 template, the AK a restricted P-256 ECDSA key under it; the
        manufacturer's DER certificate of the EK, or b"" if the TPM holds none."""
        d = self._dir
        self._run("tpm2_createek", "-c", d / "ek.ctx", "-G", "rsa", "-u", d / "ek.pub")
        self._run(
            "tpm2_createak", "-C", d / "ek.ctx", "-c", d / "ak.ctx", "-G", "ecc", "-g",
            "sha256", "-s", "ecdsa", "-u", d / "ak.pub", "-n", d / "ak.name",
        )  # fmt: skip
        self._run("tpm2_nvread", EK_CERTIFICATE_INDEX, "-o", d / "ek.crt", check=False)
        certificate = (d / "ek.crt").read_bytes() if (d / "ek.crt").exists() else b""
        return (d / "ek.pub").read_bytes(), (d / "ak.pub").read_bytes(), _der(certificate)

    def activate(self, credential: bytes, encrypted_secret: bytes) -> bytes:
        """The secret of a server's credential: only this TPM's EK can unwrap it, and only
        for this AK (TPM2_ActivateCredential, authorised by the EK's policy session)."""
        d = self._dir
        (d / "credential").write_bytes(CREDENTIAL_FILE + credential + encrypted_secret)
        self._run("tpm2_startauthsession", "--policy-session", "-S", d / "session.ctx")
        try:
            self._run("tpm2_policysecret", "-S", d / "session.ctx", "-c", "e")
            self._run(
                "tpm2_activatecredential", "-c", d / "ak.ctx", "-C", d / "ek.ctx", "-i",
                d / "credential", "-o", d / "secret", "-P", f"session:{d / 'session.ctx'}",
            )  # fmt: skip
        finally:
            self._run("tpm2_flushcontext", d / "session.ctx", check=False)
        return (d / "secret").read_bytes()

    def quote(self, nonce: bytes) -> tuple[bytes, bytes, list[bytes]]:
        """(TPMS_ATTEST, TPMT_SIGNATURE, PCR values) of a quote of PCRs 0–7 over `nonce`."""
        d = self._dir
        self._run(
            "tpm2_quote", "-c", d / "ak.ctx", "-l", PCR_SELECTION, "-q", nonce.hex(), "-g",
            "sha256", "-m", d / "quote", "-s", d / "signature", "-o", d / "pcrs", "-F", "values",
        )  # fmt: skip
        pcrs = (d / "pcrs").read_bytes()
        values = [pcrs[i : i + 32] for i in range(0, len(pcrs), 32)]
        return (d / "quote").read_bytes(), (d / "signature").read_bytes(), values

    def _run(self, *args: object, check: bool = True) -> None:
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        try:
            done = subprocess.run(
                [str(a) for a in args], env=env, capture_output=True, text=True, timeout=TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TpmError(f"{args[0]}: {exc} (TPM at {self.tcti})") from None
        if args[0] != "tpm2_flushcontext":
            self._flush()
        if check and done.returncode != 0:
            words = " ".join(done.stderr.split())[-400:]
            raise TpmError(f"{args[0]} failed (TPM at {self.tcti}): {words}")

    def _flush(self) -> None:
        self._run("tpm2_flushcontext", "-t", check=False)


def _der(certificate: bytes) -> bytes:
    """The DER certificate alone: NV indexes are often larger than what they hold, and
    the rest is padding (the DER header says how long the certificate is)."""
    if len(certificate) < 4 or certificate[0] != 0x30 or certificate[1] != 0x82:
        return certificate
    return certificate[: 4 + int.from_bytes(certificate[2:4], "big")]
