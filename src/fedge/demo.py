"""`fedge demo`: a throwaway CA, one server and N node processes on 127.0.0.1 with mutual
TLS, a live progress view from the server's Control service, and cleanup on exit or
Ctrl-C."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedge.errors import FedgeError
from fedge.launch import Launcher

if TYPE_CHECKING:
    from rich.console import Console

    from fedge.history import History


def run_demo(
    config: Path, clients: int, rounds: int, console: Console, transport: str = "grpc"
) -> History:
    if not config.exists():
        raise FedgeError(
            f"config {config} not found; run from the repository root or pass --config"
        )
    with (
        tempfile.TemporaryDirectory(prefix="fedge-demo-") as tmp,
        Launcher(Path(tmp), config.resolve(), transport=transport) as fleet,
    ):
        out = Path(tmp) / "results.json"
        # the server first: the processes start while this one still makes certificates
        server = fleet.server("--out", out, "--rounds", str(rounds), "--wait-for", str(clients))
        for cid in range(clients):
            fleet.node(cid)
        from rich.live import Live

        from fedge.history import History

        with Live(console=console, refresh_per_second=10, transient=False) as live:
            while server.poll() is None:
                s = fleet.status(timeout=1.0)
                if s is None:
                    live.update("starting server and nodes...")
                else:
                    metrics = "  ".join(f"{k}={v:.4f}" for k, v in s.metrics.items())
                    live.update(
                        f"[bold]round {s.round}/{rounds}[/bold]  nodes {len(s.nodes)}  "
                        f"answered {s.results_received}/{s.results_expected}  {metrics}"
                    )
                time.sleep(0.1)
        if server.returncode != 0:
            raise FedgeError(
                f"server exited with {server.returncode}:\n{fleet.log('server', 2000)}"
            )
        return History.from_dict(json.loads(out.read_text()))
