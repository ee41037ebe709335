"""Dashboard with 1,000 nodes: first paint in Chromium while a real fleet trains.

A real `fedge server --dashboard` (mutual TLS, HTTPS dashboard) and N real connections:
the scale benchmark's load generator (`scale_bench.loadgen`: every node its own
certificate and channel, speaking the protocol as `fedge node` does, training a
1,000-parameter model). With every node live and rounds going, Debian's Chromium
(Playwright) loads the page afresh several times; reported: first-contentful-paint (the
Performance API), the time until all N node rows are drawn (the page's own
``fedge-nodes-rendered`` mark), the page's first data (the size of ``/api/snapshot`` and
how long the server takes to answer it), and the server's CPU with no page open and with
four open (each window a few seconds, while training goes on: other load on the
machine shows in it).

Usage: python benchmarks/dashboard_bench.py [--nodes 1000] [--loads 5] [--params 1000 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, sync_playwright

from fedge.launch import Launcher, free_port, wait_for
from fedge.observe.dashboard import COOKIE, Access
from fedge.security import issue

sys.path.insert(0, str(Path(__file__).parent))
from common import report
from scale_bench import APP as SCALE_APP
from scale_bench import LOADGEN_PROCESSES, PARAMS, cpu_seconds, loadgen

CHROMIUM = "/usr/bin/chromium"


def app_source(params: int) -> str:
    """The scale benchmark's app with a model of `params` float32s: by default 1,000, so
    rounds keep going while the page loads without 400 MB of uploads a round (the scale
    benchmark's 100k) taking both of the machine's cores."""
    return SCALE_APP.replace(f"np.zeros({PARAMS}", f"np.zeros({params}")


CPU_WINDOW = 5.0


def _page_load(browser: Browser, url: str, cookie: str, nodes: int) -> dict[str, float]:
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    context.add_cookies([{"name": COOKIE, "value": cookie, "url": url}])
    try:
        page = context.new_page()
        page.goto(url)
        rows = page.locator("#node-rows tr")
        wait_for(lambda: rows.count() >= nodes, f"{nodes} node rows", timeout=60, interval=0.02)
        timing: dict[str, float] = page.evaluate(
            """() => ({
                fcp: performance.getEntriesByName('first-contentful-paint')[0].startTime,
                nodes: performance.getEntriesByName('fedge-nodes-rendered')[0].startTime,
                dcl: performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd,
                ttfb: performance.getEntriesByType('navigation')[0].responseStart,
                connect: performance.getEntriesByType('navigation')[0].connectStart,
                request: performance.getEntriesByType('navigation')[0].requestStart,
            })"""
        )
        return timing
    finally:
        context.close()


def _cpu_window(pid: int, seconds: float) -> float:
    """The server's CPU, in cores, over `seconds`."""
    before, start = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.perf_counter() - start)


def run(nodes: int, loads: int, work: Path, params: int) -> dict[str, Any]:
    (work / "app.py").write_text(app_source(params))
    config = work / "fedge.toml"
    config.write_text(
        f'[app]\ntarget = "app:create_app"\n[run]\nnum_clients = {nodes}\n'
        "rounds = 1000\nround_timeout = 300.0\n"
    )
    with Launcher(work / f"fleet-{nodes}-{params}", config) as fleet:
        certs = fleet.issue()
        for cid in range(nodes):
            issue(certs, f"node-{cid}", force=True)
        port = free_port()
        server = fleet.server("--wait-for", str(nodes), "--dashboard", f"127.0.0.1:{port}")
        url = f"https://127.0.0.1:{port}/"
        chunks = [list(range(nodes))[i::LOADGEN_PROCESSES] for i in range(LOADGEN_PROCESSES)]
        spawn = multiprocessing.get_context("spawn")
        generators = [spawn.Process(target=loadgen, args=(fleet.address, certs, c)) for c in chunks]
        for g in generators:
            g.start()
        try:
            status = wait_for(
                lambda: s if (s := fleet.status(10)) is not None and s.round >= 2 else None,
                "every node to join and round 1 to finish",
                timeout=600,
                interval=0.5,
            )
            token = (fleet.state_dir / "dashboard.token").read_text().strip()
            tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))
            sizes, answers = [], []
            for _ in range(3):
                start = time.perf_counter()
                reply = httpx.get(
                    url + "api/snapshot", verify=tls, timeout=30,
                    headers={"authorization": f"Bearer {token}"},
                )  # fmt: skip
                answers.append(time.perf_counter() - start)
                sizes.append(len(reply.content))
                assert len(reply.json()["nodes"]) == nodes, "not every node is listed"
            cookie = Access(token).cookie()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM)
                try:
                    timings = [_page_load(browser, url, cookie, nodes) for _ in range(loads)]
                    idle = _cpu_window(server.pid, CPU_WINDOW)
                    contexts = [browser.new_context(ignore_https_errors=True) for _ in range(4)]
                    for context in contexts:
                        context.add_cookies([{"name": COOKIE, "value": cookie, "url": url}])
                        context.new_page().goto(url)
                    time.sleep(2.0)  # the pages are loaded and following
                    watched = _cpu_window(server.pid, CPU_WINDOW)
                    for context in contexts:
                        context.close()
                finally:
                    browser.close()
            rounds_done = wait_for(lambda: fleet.status(10), "the status").round - status.round
        finally:
            for g in generators:
                g.terminate()
                g.join()
    fcp = [t["fcp"] for t in timings]
    print("page loads (ms):", [{k: round(v) for k, v in t.items()} for t in timings])
    drawn = [t["nodes"] for t in timings]
    return {
        "nodes": nodes,
        "params": params,
        "live": sum(n.live for n in status.nodes),
        "loads": loads,
        "fcp_ms_median": statistics.median(fcp),
        "fcp_ms_max": max(fcp),
        "first_byte_ms_median": statistics.median(t["ttfb"] for t in timings),
        "rows_drawn_ms_median": statistics.median(drawn),
        "rows_drawn_ms_max": max(drawn),
        "snapshot_kb": statistics.median(sizes) / 1024,
        "snapshot_ms_median": statistics.median(answers) * 1e3,
        "server_cpu_no_page": idle,
        "server_cpu_4_pages": watched,
        "rounds_while_measured": rounds_done,
    }


def refresh_cost(nodes: int, work: Path, rounds: int = 20) -> dict[str, Any]:
    """The feed's refresh against a real `Aggregator` whose session registry and state
    database are filled directly (N sessions with open task streams, `rounds` rounds of
    N participants): its wall time, and the longest the event loop was held (a probe
    task that wakes every millisecond measures it) — what the round engine could wait."""
    from fedge.app import load_app
    from fedge.config import load_config
    from fedge.fleet.runs import RunService
    from fedge.fleet.server import Aggregator, ServerSettings
    from fedge.history import RoundRecord
    from fedge.messages import Capabilities
    from fedge.observe.dashboard import Feed

    work.mkdir(parents=True, exist_ok=True)
    (work / "app.py").write_text(app_source(1000))
    config = work / "fedge.toml"
    config.write_text(f'[app]\ntarget = "app:create_app"\n[run]\nnum_clients = {nodes}\n')
    cfg = load_config(config)
    runs = RunService.open(work / "state", cfg)
    app = load_app(cfg.app.target, cfg.base_dir, num_clients=nodes, seed=0)
    aggregator = Aggregator(app, runs, ServerSettings(work / "state"))
    caps = Capabilities(cpu_count=4, fedge_version="0.1.0")
    for cid in range(nodes):
        runs.store.bind(f"node-{cid}", cid, f"ipv4:10.0.{cid // 250}.{cid % 250}:5000", {})
    everyone = list(range(nodes))
    for r in range(1, rounds + 1):
        record = RoundRecord(
            r, selected=everyone, participants=everyone, num_examples=nodes * 10,
            metrics={"loss": 1 / r, "accuracy": 1 - 1 / r}, wall_time=1.0,
        )  # fmt: skip
        runs.store.record_round(runs.run_id, record)

    async def measure() -> dict[str, Any]:
        for cid in range(nodes):
            session = aggregator.service.sessions.open(
                f"node-{cid}", cid, f"ipv4:10.0.{cid // 250}.{cid % 250}:5000", caps
            )
            aggregator.service.sessions.stream_opened(session)
        feed = Feed(aggregator)
        lags: list[float] = []
        running = True

        async def probe() -> None:
            while running:
                start = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - start - 0.001)

        prober = asyncio.ensure_future(probe())
        queue = await feed.subscribe()  # the first refresh reads every round
        await asyncio.sleep(0.02)
        first = max(lags, default=0.0)
        assert queue is not None
        sent: list[int] = []

        async def browser() -> None:  # reads what the feed sends, as a page does
            while (message := await queue.get()) is not None:
                sent.append(len(message))

        reader = asyncio.ensure_future(browser())
        times, stalls = [], []
        for _ in range(10):
            lags.clear()
            feed._nodes_at = -1e9  # the node list is due each time, as every 2 s
            start = time.perf_counter()
            await feed.refresh(broadcast=True)
            times.append(time.perf_counter() - start)
            await asyncio.sleep(0.02)  # the probe wakes from the last stall
            stalls.append(max(lags, default=0.0))
        running = False
        await prober
        feed.close()
        await reader
        assert feed.nodes and len(feed.nodes) == nodes and len(feed.rounds) == rounds
        return {
            "nodes": nodes,
            "rounds": rounds,
            "refresh_ms_median": statistics.median(times) * 1e3,
            "loop_held_ms_median": statistics.median(stalls) * 1e3,
            "loop_held_ms_max": max(stalls) * 1e3,
            "first_refresh_loop_held_ms": first * 1e3,
            "first_data_kb": sum(sent[:5]) / 1024,
            "sent_kb_per_refresh": sum(sent[5:]) / 10 / 1024,
        }

    try:
        return asyncio.run(measure())
    finally:
        runs.store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000])
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--params", type=int, nargs="+", default=[1000], help="Model sizes.")
    parser.add_argument("--refresh-only", action="store_true", help="Skip the browser.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedge-dashboard-") as tmp:
        costs = [refresh_cost(n, Path(tmp) / f"registry-{n}") for n in args.nodes]
        rows = [
            run(n, args.loads, Path(tmp), params)
            for n in ([] if args.refresh_only else args.nodes)
            for params in args.params
        ]
    if rows:
        report(
            "dashboard",
            "Dashboard in Chromium: real server, real node connections, training",
            rows,
            target={"fcp_ms": 1000},
            refresh=costs,
        )
    report(
        "dashboard_refresh",
        "Dashboard refresh on the server's event loop (session registry filled directly)",
        costs,
    )


if __name__ == "__main__":
    main()
