"""`fedge server --health-address`: grpc.health.v1 in plaintext for probes that speak no
TLS (the kubelet's), beside the mutual-TLS port, which still refuses such a client."""

from __future__ import annotations

import grpc
import pytest
from conftest import cli, finished
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedge.launch import Launcher, free_port, wait_for
from fedge.transport.grpc.server import HEALTH_STREAMS

pytestmark = pytest.mark.integration


def _check(address: str, service: str = "") -> health_pb2.HealthCheckResponse | None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
        except grpc.RpcError:
            return None


def test_health_port_answers_in_plaintext_beside_mtls(fleet: Launcher) -> None:
    health = f"127.0.0.1:{free_port()}"
    server = fleet.server("--health-address", health, "--wait-for", "2")
    reply = wait_for(lambda: _check(health), "the health port to answer", timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # only the health service is there: the fleet's services are not
    with grpc.insecure_channel(health) as channel:
        stop = channel.unary_unary("/fedge.v1.Control/Stop")
        with pytest.raises(grpc.RpcError) as refused:
            stop(b"", timeout=2.0)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # a request is a service name: a big one is refused before the servicer sees it
        check = health_pb2_grpc.HealthStub(channel).Check
        with pytest.raises(grpc.RpcError) as big:
            check(health_pb2.HealthCheckRequest(service="x" * 65536), timeout=2.0)
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # one connection holds at most HEALTH_STREAMS streams: Watch calls held open
        # leave a further call waiting, not served
        watches = [
            health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            for _ in range(HEALTH_STREAMS)
        ]
        assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
        with pytest.raises(grpc.RpcError) as held:
            check(health_pb2.HealthCheckRequest(), timeout=1.0)
        assert held.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for watch in watches:
            watch.cancel()
    # the mutual-TLS port does not answer a plaintext client
    assert _check(fleet.address) is None
    done = cli(fleet, "stop", "--server", fleet.address, "--certs", fleet.certs)
    assert done.returncode == 0, done.stderr
    finished(server, fleet)
    assert _check(health) is None  # closed with the server


def test_health_address_that_cannot_listen_is_an_error(fleet: Launcher) -> None:
    server = fleet.server("--health-address", "256.0.0.1:1")
    assert server.wait(timeout=60) == 1
    assert "cannot listen on --health-address 256.0.0.1:1" in fleet.log("server")
