"""Dashboard with 1,000 nodes: first paint in Chromium while a real fleet trains.

A real `fedge server --dashboard` (mutual TLS, HTTPS dashboard) and N real connections:
the scale benchmark's load generator (`scale_bench.loadgen`: every node its own
certificate and channel, speaking the protocol as `fedge node` does, training a
100k-parameter model). With every node live and rounds going, Debian's Chromium
(Playwright) loads the page afresh several times; reported: first-contentful-paint (the
Performance API), the time until all N node rows are drawn (the page's own
``fedge-nodes-rendered`` mark), the page's first data (the size of ``/api/snapshot`` and
how long the server takes to answer it), and the server's CPU with no page open and with
four open (each window a few seconds, while training goes on: other load on the
machine shows in it).

Usage: python benchmarks/dashboard_bench.py [--nodes 1000] [--loads 5]
"""

from __future__ import annotations

import argparse
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
from scale_bench import APP, LOADGEN_PROCESSES, cpu_seconds, loadgen

CHROMIUM = "/usr/bin/chromium"
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


def run(nodes: int, loads: int, work: Path) -> dict[str, Any]:
    (work / "app.py").write_text(APP)
    config = work / "fedge.toml"
    config.write_text(
        f'[app]\ntarget = "app:create_app"\n[run]\nnum_clients = {nodes}\n'
        "rounds = 1000\nround_timeout = 300.0\n"
    )
    with Launcher(work / f"fleet-{nodes}", config) as fleet:
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
    drawn = [t["nodes"] for t in timings]
    return {
        "nodes": nodes,
        "live": sum(n.live for n in status.nodes),
        "loads": loads,
        "fcp_ms_median": statistics.median(fcp),
        "fcp_ms_max": max(fcp),
        "rows_drawn_ms_median": statistics.median(drawn),
        "rows_drawn_ms_max": max(drawn),
        "snapshot_kb": statistics.median(sizes) / 1024,
        "snapshot_ms_median": statistics.median(answers) * 1e3,
        "server_cpu_no_page": idle,
        "server_cpu_4_pages": watched,
        "rounds_while_measured": rounds_done,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000])
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedge-dashboard-") as tmp:
        rows = [run(n, args.loads, Path(tmp)) for n in args.nodes]
    report(
        "dashboard",
        "Dashboard in Chromium: real server, real node connections, training",
        rows,
        target={"fcp_ms": 1000},
    )


if __name__ == "__main__":
    main()
