"""Connections that never finish their TLS handshake are closed, so idle sockets cannot
take every file descriptor and lock real nodes out; the server raises its own open-file
limit at start."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time

import pytest

from fedge.launch import Launcher, free_port, wait_for


@pytest.mark.parametrize("listener", ["fleet", "enrollment"])
def test_idle_connections_without_a_handshake_are_closed(fleet: Launcher, listener: str) -> None:
    enroll_address = f"127.0.0.1:{free_port()}"
    fleet.server("--wait-for", "4", "--enroll-address", enroll_address)
    wait_for(fleet.status, "the server")
    address = fleet.address if listener == "fleet" else enroll_address
    host, port = address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(300)]
    try:
        assert fleet.status() is not None  # a real client still gets through
        deadline = time.monotonic() + 30
        closed = 0
        for sock in idle:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                closed += sock.recv(1) == b""
            except (ConnectionResetError, TimeoutError):
                closed += 0 if time.monotonic() >= deadline else 1
        assert closed == len(idle), f"{len(idle) - closed} idle connections still open"
    finally:
        for sock in idle:
            sock.close()
    assert fleet.status() is not None


def test_the_server_raises_its_open_file_limit() -> None:
    code = (
        "import resource; from fedge.transport.grpc.server import raise_fd_limit;"
        "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=lower, check=True
    )
    limit, soft = map(int, done.stdout.split())
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert limit == soft == expected
