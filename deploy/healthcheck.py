"""The containers' HEALTHCHECK: asks what the running `fedge` command (PID 1) serves.

- `fedge server --health-address HOST:PORT`: grpc.health.v1 there must say SERVING;
- `fedge serve [--port P]`: GET /v2/health/live on P (default 8080) must answer 200;
- `fedge node --serve HOST:PORT`: the same on that port;
- anything else has no port to ask: healthy while it runs (a node that cannot go on
  exits, and the restart policy starts it again).

Exit 0 healthy, 1 not, with one line saying why.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

TIMEOUT = 5.0


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _local(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("", "0.0.0.0", "[::]", "::") else address


def _grpc(address: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest()
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return "" if status == "SERVING" else f"grpc health at {address}: {status}"


def _http(address: str) -> str:
    url = f"http://{address}/v2/health/live"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
        return "" if reply.status == 200 else f"{url}: HTTP {reply.status}"


def check(args: list[str]) -> str:
    """Why the command in `args` is unhealthy, or '' when it is healthy."""
    words = [a for a in args if not a.startswith("-")]
    command = next((w for w in words if w in ("server", "serve", "node")), "")
    if command == "server" and (address := _option(args, "--health-address")):
        return _grpc(_local(address))
    if command == "serve":
        return _http(f"127.0.0.1:{_option(args, '--port') or 8080}")
    if command == "node" and (address := _option(args, "--serve")):
        return _http(_local(address))
    return ""


def main() -> int:
    args = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    try:
        why = check([a.decode() for a in args if a])
    except Exception as exc:  # refused, timed out, bad reply: all mean unhealthy
        why = f"{type(exc).__name__}: {exc}"
    print(why or "healthy")
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
