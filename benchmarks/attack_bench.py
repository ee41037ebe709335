"""Every attack of issue 8 §4, repeated against a real server while honest nodes train.

A `fedge server` (mutual TLS) runs rounds of a 6 MiB model (so uploads take the spooled
file path) with 4 honest `fedge node` processes (cids 0-3) and one hostile node, cid 4,
that answers its tasks honestly unless an attack takes one. Each attack runs for a
window while the rounds go on. Reported per attack: how the server answered, its RSS
before / at peak during / after the attack (sampled every 50 ms), whether it is still
up, and the rounds finished per second in the window against the baseline window
before any attack. Attacks that withhold the hostile node's own result (2, 8) make its
round wait for the round's deadline (4 s), as any straggler does.

Usage: python benchmarks/attack_bench.py [--window 6] [--downloads 200] [--idle 1100]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import queue
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from fedge.launch import Launcher, wait_for
from fedge.messages import PROTOCOL, Capabilities, TaskHeader, UploadHeader
from fedge.node.link import LinkError
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.transport.grpc.link import GrpcLink
from fedge.transport.grpc.tls import channel_credentials

sys.path.insert(0, str(Path(__file__).parent))
from common import report

PARAMS = 1_572_864  # 6 MiB of float32
HOSTILE_CID = 4
APP = f"""
import numpy as np
import fedge

class Honest(fedge.Client):
    def fit(self, weights, config):
        return fedge.FitResult({{"w": weights["w"] + np.float32(0.001)}}, 10, {{"loss": 1.0}})

def create_app(num_clients, seed):
    return fedge.App(lambda cid: Honest(), {{"w": np.zeros({PARAMS}, np.float32)}})
"""
CONFIG = """
[app]
target = "app:create_app"
[run]
num_clients = 5
rounds = 100000
round_timeout = 4.0
max_round_retries = 100000
[strategy]
name = "fedavg"
fraction_evaluate = 0.0
"""


class Mallory:
    """The hostile node: joined as cid 4, it answers tasks honestly (the model back,
    unchanged) unless an attack has claimed the next one."""

    def __init__(self, fleet: Launcher) -> None:
        self.link = GrpcLink(fleet.address, "mallory", fleet.issue("mallory"))
        self.joined = self.link.join(HOSTILE_CID, Capabilities(), PROTOCOL)
        self.token = self.joined.token
        self.claimed: queue.Queue[TaskHeader] | None = None
        self.parked: list[str] = []
        """Tasks with a partial upload left on purpose."""
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for item in self.link.tasks(self.joined):
                if not isinstance(item, TaskHeader):
                    continue
                if self.claimed is not None:
                    self.claimed.put(item)
                    self.claimed = None
                    continue
                threading.Thread(target=self._answer, args=(item,), daemon=True).start()
        except LinkError:
            pass

    def _answer(self, task: TaskHeader) -> None:
        with contextlib.suppress(LinkError):
            self.upload(task, self.model(task))

    def claim(self) -> TaskHeader:
        """The next task, for an attack to misuse."""
        claimed: queue.Queue[TaskHeader] = queue.Queue()
        self.claimed = claimed
        return claimed.get(timeout=30)

    def model(self, task: TaskHeader) -> bytes:
        assert task.model is not None
        return b"".join(self.link.download(self.token, task.model.version, 0))

    def header(self, task: TaskHeader, payload: bytes, **fields: object) -> UploadHeader:
        base: dict[str, object] = {
            "token": self.token,
            "num_examples": 10,
            "encoding": "safetensors",
            "size": len(payload),
            "sha256": hashlib.sha256(payload).digest(),
        }
        return UploadHeader(task.task_id, **{**base, **fields})  # type: ignore[arg-type]

    def upload(self, task: TaskHeader, payload: bytes, **fields: object) -> str:
        try:
            ack = self.link.upload(self.header(task, payload, **fields), chunked(payload))
            return "accepted" if ack.accepted else f"not accepted: {ack.message[:60]}"
        except LinkError as exc:
            return exc.code.value


def chunked(payload: bytes, size: int = 1 << 20) -> list[tuple[int, bytes]]:
    return [(at, payload[at : at + size]) for at in range(0, len(payload), size)]


# --- the attacks of §4: each returns how the server answered --------------------------


def unread_downloads(fleet: Launcher, mallory: Mallory, count: int) -> str:
    task = mallory.claim()
    assert task.model is not None
    channel = grpc.secure_channel(fleet.address, channel_credentials(fleet.certs, "mallory"))
    stub = pb_grpc.FleetStub(channel)
    request = pb.DownloadRequest(session_token=mallory.token, model_version=task.model.version)
    codes: dict[str, int] = {}
    streams = [stub.Download(request) for _ in range(count)]
    for stream in streams:
        try:
            next(stream)
            codes["streaming"] = codes.get("streaming", 0) + 1
        except grpc.RpcError as exc:
            codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
    time.sleep(2)
    for stream in streams:
        stream.cancel()
    channel.close()
    mallory._answer(task)
    return ", ".join(f"{n} {code}" for code, n in sorted(codes.items()))


def parked_uploads(fleet: Launcher, mallory: Mallory) -> str:
    answers = []
    for _ in range(3):  # a partial upload in each of three rounds, never finished
        task = mallory.claim()
        mallory.parked.append(task.task_id)
        payload = mallory.model(task)
        answers.append(mallory.upload(task, payload[: 3 << 20], size=len(payload),
                                      sha256=hashlib.sha256(payload).digest()))  # fmt: skip
    return "; ".join(sorted(set(answers)))


def header_bomb(fleet: Launcher, mallory: Mallory) -> str:
    task = mallory.claim()
    empty = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    header = json.dumps({f"t{i}": empty for i in range(80_000)}, separators=(",", ":")).encode()
    answer = mallory.upload(task, len(header).to_bytes(8, "little") + header)
    mallory._answer(task)
    return answer


def idle_connections(fleet: Launcher, count: int) -> str:
    host, port = fleet.address.rsplit(":", 1)
    sockets = []
    for _ in range(count):
        try:
            sockets.append(socket.create_connection((host, int(port)), timeout=5))
        except OSError:
            break
    deadline, closed = time.monotonic() + 15, 0
    for sock in sockets:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        with contextlib.suppress(OSError):
            closed += sock.recv(1) == b""
        sock.close()
    return f"{len(sockets)} opened, {closed} closed by the server within 15 s"


def big_metrics_and_errors(fleet: Launcher, mallory: Mallory) -> str:
    task = mallory.claim()
    payload = mallory.model(task)
    many = mallory.upload(task, payload, metrics={f"m{i}": 1.0 for i in range(10_000)})
    error = mallory.upload(task, b"", size=0, sha256=b"", error="x" * 1_000_000)
    return f"10,000 metrics: {many}; a 1 MB error: {error} (kept 4 KB)"


def nested_order(fleet: Launcher, mallory: Mallory) -> str:
    task = mallory.claim()
    order = "[" * 100_000 + "]" * 100_000
    header = json.dumps({"__metadata__": {"fedge.order": order}}).encode()
    answer = mallory.upload(task, len(header).to_bytes(8, "little") + header)
    mallory._answer(task)
    return answer


def foreign_queries(fleet: Launcher, mallory: Mallory) -> str:
    task = mallory.claim()
    other = task.task_id.rsplit("/", 1)[0] + "/0"  # node 0's task
    answers = []
    for call in (
        lambda: mallory.link.query_upload(mallory.token, other),
        lambda: mallory.link.query_upload("", task.task_id),
        lambda: mallory.link.heartbeat(""),
    ):
        try:
            call()
            answers.append("answered")
        except LinkError as exc:
            answers.append(exc.code.value)
    mallory._answer(task)
    return ", ".join(answers)


def trickle_and_big_chunks(fleet: Launcher, mallory: Mallory) -> str:
    task = mallory.claim()
    payload = mallory.model(task)
    header = mallory.header(task, payload)
    try:
        mallory.link.upload(header, [(0, payload[: 2 << 20])])
        big = "accepted"
    except LinkError as exc:
        big = exc.code.value
    release = threading.Event()

    def stall() -> Iterator[tuple[int, bytes]]:
        yield 0, payload[: 1 << 20]
        release.wait(60)

    started = time.monotonic()
    try:
        mallory.link.upload(header, stall())
        cut = "not cut"
    except LinkError as exc:
        cut = f"{exc.code.value} after {time.monotonic() - started:.1f} s (round deadline 4 s)"
    release.set()
    return f"2 MiB chunk: {big}; stalled upload: {cut}"


def wrong_roles(fleet: Launcher) -> str:
    answers = []
    for name in ("server", "admin"):
        link = GrpcLink(fleet.address, name, fleet.certs)
        try:
            link.join(0, Capabilities(), PROTOCOL)
            answers.append(f"{name} joined")
        except LinkError as exc:
            answers.append(f"{name} as node: {exc.code.value}")
    with grpc.secure_channel(fleet.address, channel_credentials(fleet.certs, "mallory")) as channel:
        try:
            pb_grpc.ControlStub(channel).Status(pb.StatusRequest(), timeout=10)
            answers.append("node used Control")
        except grpc.RpcError as exc:
            answers.append(f"node on Control: {exc.code().name}")
    return ", ".join(answers)


# --- measuring ----------------------------------------------------------------------


class Sampler:
    """The server's RSS and finished rounds, sampled every 50 ms in a thread."""

    def __init__(self, fleet: Launcher, pid: int) -> None:
        self.fleet, self.pid = fleet, pid
        self.samples: list[tuple[float, int, int]] = []  # (time, rss bytes, round)
        self.stop = threading.Event()
        self.round = 0
        threading.Thread(target=self._rounds, daemon=True).start()
        threading.Thread(target=self._rss, daemon=True).start()

    def _rounds(self) -> None:
        while not self.stop.is_set():
            status = self.fleet.status()
            if status is not None:
                self.round = status.round
            time.sleep(0.1)

    def _rss(self) -> None:
        while not self.stop.is_set():
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
                rss = int(text.split("VmRSS:")[1].split()[0]) * 1024
            except (OSError, IndexError):
                rss = 0
            self.samples.append((time.monotonic(), rss, self.round))
            time.sleep(0.05)

    def window(self, start: float, end: float) -> tuple[int, float]:
        """(peak RSS, rounds per second) between two times."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return 0, 0.0
        rounds = inside[-1][2] - inside[0][2]
        return max(s[1] for s in inside), rounds / (inside[-1][0] - inside[0][0])

    def rss(self) -> int:
        return self.samples[-1][1] if self.samples else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=6.0, help="seconds per attack")
    parser.add_argument("--downloads", type=int, default=200)
    parser.add_argument("--idle", type=int, default=1100)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedge-attack-") as tmp:
        work = Path(tmp)
        (work / "app.py").write_text(APP)
        (work / "fedge.toml").write_text(CONFIG)
        with Launcher(work / "fleet", work / "fedge.toml") as fleet:
            server = fleet.server("--wait-for", "5")
            wait_for(fleet.status, "the server")
            for cid in range(4):
                fleet.node(cid)
            mallory = Mallory(fleet)
            sampler = Sampler(fleet, server.pid)
            uploads = fleet.state_dir / "runs"
            while sampler.round < 3:  # warm up
                time.sleep(0.2)
            start = time.monotonic()
            time.sleep(args.window)
            idle_rss = sampler.rss()
            _, baseline = sampler.window(start, time.monotonic())

            m = mallory
            attacks: list[tuple[str, Callable[[], str]]] = [
                ("1. 200 unread Download streams",
                 lambda: unread_downloads(fleet, m, args.downloads)),
                ("2. partial uploads parked, 3 rounds", lambda: parked_uploads(fleet, m)),
                ("3. 5.6 MB header, 80,000 empty tensors", lambda: header_bomb(fleet, m)),
                (f"4. {args.idle} idle TCP connections",
                 lambda: idle_connections(fleet, args.idle)),
                ("5. 10,000 metrics; a 1 MB error", lambda: big_metrics_and_errors(fleet, m)),
                ("6. order metadata nested 100,000 deep", lambda: nested_order(fleet, m)),
                ("7. another node's task; empty tokens", lambda: foreign_queries(fleet, m)),
                ("8. 2 MiB chunk; upload stalled mid-way",
                 lambda: trickle_and_big_chunks(fleet, m)),
                ("9. server/admin cert as node; node on Control", lambda: wrong_roles(fleet)),
            ]  # fmt: skip
            rows, peaks, rates = [], [], []
            for name, attack in attacks:
                before = sampler.rss()
                started = time.monotonic()
                answer = attack()
                left = args.window - (time.monotonic() - started)
                if left > 0:
                    time.sleep(left)
                peak, rate = sampler.window(started, time.monotonic())
                peaks.append(peak)
                rates.append(rate)
                time.sleep(1.0)
                if mallory.parked:  # once their rounds have closed (4 s), is anything left?
                    time.sleep(5)
                    left = sum(
                        1
                        for task_id in mallory.parked
                        for _ in uploads.glob(f"*/uploads/{task_id.replace('/', '_')}.*")
                    )
                    answer += f"; files left after their rounds closed: {left}"
                    mallory.parked.clear()
                rows.append(
                    {
                        "attack": name,
                        "server answered": answer,
                        "RSS before/peak/after MB": f"{before / 2**20:.0f} / {peak / 2**20:.0f}"
                        f" / {sampler.rss() / 2**20:.0f}",
                        "server up": "yes" if server.poll() is None else "NO",
                        "honest rounds/s (baseline)": f"{rate:.2f} ({baseline:.2f})",
                    }
                )
            sampler.stop.set()
            log = (fleet.logs / "server.log").read_text()
            honest_refused = sum(
                f"refused an upload of node node-{cid}:" in log for cid in range(4)
            )
            summary = {
                "attack": "all, in sequence",
                "server answered": f"honest nodes with an upload refused: {honest_refused} of 4",
                "RSS before/peak/after MB": f"{idle_rss / 2**20:.0f} / "
                f"{max(peaks) / 2**20:.0f} / {sampler.rss() / 2**20:.0f}",
                "server up": "yes" if server.poll() is None else "NO",
                "honest rounds/s (baseline)": "median "
                f"{statistics.median(rates):.2f} ({baseline:.2f})",
            }
            report(
                "attack_bench",
                "issue 8 §4 attacks against a real server while 4 honest nodes train",
                [*rows, summary],
            )


if __name__ == "__main__":
    main()
