"""The load `serve_bench.py` puts on `fedge serve`, run by locust (a separate process:
locust patches the standard library for gevent). Each user posts one prepared KServe v2
binary request again and again without waiting; every answer's exact latency is kept,
since locust's own statistics round to whole milliseconds.

Set by serve_bench.py: FEDGE_BENCH_BODY (the request file), FEDGE_BENCH_HEADER (its JSON
header's length), FEDGE_BENCH_PATH (the URL path), FEDGE_BENCH_OUT (the results file) and
FEDGE_BENCH_VERSIONS=1 to note which model version answered each request.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant, events, task

BODY = Path(os.environ["FEDGE_BENCH_BODY"]).read_bytes()
HEADERS = {
    "Content-Type": "application/octet-stream",
    "Inference-Header-Content-Length": os.environ["FEDGE_BENCH_HEADER"],
}
PATH = os.environ["FEDGE_BENCH_PATH"]
TRACK = os.environ.get("FEDGE_BENCH_VERSIONS") == "1"

latencies: list[float] = []  # ms, from the moment every user runs
failures: list[str] = []
versions: set[str] = set()
state = {"requests": 0, "measured_from": 0.0}


class Client(FastHttpUser):
    wait_time = constant(0)

    @task
    def infer(self) -> None:
        self.client.post(PATH, data=BODY, headers=HEADERS)


@events.spawning_complete.add_listener
def _all_running(**_: Any) -> None:
    latencies.clear()
    state["measured_from"] = time.perf_counter()


@events.request.add_listener
def _answered(response_time: float, exception: Exception | None, response: Any, **_: Any) -> None:
    state["requests"] += 1
    if exception is not None:
        failures.append(f"{type(exception).__name__}: {exception}"[:300])
        return
    if state["measured_from"]:
        latencies.append(response_time)
    if TRACK:
        size = int(response.headers["inference-header-content-length"])
        versions.add(json.loads(response.content[:size])["model_version"])


@events.test_stop.add_listener
def _done(**_: Any) -> None:
    seconds = time.perf_counter() - state["measured_from"] if state["measured_from"] else 0.0
    result = {
        "requests": state["requests"],
        "failures": len(failures),
        "failure_examples": failures[:5],
        "latencies_ms": latencies,
        "measured_s": seconds,
        "versions": sorted(versions),
    }
    Path(os.environ["FEDGE_BENCH_OUT"]).write_text(json.dumps(result))
