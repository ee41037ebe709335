"""The floor under the scale benchmark: what grpc.aio with mutual TLS costs a server that
only moves the bytes of a fedge round, with none of fedge's work.

The server is the fedge server's gRPC stack (its options and credentials) with one
generic bidirectional stream per node; per round it sends each node a model and a
task message and answers each result with an ack: the messages and sizes of a
`scale_bench.py` round, without sessions, checks, hashing, validation or folding. The
nodes are the same kind of load generator (4 processes, asyncio, one channel and
certificate each). Reported: the server's CPU per node per round (rounds 2..n), the
number to hold against the scale benchmark's.

Usage: python benchmarks/transport_floor_bench.py [--nodes 1000] [--sizes 4000 400000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from fedge.launch import Launcher
from fedge.security import load_credentials
from fedge.transport.grpc.server import OPTIONS
from fedge.transport.grpc.tls import ReloadingCredentials

sys.path.insert(0, str(Path(__file__).parent))
from common import report

LOADGEN_PROCESSES = 4
METHOD = "/floor.Floor/Round"
TASK = b"task" + bytes(200)  # about the size of an encoded TaskHeader
ACK = b"ack" + bytes(20)


def _same(data: bytes) -> bytes:
    return data


async def one_node(address: str, certs: Path, cid: int, size: int) -> None:
    """Answers every task message with a result of `size` bytes."""
    creds = load_credentials(certs, f"node-{cid}")
    channel_creds = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
    result = os.urandom(size)
    async with grpc.aio.secure_channel(address, channel_creds) as channel:
        call = channel.stream_stream(METHOD, request_serializer=_same, response_deserializer=_same)
        while True:  # as a node does, it connects again if the stream fails (join storm)
            outgoing: asyncio.Queue[bytes] = asyncio.Queue()
            await outgoing.put(b"open")

            async def requests(queue: asyncio.Queue[bytes]) -> AsyncIterator[bytes]:
                while True:
                    yield await queue.get()

            try:
                async for message in call(requests(outgoing), wait_for_ready=True):
                    if message.startswith(b"task"):
                        await outgoing.put(result)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(random.uniform(0.5, 2.0))


def loadgen(address: str, certs: Path, cids: list[int], size: int) -> None:
    async def main() -> None:
        await asyncio.gather(
            *(one_node(address, certs, cid, size) for cid in cids), return_exceptions=True
        )

    asyncio.run(main())


async def serve(
    address: str, certs: Path, nodes: int, size: int, rounds: int, stop_nodes: Callable[[], None]
) -> list[tuple[float, float]]:
    """Run `rounds` rounds once all nodes are connected: (server CPU s, wall s) of each."""
    model = os.urandom(size)
    streams: dict[bytes, asyncio.Queue[bytes]] = {}  # by the node's certificate name
    arrived = 0
    everyone = asyncio.Event()

    async def round_stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        nonlocal arrived
        down: asyncio.Queue[bytes] = asyncio.Queue()
        name = context.auth_context()["x509_common_name"][0]
        streams[name] = down
        await anext(aiter(requests))

        async def results() -> None:
            nonlocal arrived
            async for _ in requests:
                arrived += 1
                down.put_nowait(ACK)
                if arrived == nodes:
                    everyone.set()

        reader = asyncio.ensure_future(results())
        try:
            while True:
                yield await down.get()
        finally:
            reader.cancel()
            if streams.get(name) is down:
                del streams[name]

    server = grpc.aio.server(options=OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(round_stream, _same, _same)
    service, method = METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {method: handler}),)
    )
    server.add_secure_port(address, ReloadingCredentials(certs).credentials())
    await server.start()
    try:
        while len(streams) < nodes:
            await asyncio.sleep(0.1)
        measured = []
        for _ in range(rounds):
            arrived = 0
            everyone.clear()
            cpu, wall = time.process_time(), time.perf_counter()
            for down in streams.values():
                down.put_nowait(model)
                down.put_nowait(TASK)
            await everyone.wait()
            measured.append((time.process_time() - cpu, time.perf_counter() - wall))
        return measured
    finally:
        stop_nodes()  # first, so the streams end as they would, not cancelled
        await server.stop(5)


def run(nodes: int, size: int, rounds: int, work: Path) -> dict[str, object]:
    with Launcher(work / f"floor-{nodes}-{size}", work / "unused.toml") as fleet:
        certs = fleet.issue(*(f"node-{cid}" for cid in range(nodes)))
        chunks = [list(range(nodes))[i::LOADGEN_PROCESSES] for i in range(LOADGEN_PROCESSES)]
        context = multiprocessing.get_context("spawn")
        generators = [
            context.Process(target=loadgen, args=(fleet.address, certs, c, size)) for c in chunks
        ]

        def stop_nodes() -> None:
            for g in generators:
                g.terminate()
                g.join()

        for g in generators:
            g.start()
        try:
            measured = asyncio.run(serve(fleet.address, certs, nodes, size, rounds, stop_nodes))
        finally:
            stop_nodes()
    cpu = statistics.median(c for c, _ in measured[1:])
    return {
        "nodes": nodes,
        "message_bytes": size,
        "median_round_s": statistics.median(w for _, w in measured[1:]),
        "server_cpu_s_per_round": cpu,
        "server_cpu_ms_per_node": cpu / nodes * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4_000, 400_000])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedge-floor-") as tmp:
        rows = [run(n, size, args.rounds, Path(tmp)) for n in args.nodes for size in args.sizes]
    report("transport_floor", f"grpc.aio + mTLS floor, {args.rounds} rounds", rows)


if __name__ == "__main__":
    main()
