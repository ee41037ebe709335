"""Cost of a Prometheus scrape of the server's /metrics, by fleet size.

The server is the real thing in this process — `RunService`, `Aggregator` (its
`FleetService`, sessions and events) for the digits app, and `FleetMetrics` served over
HTTP by prometheus-client — but its nodes are not processes: each is joined through
`FleetService.join` (what a transport calls, with its SQLite binding) and opens its task
stream through `FleetService.tasks`, on the server's event loop, so the session registry
holds N streaming sessions. A tenth of them are made silent (not heard from within the
liveness window). Rounds' events are emitted as the coordinator would. Then /metrics is
scraped over HTTP on 127.0.0.1 with one kept-alive connection: wall time per scrape (the
client and the exporter's thread share this process), CPU of the exposition alone
(`generate_latest`), and the size of the reply.

Run: python benchmarks/metrics_bench.py [--nodes 0,1000,10000] [--scrapes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import ROOT, report
from prometheus_client import generate_latest

from fedge.app import load_app
from fedge.config import load_config
from fedge.coordinator import NO_RESULT
from fedge.fleet.runs import RunService
from fedge.fleet.server import Aggregator, ServerSettings
from fedge.history import RoundRecord
from fedge.messages import PROTOCOL, Capabilities
from fedge.observe.exposition import new_registry, serve_metrics
from fedge.observe.fleet import FleetMetrics

TARGET_MS = 10.0


def fleet(nodes: int, work: Path) -> tuple[Aggregator, asyncio.AbstractEventLoop, list[Any]]:
    """A real aggregator whose session registry holds `nodes` streaming sessions."""
    config = load_config(ROOT / "examples" / "digits" / "fedge.toml")
    config.run.num_clients = max(nodes, 1)
    runs = RunService.open(work / "state", config)
    app = load_app(config.app.target, config.base_dir, num_clients=1, seed=0, **config.app.options)
    aggregator = Aggregator(app, runs, ServerSettings(work / "state"))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    service = aggregator.service

    async def join_all() -> list[Any]:
        streams = []
        for cid in range(nodes):
            address = f"10.0.{cid >> 8}.{cid & 255}:1"
            joined = await service.join(f"node-{cid}", cid, address, Capabilities(), PROTOCOL)
            stream = service.tasks(f"node-{cid}", joined.token)
            streams.append(asyncio.ensure_future(anext(stream)))  # waits on its queue
        await asyncio.sleep(0.1)
        silent = list(service.sessions.by_node.values())[: nodes // 10]
        for session in silent:
            session.last_seen -= 3600
        return streams

    streams = asyncio.run_coroutine_threadsafe(join_all(), loop).result()
    aggregator.state = "running"
    for round_ in range(1, 21):  # twenty rounds' worth of events, as the coordinator sends
        late = range(90, min(nodes, 100))
        record = RoundRecord(
            round_, selected=list(range(min(nodes, 100))), participants=list(range(min(nodes, 90))),
            failures=dict.fromkeys(late, NO_RESULT), wall_time=12.0,
        )  # fmt: skip
        aggregator.events.emit("round.finished", record=record)
        aggregator.events.emit("checkpoint.written", round=round_, seconds=0.004, size=80_000)
    return aggregator, loop, streams


def measure(nodes: int, scrapes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        aggregator, loop, streams = fleet(nodes, Path(tmp))
        setup = time.perf_counter() - started
        registry = new_registry("server")
        FleetMetrics(aggregator, registry)
        server = serve_metrics(registry, 0)
        port = server.server_port
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        walls, size = [], 0
        for i in range(scrapes + 5):
            t0 = time.perf_counter()
            connection.request("GET", "/metrics")
            reply = connection.getresponse()
            body = reply.read()
            wall = time.perf_counter() - t0
            assert reply.status == 200, reply.status
            if i >= 5:  # warm-up
                walls.append(wall)
            size = len(body)
        cpu = []
        for _ in range(scrapes):
            t0 = time.thread_time()
            generate_latest(registry)
            cpu.append(time.thread_time() - t0)
        connection.close()
        server.shutdown()
        text = body.decode()
        assert f'fedge_server_nodes{{state="connected"}} {float(nodes - nodes // 10)}' in text
        assert f'fedge_server_nodes{{state="silent"}} {float(nodes // 10)}' in text
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))

        async def close() -> None:  # every task stream ends, as when the server stops
            aggregator.service.stop()
            await asyncio.gather(*streams, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        aggregator.runs.store.close()
    walls.sort()
    return {
        "nodes": nodes,
        "series": series,
        "reply KiB": round(size / 1024, 1),
        "scrape p50 ms": round(statistics.median(walls) * 1e3, 2),
        "scrape p95 ms": round(walls[int(0.95 * (len(walls) - 1))] * 1e3, 2),
        "exposition CPU ms": round(statistics.median(cpu) * 1e3, 2),
        "target ms": TARGET_MS,
        "setup s": round(setup, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="0,1000,10000")
    parser.add_argument("--scrapes", type=int, default=200)
    args = parser.parse_args()
    rows = [measure(int(n), args.scrapes) for n in args.nodes.split(",")]
    report(
        "metrics",
        "Server /metrics scrape cost by fleet size (sessions in the real session registry)",
        rows,
        scrapes=args.scrapes,
    )


if __name__ == "__main__":
    main()
