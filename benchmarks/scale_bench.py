"""Scale: N concurrent nodes speaking the real protocol against one `fedge server`.

A load generator runs the nodes in a few processes, each node with its own channel and
certificate (mutual TLS), on asyncio: Join, the Tasks stream, Download, train (w + 1e-3),
Upload in 1 MiB chunks. The model has 100k float32 parameters. Reported: median round
wall time (from the server's history) and the server's CPU seconds per round.

Usage: python benchmarks/scale_bench.py [--nodes 100 500 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from fedge.demo import free_port
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.security import init_ca, issue, load_credentials
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


async def one_node(address: str, certs: Path, cid: int, stop: asyncio.Event) -> None:
    creds = load_credentials(certs, f"node-{cid}")
    channel_creds = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
    async with grpc.aio.secure_channel(address, channel_creds) as channel:
        stub = pb_grpc.FleetStub(channel)
        reply = await stub.Join(pb.JoinRequest(cid=cid), wait_for_ready=True, timeout=300)
        stream = stub.Tasks(pb.TasksRequest(session_token=reply.session_token))
        try:
            async for message in stream:
                if not message.HasField("task"):
                    continue
                task = message.task
                data = bytearray()
                async for chunk in stub.Download(
                    pb.DownloadRequest(model_version=task.model_version)
                ):
                    data += chunk.data
                weights = from_bytes(bytes(data))
                payload = to_bytes({k: v + np.float32(1e-3) for k, v in weights.items()})
                header = pb.UploadHeader(
                    task_id=task.task_id,
                    num_examples=1,
                    encoding="safetensors",
                    size=len(payload),
                    sha256=hashlib.sha256(payload).digest(),
                )

                async def messages(h: pb.UploadHeader = header, p: bytes = payload) -> object:
                    yield pb.UploadMessage(header=h)
                    for start in range(0, len(p), 1 << 20):
                        yield pb.UploadMessage(
                            chunk=pb.Chunk(data=p[start : start + (1 << 20)], offset=start)
                        )

                await stub.Upload(messages())
        except grpc.aio.AioRpcError:
            pass  # the server finished the run and closed the stream


def loadgen(address: str, certs: Path, cids: list[int]) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        await asyncio.gather(
            *(one_node(address, certs, cid, stop) for cid in cids), return_exceptions=True
        )

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(nodes: int, rounds: int, work: Path) -> dict[str, object]:
    certs = work / f"pki-{nodes}"
    init_ca(certs)
    issue(certs, "server", server=True, hosts=["127.0.0.1"])
    for cid in range(nodes):
        issue(certs, f"node-{cid}")
    (work / "app.py").write_text(APP)
    config = work / "fedge.toml"
    config.write_text(
        f'[app]\ntarget = "app:create_app"\n[run]\nnum_clients = {nodes}\n'
        f"rounds = {rounds}\nround_timeout = 300.0\n"
    )
    address, out = f"127.0.0.1:{free_port()}", work / f"out-{nodes}.json"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedge",
            "server",
            "--config",
            str(config),
            "--address",
            address,
            "--certs",
            str(certs),
            "--state-dir",
            str(work / f"state-{nodes}"),
            "--out",
            str(out),
            "--wait-for",
            str(nodes),
        ],
        stderr=subprocess.DEVNULL,
    )
    chunks = [list(range(nodes))[i::LOADGEN_PROCESSES] for i in range(LOADGEN_PROCESSES)]
    context = multiprocessing.get_context("spawn")
    generators = [context.Process(target=loadgen, args=(address, certs, c)) for c in chunks]
    started = time.perf_counter()
    for g in generators:
        g.start()
    cpu_before = cpu_seconds(server.pid)
    try:
        cpu_after = cpu_before
        while server.poll() is None:
            cpu_after = cpu_seconds(server.pid)
            time.sleep(0.2)
    finally:
        for g in generators:
            g.terminate()
            g.join()
    history = json.loads(out.read_text())
    times = [r["wall_time"] for r in history["rounds"]]
    return {
        "nodes": nodes,
        "rounds": rounds,
        "median_round_s": statistics.median(times),
        "max_round_s": max(times),
        "server_cpu_s_per_round": (cpu_after - cpu_before) / rounds,
        "total_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedge-scale-") as tmp:
        rows = [run(n, args.rounds, Path(tmp)) for n in args.nodes]
    report("scale", f"Scale: 100k-parameter model, mTLS, {args.rounds} rounds", rows)


if __name__ == "__main__":
    main()
