"""A real fleet on 127.0.0.1 over mutual TLS: server + node processes, as `fedge demo` runs them.

1. Digits, 10 nodes, FedAvg, 10 rounds: round wall time (server history); `fedge demo` end to end.
2. Memory: RSS of an idle node; server peak RSS (VmHWM) while 10 nodes upload a 100 MB model.
3. Throughput: the 100 MB model to 1 and to/from 10 nodes (the protocol's Download and
   Upload); then the whole fit phase of a round with real node processes, for reference.

Run: .venv/bin/python benchmarks/fleet_bench.py   (writes results/fleet.json)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import report

from fedge.launch import Launcher, wait_for

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits" / "fedge.toml"
FEDGE = [sys.executable, "-m", "fedge"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
BIG_ELEMENTS = 25_000_000  # float32: 100 MB
MB = 1e6

BIGAPP = textwrap.dedent(
    """
    import numpy as np
    from fedge import App
    from fedge.client import Client, FitResult

    class Bump(Client):
        def fit(self, weights, config):
            return FitResult({k: v + np.float32(1e-3) for k, v in weights.items()}, 1)

    def create_app(num_clients, seed, **opts):
        return App(
            client_fn=lambda cid: Bump(),
            initial_weights={"w": np.full(N_ELEMENTS, 0.5, dtype=np.float32)},  # touched pages
        )
    """
).replace("N_ELEMENTS", str(BIG_ELEMENTS))

BIGTOML = textwrap.dedent(
    """
    [app]
    target = "bigapp:create_app"

    [run]
    rounds = 1
    num_clients = 10
    round_timeout = 300
    seed = 0

    [strategy]
    name = "fedavg"
    """
)


def proc_kb(pid: int, field: str) -> int:
    """A `kB` field (VmRSS, VmHWM) of /proc/PID/status; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakSampler(threading.Thread):
    """Polls VmHWM of a process (it only grows) so the last value before exit is kept."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_kb = pid, interval, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak_kb = max(self.peak_kb, proc_kb(self.pid, "VmHWM"))
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak_kb


class Fleet(Launcher):
    """The shared launcher, plus what the benchmarks time: a server run to its end."""

    def __init__(self, config: Path, work: Path, transport: str = "grpc") -> None:
        super().__init__(work, config, transport=transport)
        self.out = work / "history.json"

    def start_server(self, rounds: int, wait_for: int) -> subprocess.Popen[bytes]:
        server = self.server(
            "--out", self.out, "--rounds", str(rounds), "--wait-for", str(wait_for)
        )  # fmt: skip
        self.wait_until(lambda s: True, timeout=60)
        return server

    def start_nodes(self, count: int) -> list[subprocess.Popen[bytes]]:
        first = len(self.nodes)
        return [self.node(cid) for cid in range(first, first + count)]

    @property
    def nodes(self) -> list[subprocess.Popen[bytes]]:
        return [p for name, p in self.procs.items() if name.startswith("node-")]

    def wait_until(self, predicate: Any, timeout: float) -> Any:
        def ready() -> Any:
            if self.procs["server"].poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log('server', 2000)}")
            s = self.status(timeout=1.0)
            return s if s is not None and predicate(s) else None

        return wait_for(ready, "the server", timeout)

    def wait_server(self, timeout: float) -> dict[str, Any]:
        rc = self.procs["server"].wait(timeout=timeout)
        if rc != 0:
            raise RuntimeError(f"server exited with {rc}:\n{self.log('server', 2000)}")
        history: dict[str, Any] = json.loads(self.out.read_text())
        return history


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# --- 1. digits latency ------------------------------------------------------------------


def bench_digits(transport: str = "grpc") -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp,
        Fleet(DIGITS, Path(tmp), transport) as fleet,
    ):
        fleet.start_server(rounds=10, wait_for=10)
        fleet.start_nodes(10)
        history = fleet.wait_server(timeout=120)
    rounds = history["rounds"]
    walls = [r["wall_time"] for r in rounds]
    steady = walls[1:]  # round 1 also waits for the nodes to start and connect
    ok = all(r["status"] == "ok" and len(r["participants"]) == 10 for r in rounds)
    return {
        "round_wall_s": walls,
        "fit_s": [r["fit_time"] for r in rounds],
        "evaluate_s": [r["evaluate_time"] for r in rounds],
        "all_ok": ok,
        "median_all": statistics.median(walls),
        "p90_all": pct(walls, 0.9),
        "median_2_10": statistics.median(steady),
        "p90_2_10": pct(steady, 0.9),
        "final_metrics": rounds[-1]["metrics"],
    }


def bench_demo() -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run(
        [*FEDGE, "demo", "--clients", "10", "--rounds", "5"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    return {
        "seconds": elapsed,
        "returncode": proc.returncode,
        "stderr": proc.stderr[-500:].decode(),
    }


# --- 2. memory --------------------------------------------------------------------------


def bench_idle_node() -> dict[str, Any]:
    """One digits node, connected, with the server waiting for a second one (no work)."""
    with (
        tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp,
        Fleet(DIGITS, Path(tmp)) as fleet,
    ):
        fleet.start_server(rounds=1, wait_for=2)
        fleet.start_nodes(1)
        fleet.wait_until(lambda s: len(s.nodes) == 1, timeout=60)
        time.sleep(2.0)
        pid = fleet.nodes[0].pid
        return {
            "node_rss_mb": proc_kb(pid, "VmRSS") / 1024,
            "node_hwm_mb": proc_kb(pid, "VmHWM") / 1024,
            "server_rss_mb": proc_kb(fleet.procs["server"].pid, "VmRSS") / 1024,
        }


def bench_big(nodes: int, rounds: int, transport: str = "grpc") -> dict[str, Any]:
    """The 100 MB model; server idle RSS, peak RSS (VmHWM) and round fit times."""
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        work = Path(tmp)
        (work / "bigapp.py").write_text(BIGAPP)
        (work / "fedge.toml").write_text(BIGTOML)
        with Fleet(work / "fedge.toml", work, transport) as fleet:
            server = fleet.start_server(rounds=rounds, wait_for=nodes)
            time.sleep(0.5)
            idle_kb = proc_kb(server.pid, "VmRSS")
            idle_hwm_kb = proc_kb(server.pid, "VmHWM")
            sampler = PeakSampler(server.pid)
            sampler.start()
            node_peaks = [PeakSampler(p.pid) for p in fleet.start_nodes(nodes)]
            for s in node_peaks:
                s.start()
            t0 = time.perf_counter()
            try:
                history = fleet.wait_server(timeout=600)
            finally:
                peak_kb = sampler.stop()
                node_peak_kb = max(s.stop() for s in node_peaks)
            total = time.perf_counter() - t0
            time.sleep(0.5)  # nodes outlive the server (they reconnect): idle, model cached
            node_after_kb = max(proc_kb(p.pid, "VmRSS") for p in fleet.nodes)
    rounds_ = history["rounds"]
    model_bytes = BIG_ELEMENTS * 4
    return {
        "nodes": nodes,
        "model_mb": model_bytes / MB,
        "server_idle_rss_mb": idle_kb / 1024,
        "server_idle_hwm_mb": idle_hwm_kb / 1024,
        "server_peak_hwm_mb": peak_kb / 1024,
        "node_peak_hwm_mb": node_peak_kb / 1024,
        "node_rss_after_mb": node_after_kb / 1024,
        "fit_s": [r["fit_time"] for r in rounds_],
        "wall_s": [r["wall_time"] for r in rounds_],
        "participants": [len(r["participants"]) for r in rounds_],
        "total_s": total,
    }


# --- 3b. raw transfer: an in-bench "node" speaking the Fleet protocol --------------------


def _transfer(
    address: str, certs: Path, cid: int, payload: bytes, barrier: threading.Barrier
) -> dict[str, float]:
    """Join as a node does, take the fit task, time Download of the model and Upload of
    `payload` (the link a `fedge node` uses, without training)."""
    import hashlib

    from fedge.chunks import bytes_chunks
    from fedge.messages import PROTOCOL, Capabilities, TaskHeader, UploadHeader
    from fedge.transport.grpc.link import GrpcLink

    link = GrpcLink(address, f"node-{cid}", certs)
    try:
        joined = link.join(cid, Capabilities(), PROTOCOL)
        task = next(t for t in link.tasks(joined) if isinstance(t, TaskHeader))
        assert task.model is not None
        barrier.wait(timeout=120)
        t0 = time.perf_counter()
        received = sum(len(c) for c in link.download(joined.token, task.model.version, 0))
        t1 = time.perf_counter()
        assert received == task.model.size, (received, task.model.size)
        header = UploadHeader(
            task.task_id, joined.token, num_examples=1, encoding="safetensors",
            size=len(payload), sha256=hashlib.sha256(payload).digest(),
        )  # fmt: skip
        barrier.wait(timeout=120)
        t2 = time.perf_counter()
        ack = link.upload(header, bytes_chunks(payload))
        t3 = time.perf_counter()
        assert ack.accepted, ack.message
        link.cancel()
    finally:
        link.close()
    return {"download_s": t1 - t0, "upload_s": t3 - t2, "start": t0, "end_dl": t1,
            "start_ul": t2, "end": t3}  # fmt: skip


def bench_transfer(nodes: int) -> dict[str, Any]:
    import numpy as np

    from fedge.weights import to_bytes

    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        work = Path(tmp)
        (work / "bigapp.py").write_text(BIGAPP)
        (work / "fedge.toml").write_text(BIGTOML)
        payload = to_bytes({"w": np.full(BIG_ELEMENTS, 0.5 + 1e-3, dtype=np.float32)})
        with Fleet(work / "fedge.toml", work) as fleet:
            fleet.start_server(rounds=1, wait_for=nodes)
            fleet.issue(*(f"node-{cid}" for cid in range(nodes)))
            barrier = threading.Barrier(nodes)
            out: list[dict[str, float]] = [{} for _ in range(nodes)]
            errors: list[BaseException] = []

            def one(cid: int) -> None:
                try:
                    out[cid] = _transfer(fleet.address, fleet.certs, cid, payload, barrier)
                except BaseException as exc:  # reported below
                    errors.append(exc)
                    barrier.abort()

            threads = [threading.Thread(target=one, args=(c,)) for c in range(nodes)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise RuntimeError(f"transfer failed: {errors[0]!r}\n{fleet.log('server', 2000)}")
            fleet.wait_server(timeout=300)
    size = len(payload)
    dl_wall = max(r["end_dl"] for r in out) - min(r["start"] for r in out)
    ul_wall = max(r["end"] for r in out) - min(r["start_ul"] for r in out)
    return {
        "nodes": nodes,
        "download_MB_s": size * nodes / dl_wall / MB,
        "upload_MB_s": size * nodes / ul_wall / MB,
        "download_wall_s": dl_wall,
        "upload_wall_s": ul_wall,
        "per_node": out,
    }


# --- main -------------------------------------------------------------------------------


def show(title: str, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """Print one table; results/fleet.json is rewritten each time with every table so far."""
    extra["tables"][title] = rows
    report("fleet", title, rows, **extra)


def main() -> None:
    extra: dict[str, Any] = {"tables": {}}
    started = time.perf_counter()

    digits = bench_digits()
    demo = bench_demo()
    extra["digits"], extra["demo"] = digits, demo
    show(
        "1. digits over mTLS, 10 node processes, FedAvg, 10 rounds",
        [
            {"measure": "round wall, median (rounds 1-10)", "value": digits["median_all"] * 1e3,
             "unit": "ms", "target": "<= 100", "ok": digits["median_all"] <= 0.1},
            {"measure": "round wall, p90 (rounds 1-10)", "value": digits["p90_all"] * 1e3,
             "unit": "ms", "target": "", "ok": ""},
            {"measure": "round wall, median (rounds 2-10)", "value": digits["median_2_10"] * 1e3,
             "unit": "ms", "target": "<= 100", "ok": digits["median_2_10"] <= 0.1},
            {"measure": "round wall, p90 (rounds 2-10)", "value": digits["p90_2_10"] * 1e3,
             "unit": "ms", "target": "", "ok": ""},
            {"measure": "round 1 wall (incl. node start)", "value": digits["round_wall_s"][0] * 1e3,
             "unit": "ms", "target": "", "ok": ""},
            {"measure": "all rounds ok, 10/10 participants", "value": str(digits["all_ok"]),
             "unit": "", "target": "", "ok": digits["all_ok"]},
            {"measure": "fedge demo --clients 10 --rounds 5", "value": demo["seconds"],
             "unit": "s", "target": "<= 10",
             "ok": demo["returncode"] == 0 and demo["seconds"] <= 10},
        ],
        extra,
    )  # fmt: skip

    idle = bench_idle_node()
    big10 = bench_big(10, rounds=2)
    extra["idle_node"], extra["big10"] = idle, big10
    model_mb = big10["model_mb"]
    model_mib = model_mb * MB / 2**20
    budget = 4 * model_mib + big10["server_idle_rss_mb"]
    show(
        "2. memory (RSS)",
        [
            {"measure": "idle node VmRSS (digits, connected)", "value": idle["node_rss_mb"],
             "unit": "MiB", "target": "<= 100", "ok": idle["node_rss_mb"] <= 100},
            {"measure": "server idle VmRSS (100 MB model loaded)",
             "value": big10["server_idle_rss_mb"], "unit": "MiB", "target": "", "ok": ""},
            {"measure": "server peak VmHWM, 10 nodes x 100 MB",
             "value": big10["server_peak_hwm_mb"], "unit": "MiB",
             "target": f"<= {budget:.0f} (4x model + idle)",
             "ok": big10["server_peak_hwm_mb"] <= budget},
            {"measure": "server (peak - idle) / model size",
             "value": (big10["server_peak_hwm_mb"] - big10["server_idle_rss_mb"]) / model_mib,
             "unit": "x", "target": "<= 4", "ok": ""},
            {"measure": "node peak VmHWM (100 MB model)", "value": big10["node_peak_hwm_mb"],
             "unit": "MiB", "target": "", "ok": ""},
            {"measure": "node VmRSS after the run (idle, 100 MB model)",
             "value": big10["node_rss_after_mb"], "unit": "MiB", "target": "", "ok": ""},
        ],
        extra,
    )  # fmt: skip

    raw = [bench_transfer(1), bench_transfer(10)]
    extra["transfer"] = raw
    rows = []
    for r, per in zip(raw, (300, 200), strict=True):
        ok = r["download_MB_s"] >= per and (r["nodes"] == 1 or r["upload_MB_s"] >= per)
        rows.append(
            {"nodes": r["nodes"], "download_MB_s": r["download_MB_s"],
             "upload_MB_s": r["upload_MB_s"], "download_wall_s": r["download_wall_s"],
             "upload_wall_s": r["upload_wall_s"],
             "target": f"down >= {per}" if r["nodes"] == 1 else f">= {per} each way", "ok": ok}
        )  # fmt: skip
    show("3. transfer of the 100 MB model over mTLS (Fleet Download / Upload)", rows, extra)

    big1 = bench_big(1, rounds=2)
    extra["big1"] = big1
    model_bytes = BIG_ELEMENTS * 4
    rows = []
    for res in (big1, big10):
        n = res["nodes"]
        fit = res["fit_s"][1]  # round 2: round 1 also waits for node start-up
        rows.append(
            {"nodes": n, "round": 2, "fit_s": fit, "bytes_moved_mb": model_bytes * 2 * n / MB,
             "MB_per_s": model_bytes * 2 * n / fit / MB, "round1_fit_s": res["fit_s"][0]}
        )  # fmt: skip
    show(
        "3b. whole fit phase with node processes, 100 MB model (publish, download, decode, "
        "train, encode, hash, upload, validate, fold)",
        rows,
        extra,
    )
    extra["total_seconds"] = time.perf_counter() - started
    show("total", [{"total_seconds": extra["total_seconds"]}], extra)


if __name__ == "__main__":
    main()
