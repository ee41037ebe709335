"""`fedge demo`: a throwaway CA, one server and N node processes on 127.0.0.1 with mutual
TLS, a live progress view from the server's Control service, and cleanup on exit or
Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.live import Live

from fedge.errors import FedgeError
from fedge.history import History
from fedge.security import init_ca, issue
from fedge.transport.grpc.control import fetch_status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(config: Path, clients: int, rounds: int, console: Console) -> History | None:
    if not config.exists():
        raise FedgeError(
            f"config {config} not found; run from the repository root or pass --config"
        )
    with tempfile.TemporaryDirectory(prefix="fedge-demo-") as tmp:
        work = Path(tmp)
        certs = work / "pki"
        init_ca(certs)
        issue(certs, "server", server=True, hosts=["127.0.0.1", "localhost"])
        issue(certs, "admin")
        for cid in range(clients):
            issue(certs, f"node-{cid}")
        address = f"127.0.0.1:{free_port()}"
        out = work / "results.json"
        fedge = [sys.executable, "-m", "fedge"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(work / "cache")}
        procs: list[subprocess.Popen[bytes]] = []
        server_log = (work / "server.log").open("wb")
        try:
            server = subprocess.Popen(
                [
                    *fedge,
                    "server",
                    "--config",
                    str(config),
                    "--address",
                    address,
                    "--certs",
                    str(certs),
                    "--state-dir",
                    str(work / "state"),
                    "--out",
                    str(out),
                    "--rounds",
                    str(rounds),
                    "--wait-for",
                    str(clients),
                ],
                env=env,
                stderr=server_log,
            )
            procs.append(server)
            for cid in range(clients):
                procs.append(
                    subprocess.Popen(
                        [
                            *fedge,
                            "node",
                            "--server",
                            address,
                            "--config",
                            str(config),
                            "--cid",
                            str(cid),
                            "--certs",
                            str(certs),
                            "--name",
                            f"node-{cid}",
                        ],
                        env=env,
                        stderr=subprocess.DEVNULL,
                    )
                )
            _watch(server, address, certs, rounds, console)
            if server.returncode != 0:
                raise FedgeError(
                    f"server exited with {server.returncode}:\n"
                    + (work / "server.log").read_text()[-2000:]
                )
            return History.from_dict(json.loads(out.read_text()))
        finally:
            server_log.close()
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.time() + 5
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _watch(
    server: subprocess.Popen[bytes], address: str, certs: Path, rounds: int, console: Console
) -> None:
    with Live(console=console, refresh_per_second=10, transient=False) as live:
        while server.poll() is None:
            try:
                s = fetch_status(address, certs, timeout=1.0)
                nodes = len(s.nodes)
                metrics = "  ".join(f"{k}={v:.4f}" for k, v in s.metrics.items())
                live.update(
                    f"[bold]round {s.round}/{rounds}[/bold]  nodes {nodes}  "
                    f"answered {s.results_received}/{s.results_expected}  {metrics}"
                )
            except grpc.RpcError:
                live.update("starting server and nodes...")
            time.sleep(0.1)
