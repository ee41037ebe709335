"""`fedge node enroll`: a device trades a one-time token and a CSR for its certificate."""

from __future__ import annotations

from pathlib import Path

import grpc

from fedge.errors import FedgeError
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc


def enroll(
    server: str, token: str, pin: str, name: str, certs: Path, *, force: bool = False
) -> Path:
    """Enroll as `name` at `server` (its enrollment listener); write ca.crt, NAME.key and
    NAME.crt under `certs` and return the certificate's path."""
    from fedge.security import enroll as device

    existing = [str(p) for p in (certs / f"{name}.key", certs / f"{name}.crt") if p.exists()]
    if existing and not force:
        raise FedgeError(
            f"{', '.join(existing)} exist already; pass --force to enroll again with a new key"
        )
    root = device.discover_root(server, pin)
    key, csr = device.make_request(name)
    with grpc.secure_channel(server, grpc.ssl_channel_credentials(root)) as channel:
        reply = pb_grpc.EnrollmentStub(channel).Enroll(
            pb.EnrollRequest(token=token.strip(), csr_pem=csr), timeout=30, wait_for_ready=False
        )
    return device.save(certs, name, key, reply.chain_pem, reply.ca_pem, pin)
