"""The enrollment listener: its own grpc.aio server, TLS without client certificates (a
device has none yet), serving only `Enrollment`. Small messages, few calls at once."""

from __future__ import annotations

import grpc

from fedge.errors import FedgeError
from fedge.fleet.enrollment import Attestation, Enrollment
from fedge.messages import FleetError
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.security.pki import MAX_REQUEST_BYTES
from fedge.transport.grpc.servicer import abort
from fedge.transport.grpc.tls import ReloadingCredentials

MAX_CONNECTIONS = 1024
"""Connections the listener keeps at once: anyone may connect to it, so it gets a share of
the file descriptors, not all of them (the fleet listener is capped below the rest)."""
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES + 4096),  # + a TPM attestation
    ("grpc.max_concurrent_streams", 16),
    ("grpc.server_handshake_timeout_ms", 10_000),
    ("grpc.max_connection_idle_ms", 30_000),  # a device enrolls once, then goes away
    ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
]
MAX_CONCURRENT_CALLS = 64
"""Enrollments in progress at once; more wait in their clients' retries (RESOURCE_EXHAUSTED)."""


class EnrollmentServicer(pb_grpc.EnrollmentServicer):
    def __init__(self, enrollment: Enrollment) -> None:
        self.enrollment = enrollment

    async def Enroll(
        self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnrollReply:
        attestation = None
        if request.HasField("attestation"):
            sent = request.attestation
            attestation = Attestation(
                sent.secret, sent.quote, sent.signature, tuple(sent.pcr_values)
            )
        try:
            enrolled = await self.enrollment.enroll(request.token, request.csr_pem, attestation)
        except FleetError as exc:
            await abort(context, exc)
        return pb.EnrollReply(chain_pem=enrolled.chain_pem, ca_pem=enrolled.ca_pem)

    async def Challenge(
        self, request: pb.ChallengeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChallengeReply:
        try:
            credential, encrypted, nonce = await self.enrollment.challenge(
                request.token, request.ek_public, request.ak_public, request.ek_certificate
            )
        except FleetError as exc:
            await abort(context, exc)
        return pb.ChallengeReply(credential=credential, encrypted_secret=encrypted, nonce=nonce)


async def start_listener(
    address: str, tls: ReloadingCredentials, enrollment: Enrollment
) -> grpc.aio.Server:
    server = grpc.aio.server(options=OPTIONS, maximum_concurrent_rpcs=MAX_CONCURRENT_CALLS)
    pb_grpc.add_EnrollmentServicer_to_server(EnrollmentServicer(enrollment), server)
    if not server.add_secure_port(address, tls.credentials()):
        raise FedgeError(f"cannot listen for enrollment on {address}")
    await server.start()
    return server
