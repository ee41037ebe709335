"""`fedge serve` under a real HTTP load generator (locust) against bare ONNX Runtime.

The two examples' models (digits softmax regression, MNIST-1D CNN) are exported with
`export_onnx`, published signed to a file:// store and served by a real `fedge serve`
process each, which follows the store's ``production`` tag. Locust's users post KServe v2
binary requests (JSON header + raw FP32 input, outputs asked as binary) with no wait,
at 1, 8 and 64 users, batches of 1 and 32 examples.

Fairness on a small machine: the server is pinned to CPU 0 with one ONNX Runtime thread,
locust to CPU 1. The bare loop runs the same session (`ServedModel.load`, the server's
options) pinned to CPU 0 too, in as many threads as locust has users, so both get one core.

On a shared machine the rates swing with what else runs, and at high rates locust's
core is the limit, not the server's; so the CPU the server spends per request is
reported too, against one bare run's: their ratio ("CPU ratio") is server/bare when the
server has its core to itself and a client costs it nothing but the requests.

Then, for digits: 10 hot swaps (publish a version, move the tag, ask the server to check)
while 8 users keep asking, counting failed requests; and the server's memory.

Usage: python benchmarks/serve_bench.py [--seconds 20] [--bare-seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import fedge
from fedge.launch import free_port
from fedge.security import init_ca
from fedge.serve.export import export_onnx
from fedge.serve.model import ServedModel
from fedge.store import open_registry
from fedge.store.registry import Registry
from fedge.weights import to_file

sys.path.insert(0, str(Path(__file__).parent))
from common import example, report

BIN = Path(sys.executable).parent
LOCUSTFILE = Path(__file__).parent / "serve_locust.py"
PINNED = (os.cpu_count() or 1) >= 2
SERVER_CPUS, LOAD_CPUS = {0}, {1}
THREADS = 1
USERS = (1, 8, 64)
BATCHES = (1, 32)
SWAPS = 10


def pin(cpus: set[int]) -> Callable[[], None] | None:
    return (lambda: os.sched_setaffinity(0, cpus)) if PINNED else None


class Server:
    """One `fedge serve` process following `model`'s production tag in `store`."""

    def __init__(self, tmp: Path, store: str, pki: Path, model: str) -> None:
        self.model, self.url = model, f"http://127.0.0.1:{free_port()}"
        self.log = (tmp / f"serve-{model}.log").open("wb")
        cmd = [BIN / "fedge", "serve", "--host", "127.0.0.1", "--port", self.url.split(":")[-1],
               "--store", store, "--model", model, "--tag", "production",
               "--release-key", pki / "release.pub", "--poll", "600",
               "--threads", str(THREADS), "--cache-dir", tmp / "cache"]  # fmt: skip
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=pin(SERVER_CPUS),
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self._ready():
            assert self.proc.poll() is None, (tmp / f"serve-{model}.log").read_text()
            assert time.monotonic() < deadline, "fedge serve not ready in 60 s"
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=5) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def post(self, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, body, headers or {}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as reply:
            return bytes(reply.read())

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_mib(self) -> dict[str, float]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        values = dict(line.split(":", 1) for line in status)
        return {key: int(values[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Load:
    """A headless locust run against `server`, started now; `result` waits for its end."""

    def __init__(
        self, server: Server, body: Path, header: int, users: int, seconds: float, tmp: Path,
        *, track: bool = False,
    ) -> None:  # fmt: skip
        self.server, self.out = server, tmp / "locust.json"
        self.out.unlink(missing_ok=True)
        env = {
            **os.environ,
            "FEDGE_BENCH_BODY": str(body),
            "FEDGE_BENCH_HEADER": str(header),
            "FEDGE_BENCH_PATH": f"/v2/models/{server.model}/infer",
            "FEDGE_BENCH_OUT": str(self.out),
            "FEDGE_BENCH_VERSIONS": "1" if track else "0",
        }
        cmd = [BIN / "locust", "-f", LOCUSTFILE, "--headless", "-u", users, "-r", users,
               "-t", f"{seconds:g}s", "--host", server.url, "--only-summary",
               "--loglevel", "WARNING"]  # fmt: skip
        self.log = (tmp / "locust.log").open("wb")
        self.cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.server_cpu, self.started = server.cpu_seconds(), time.perf_counter()
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], env=env, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=pin(LOAD_CPUS),
        )  # fmt: skip

    def result(self) -> dict[str, Any]:
        self.proc.wait()
        wall = time.perf_counter() - self.started
        server_cpu = self.server.cpu_seconds() - self.server_cpu
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        locust_cpu = after.ru_utime + after.ru_stime - self.cpu.ru_utime - self.cpu.ru_stime
        self.log.close()
        result: dict[str, Any] = json.loads(self.out.read_text())
        result["server_cpu_pct"] = 100 * server_cpu / wall
        result["server_cpu_per_request"] = server_cpu / max(1, result["requests"])
        result["locust_cpu_pct"] = 100 * locust_cpu / wall
        return result


def bare_rate(
    session: Any, feeds: dict[str, np.ndarray], threads: int, seconds: float
) -> tuple[float, float]:
    """Runs per second of `session` in `threads` threads on the server's CPU, and the
    CPU seconds one run takes."""
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            session.run(None, feeds)
            n += 1
        counts[i] = n

    mine = os.sched_getaffinity(0)
    if PINNED:
        os.sched_setaffinity(0, SERVER_CPUS)  # the threads started now inherit it
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    cpu = time.process_time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    cpu = time.process_time() - cpu
    os.sched_setaffinity(0, mine)
    return sum(counts) / seconds, cpu / sum(counts)


def binary_request(model: ServedModel, x: np.ndarray) -> tuple[bytes, int]:
    """A KServe v2 binary-extension body for `x`, every output asked as binary."""
    spec = model.inputs[0]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": spec.name,
                    "shape": list(x.shape),
                    "datatype": spec.datatype,
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + x.tobytes(), len(header)


def publish(registry: Registry, app: fedge.App, model: str, version: str, tmp: Path) -> None:
    assert app.initial_weights is not None
    weights, onnx = tmp / f"{model}-{version}.safetensors", tmp / f"{model}-{version}.onnx"
    to_file(app.initial_weights, weights)
    export_onnx(app, app.initial_weights, onnx)
    registry.publish(model, weights, version, tags=("production",), artifacts={"onnx": onnx})


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="Each locust run.")
    parser.add_argument("--bare-seconds", type=float, default=5, help="Each bare loop.")
    args = parser.parse_args()
    digits, mnist1d = example("digits"), example("mnist1d_torch")
    models = [
        ("digits", digits.create_app(num_clients=4, seed=0), digits._split(0)[2]),
        ("mnist1d", mnist1d.create_app(num_clients=4, seed=0), mnist1d._data()[2].numpy()),
    ]
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {
        "request": "KServe v2 binary tensors",
        "pinned": PINNED,
        "load_average_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="fedge-serve-bench-") as name:
        tmp = Path(name)
        init_ca(tmp / "pki")
        store = f"file://{tmp / 'store'}"
        registry = open_registry(
            store, sign_key=tmp / "pki" / "release.key", verify_keys=[tmp / "pki" / "release.pub"]
        )
        for model, app, x_test in models:
            publish(registry, app, model, "v1", tmp)
            served = ServedModel.load(tmp / f"{model}-v1.onnx", model, "v1", threads=THREADS)
            server = Server(tmp, store, tmp / "pki", model)
            try:
                for batch in BATCHES:
                    x = np.ascontiguousarray(x_test[:batch], served.inputs[0].dtype)
                    body, header = binary_request(served, x)
                    (tmp / "body.bin").write_bytes(body)
                    headers = {"Inference-Header-Content-Length": str(header)}
                    server.post(f"/v2/models/{model}/infer", body, headers)  # it answers
                    for users in USERS:
                        bare, bare_cpu = bare_rate(
                            served.session, {served.inputs[0].name: x}, users, args.bare_seconds
                        )
                        run = Load(server, tmp / "body.bin", header, users, args.seconds, tmp)
                        got = run.result()
                        rate = len(got["latencies_ms"]) / got["measured_s"]
                        rows.append(
                            {
                                "model": model,
                                "batch": batch,
                                "users": users,
                                "req/s": rate,
                                "p50 ms": percentile(got["latencies_ms"], 50),
                                "p99 ms": percentile(got["latencies_ms"], 99),
                                "bare req/s": bare,
                                "server/bare": rate / bare,
                                "server CPU µs/req": got["server_cpu_per_request"] * 1e6,
                                "bare CPU µs/run": bare_cpu * 1e6,
                                "CPU ratio": bare_cpu / got["server_cpu_per_request"],
                                "server CPU %": got["server_cpu_pct"],
                                "locust CPU %": got["locust_cpu_pct"],
                                "failed": got["failures"],
                            }
                        )
                        print(rows[-1], flush=True)
                if model == "digits":
                    extra["memory_after_load_mib"] = server.memory_mib()
                    extra["hot_swaps"] = hot_swaps(server, registry, app, tmp, args.seconds)
                    extra["memory_after_swaps_mib"] = server.memory_mib()
            finally:
                server.close()
    report("serve", "fedge serve under locust vs bare ONNX Runtime (one core each)", rows, **extra)
    print(json.dumps({key: extra[key] for key in extra if key != "request"}, indent=2))


def hot_swaps(
    server: Server, registry: Registry, app: fedge.App, tmp: Path, seconds: float
) -> dict[str, Any]:
    """Move the tag `SWAPS` times while 8 users ask, batch 1; every request must succeed."""
    for i in range(2, SWAPS + 2):  # exported before the load starts
        publish(registry, app, "digits", f"v{i}", tmp)
    registry.tag("digits", "production", "v1")
    server.post("/v2/repository/models/digits/load")
    x = np.zeros((1, 64), np.float32)
    served = ServedModel.load(tmp / "digits-v1.onnx", "digits", "v1", threads=THREADS)
    body, header = binary_request(served, x)
    (tmp / "body.bin").write_bytes(body)
    run = Load(server, tmp / "body.bin", header, 8, seconds, tmp, track=True)
    time.sleep(3)  # locust is up and every user asks
    served_versions = []
    spacing = max(0.2, (seconds - 6) / SWAPS)
    for i in range(2, SWAPS + 2):
        registry.tag("digits", "production", f"v{i}")
        served_versions.append(json.loads(server.post("/v2/repository/models/digits/load")))
        time.sleep(spacing)
    got = run.result()
    return {
        "swaps": sum(1 for s in served_versions if not s["error"]),
        "requests": got["requests"],
        "failed": got["failures"],
        "failure_examples": got["failure_examples"],
        "versions_answered": len(got["versions"]),
    }


if __name__ == "__main__":
    main()
