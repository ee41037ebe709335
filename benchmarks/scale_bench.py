"""Scale: N concurrent nodes speaking the real protocol against one `fedge server`.

A load generator runs the nodes in a few processes, each node with its own channel and
certificate (mutual TLS), on asyncio, speaking protocol 2 as `fedge node` does: Join,
the Connect stream (the model comes with its task), train (w + 1e-3), the result up the
same stream. The model has 100k float32 parameters. Reported: median round
wall time and server CPU per round (rounds 2..n, from the server's history: round 1 also
waits for the join storm), and the server's CPU over the whole run.

Usage: python benchmarks/scale_bench.py [--nodes 100 500 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np

from fedge.launch import Launcher
from fedge.messages import PROTOCOL
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.security import enroll, issue, load_credentials
from fedge.transport.grpc import convert
from fedge.weights import from_bytes, to_bytes

sys.path.insert(0, str(Path(__file__).parent))
from common import report

PARAMS = 100_000
LOADGEN_PROCESSES = 4
APP = f"""
import numpy as np
import fedge

class _Unused(fedge.Client):
    def fit(self, weights, config):
        raise RuntimeError("nodes are simulated by the load generator")

def create_app(num_clients, seed):
    return fedge.App(lambda cid: _Unused(), {{"w": np.zeros({PARAMS}, np.float32)}})
"""


async def one_node(address: str, certs: Path, cid: int) -> None:
    """One node as `fedge node` speaks protocol 2: Join, then the Connect stream (tasks
    with their model inline, results up on it, acks down); like a node, it joins again
    whenever its session ends (the driver stops it when the run is over), and renews its
    certificate when the server says so, then reconnects with it."""
    while True:
        creds = load_credentials(certs, f"node-{cid}")
        channel_creds = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
        async with grpc.aio.secure_channel(address, channel_creds) as channel:
            renewed = False
            while not renewed:
                try:
                    renewed = await session(channel, certs, cid)
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(random.uniform(0.5, 2.0))


async def session(channel: grpc.aio.Channel, certs: Path, cid: int) -> bool:
    """One session: Join, then serve tasks on Connect until the stream ends; True if it
    ended because the certificate was renewed."""
    stub = pb_grpc.FleetStub(channel)
    reply = await stub.Join(
        pb.JoinRequest(cid=cid, protocol=PROTOCOL), wait_for_ready=True, timeout=300
    )
    token = reply.session_token
    outgoing: asyncio.Queue[pb.NodeMessage | bytes] = asyncio.Queue()
    await outgoing.put(pb.NodeMessage(open=pb.TasksRequest(session_token=token)))

    async def requests() -> AsyncIterator[pb.NodeMessage | bytes]:
        while True:
            yield await outgoing.get()

    connect = channel.stream_stream(  # as GrpcLink does: results encoded by hand
        "/fedge.v1.Fleet/Connect",
        request_serializer=convert.encode,
        response_deserializer=pb.TaskMessage.FromString,
    )
    stream = connect(requests())

    async def heartbeats() -> None:  # as a node does, on the stream
        interval = reply.heartbeat_interval_s or 5.0
        while True:
            await asyncio.sleep(interval)
            await outgoing.put(pb.NodeMessage(heartbeat=pb.HeartbeatRequest(session_token=token)))

    due = reply.renew_after_unix_ms / 1000 if reply.renew_after_unix_ms else float("inf")
    beating = asyncio.ensure_future(heartbeats())
    models: dict[str, bytes] = {}
    try:
        async for message in stream:
            if message.HasField("ack") and time.time() >= due:  # as a node: between tasks
                key, csr = await asyncio.to_thread(enroll.make_request, f"node-{cid}")
                request = pb.RenewRequest(session_token=token, csr_pem=csr)
                answer = await stub.Renew(request, timeout=60)
                await asyncio.to_thread(enroll.renewed, certs, f"node-{cid}", key, answer.chain_pem)
                return True  # and reconnect with the new certificate
            if message.HasField("model"):
                models = {message.model.version: message.model.data}
            if not message.HasField("task"):
                continue
            task = message.task
            data = models.get(task.model_version)
            if data is None:
                data = b"".join(
                    [
                        chunk.data
                        async for chunk in stub.Download(
                            pb.DownloadRequest(
                                model_version=task.model_version, session_token=token
                            )
                        )
                    ]
                )
            weights = from_bytes(data)
            payload = to_bytes({k: v + np.float32(1e-3) for k, v in weights.items()})
            header = pb.UploadHeader(
                task_id=task.task_id,
                session_token=token,
                num_examples=1,
                encoding="safetensors",
                size=len(payload),
                sha256=hashlib.sha256(payload).digest(),
            )
            await outgoing.put(convert.node_upload_bytes(header, payload))
    finally:
        beating.cancel()
        stream.cancel()
    return False


def loadgen(address: str, certs: Path, cids: list[int]) -> None:
    async def main() -> None:
        results = await asyncio.gather(
            *(one_node(address, certs, cid) for cid in cids), return_exceptions=True
        )
        failed = [(cid, r) for cid, r in zip(cids, results, strict=True) if r is not None]
        for cid, error in failed[:5]:
            print(f"node {cid} failed: {error!r}", file=sys.stderr, flush=True)
        if failed:
            print(f"{len(failed)} of {len(cids)} nodes failed", file=sys.stderr, flush=True)

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Loadgen = Callable[[str, Path, list[int]], None]
"""A load generator process: (where the nodes dial, the certificates, their client ids)."""


def run(
    nodes: int,
    rounds: int,
    work: Path,
    validity: tuple[dt.datetime, dt.datetime] | None = None,
    *,
    transport: str = "grpc",
    generator: Loadgen = loadgen,
) -> dict[str, object]:
    """`validity`: of the nodes' certificates (to have them renewed during the run);
    `generator` runs nodes speaking `transport` (for MQTT it dials the broker)."""
    (work / "app.py").write_text(APP)
    config = work / "fedge.toml"
    config.write_text(
        f'[app]\ntarget = "app:create_app"\n[run]\nnum_clients = {nodes}\n'
        f"rounds = {rounds}\nround_timeout = 300.0\n"
    )
    with Launcher(work / f"fleet-{nodes}", config, transport=transport) as fleet:
        certs = fleet.issue()
        for cid in range(nodes):
            issue(certs, f"node-{cid}", validity=validity, force=True)
        where = fleet.address if transport == "grpc" else fleet.broker_url()
        out = fleet.work / "out.json"
        extra = os.environ.get("FEDGE_BENCH_SERVER_ARGS", "").split()
        server = fleet.server("--out", out, "--wait-for", str(nodes), *extra)
        broker = fleet.broker.pid if fleet.broker is not None else None
        result = _drive(where, certs, server, nodes, rounds, out, generator, broker)
        if server.returncode != 0:
            raise RuntimeError(f"the server failed:\n{fleet.log('server')}")
        return result


def _drive(
    where: str,
    certs: Path,
    server: subprocess.Popen[bytes],
    nodes: int,
    rounds: int,
    out: Path,
    generator: Loadgen,
    broker: int | None = None,
) -> dict[str, object]:
    """Runs the load generators until the server exits; the load generators' (and the
    broker's) CPU is reported too: they share the machine's cores with the server."""
    chunks = [list(range(nodes))[i::LOADGEN_PROCESSES] for i in range(LOADGEN_PROCESSES)]
    context = multiprocessing.get_context("spawn")
    generators = [context.Process(target=generator, args=(where, certs, c)) for c in chunks]
    started = time.perf_counter()
    for g in generators:
        g.start()
    cpu_before = cpu_seconds(server.pid)
    others = {"loadgen": [g.pid for g in generators if g.pid], "broker": [broker] if broker else []}
    first = {pid: cpu_seconds(pid) for pids in others.values() for pid in pids}
    last = dict(first)
    try:
        cpu_after = cpu_before
        while server.poll() is None:
            cpu_after = cpu_seconds(server.pid)
            last = {pid: cpu_seconds(pid) for pid in last}
            time.sleep(0.2)
    finally:
        for g in generators:
            g.terminate()
            g.join()
    if server.returncode != 0:
        return {}
    history = json.loads(out.read_text())
    steady = history["rounds"][1:]  # round 1 also waits for the join storm
    cpu = statistics.median(r["cpu_time"] for r in steady)
    return {
        "nodes": nodes,
        "rounds": rounds,
        "median_round_s": statistics.median(r["wall_time"] for r in steady),
        "max_round_s": max(r["wall_time"] for r in steady),
        "round1_s": history["rounds"][0]["wall_time"],
        "server_cpu_s_per_round": cpu,
        "server_cpu_ms_per_node": cpu / nodes * 1e3,
        "server_cpu_s_total": cpu_after - cpu_before,
        **{
            f"{what}_cpu_s_total": sum(last[pid] - first[pid] for pid in pids)
            for what, pids in others.items()
            if pids
        },
        "total_s": time.perf_counter() - started,
    }


def main(
    doc: str = __doc__ or "",
    *,
    name: str = "scale",
    transport: str = "grpc",
    generator: Loadgen = loadgen,
) -> None:
    """The command line of a scale benchmark: `name` names its results file."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix=f"fedge-{name}-") as tmp:
        rows = [
            run(n, args.rounds, Path(tmp), transport=transport, generator=generator)
            for n in args.nodes
        ]
    over = "" if transport == "grpc" else f" over {transport.upper()}"
    report(name, f"Scale{over}: 100k-parameter model, mTLS, {args.rounds} rounds", rows)


if __name__ == "__main__":
    main()
