"""Fleet trust: enrolling devices from tokens, and how fast a revocation cuts a live node.

Enrollment: a `fedge server` with an enrollment listener; the operator makes N tokens
(one `fedge tokens create --prefix --count N` call); a load generator (4 processes,
threads) runs the real device flow for each: read the server's chain and find the
pinned root, make a P-256 key and CSR, Enroll over TLS verified against the root,
check and write the certificate. Reported: wall time for all N, and per device.

Revocation: K nodes hold their task stream (`Connect`) open as `fedge node` does; each
is revoked in turn through Control, and the time from the revocation call to the node's
stream failing is measured at the node.

Usage: python benchmarks/trust_bench.py [--devices 1000] [--revocations 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from fedge.launch import Launcher, free_port, wait_for
from fedge.messages import PROTOCOL
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.security import ca_pin
from fedge.transport.grpc.control_client import Control
from fedge.transport.grpc.enroll_client import enroll
from fedge.transport.grpc.tls import channel_credentials

sys.path.insert(0, str(Path(__file__).parent))
from common import report

LOADGEN_PROCESSES = 4
THREADS = 8
APP = """
import numpy as np
import fedge

def create_app(num_clients, seed):
    return fedge.App(lambda cid: None, {"w": np.zeros(10, np.float32)})
"""


def enroll_devices(address: str, pin: str, work: Path, jobs: list[tuple[str, str]]) -> None:
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda job: enroll(address, job[1], pin, job[0], work / job[0]), jobs))


def enrollment(fleet: Launcher, devices: int) -> dict[str, object]:
    enroll_address = f"127.0.0.1:{free_port()}"
    fleet.server("--wait-for", "1", "--enroll-address", enroll_address)
    wait_for(fleet.status, "the server")
    with Control(fleet.address, fleet.certs) as control:
        started = time.perf_counter()
        tokens = control.create_tokens(
            pb.CreateTokensRequest(prefix="dev-", count=devices, ttl_s=3600)
        ).tokens
        made = time.perf_counter() - started
    jobs = [(f"dev-{i}", token) for i, token in enumerate(tokens)]
    chunks = [jobs[i::LOADGEN_PROCESSES] for i in range(LOADGEN_PROCESSES)]
    context = multiprocessing.get_context("spawn")
    pin = ca_pin(fleet.certs)
    generators = [
        context.Process(target=enroll_devices, args=(enroll_address, pin, fleet.work, c))
        for c in chunks
    ]
    started = time.perf_counter()
    for g in generators:
        g.start()
    for g in generators:
        g.join()
    elapsed = time.perf_counter() - started
    enrolled = sum((fleet.work / f"dev-{i}" / f"dev-{i}.crt").exists() for i in range(devices))
    if enrolled != devices:
        raise RuntimeError(f"only {enrolled} of {devices} devices enrolled")
    return {
        "measure": f"enroll {devices} devices from tokens (real CSR flow)",
        "result": f"{elapsed:.1f} s ({elapsed / devices * 1e3:.0f} ms per device; "
        f"tokens made in {made:.2f} s)",
        "target": "<= 60 s",
        "seconds": elapsed,
    }


def revocation(fleet: Launcher, nodes: int) -> dict[str, object]:
    names = [f"node-{i}" for i in range(nodes)]
    fleet.issue(*names)
    failed_at: dict[str, float] = {}
    ready = threading.Barrier(nodes + 1)

    def hold(cid: int, name: str) -> None:
        with grpc.secure_channel(fleet.address, channel_credentials(fleet.certs, name)) as ch:
            stub = pb_grpc.FleetStub(ch)
            joined = stub.Join(pb.JoinRequest(cid=cid, protocol=PROTOCOL), timeout=30)
            opened = pb.NodeMessage(open=pb.TasksRequest(session_token=joined.session_token))
            stream = stub.Connect(iter([opened]))
            ready.wait()
            try:
                for _ in stream:
                    pass
            except grpc.RpcError:
                pass
            failed_at[name] = time.perf_counter()

    threads = [threading.Thread(target=hold, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.5)  # the streams are open on the server
    latencies = []
    with Control(fleet.address, fleet.certs) as control:
        for name in names:
            started = time.perf_counter()
            control.revoke(name, reason="benchmark")
            while name not in failed_at:
                time.sleep(0.001)
            latencies.append(failed_at[name] - started)
    for t in threads:
        t.join()
    return {
        "measure": f"revoke a live node -> its stream cut ({nodes} nodes, one by one)",
        "result": f"max {max(latencies) * 1e3:.1f} ms, median "
        f"{statistics.median(latencies) * 1e3:.1f} ms",
        "target": "<= 1 s",
        "seconds": max(latencies),
    }


def renewals(nodes: int, rounds: int, work: Path) -> dict[str, object]:
    """A scale-benchmark run whose nodes all renew during it: certificates whose renewal
    window (half to two thirds of their life) opens ~40 s in and lasts 40 s. Round times
    while renewals happen are compared with the others of the same run."""
    import scale_bench

    work.mkdir(parents=True, exist_ok=True)
    window = 40.0
    life = 6 * window
    not_before = time.time() + 40.0 - life / 2
    validity = (
        dt.datetime.fromtimestamp(not_before, dt.UTC),
        dt.datetime.fromtimestamp(not_before + life, dt.UTC),
    )
    scale_bench.run(nodes, rounds, work, validity)
    with sqlite3.connect(work / f"fleet-{nodes}" / "state" / "state.db") as db:
        issued = [t for (t,) in db.execute("SELECT issued_at FROM certificates")]
        finished = db.execute("SELECT finished_at, record_json FROM rounds").fetchall()
    if len(issued) < nodes:
        raise RuntimeError(f"only {len(issued)} of {nodes} nodes renewed")
    first, last = min(issued), max(issued)
    during, outside = [], []
    for end, record in finished[1:]:  # round 1 waits for the join storm
        wall = json.loads(record)["wall_time"]
        (during if end - wall <= last and end >= first else outside).append(wall)
    inside, other = statistics.median(during), statistics.median(outside)
    per_renewal = (inside - other) * len(during) / len(issued)  # round time each one adds
    rate = len(issued) / (5 * 86_400)  # with 30-day certificates: over days 15 to 20
    extra = rate * other * per_renewal  # round time added per round at that rate
    return {
        "measure": f"{nodes} nodes renew within {last - first:.0f} s of a run "
        "(~10,000x the density of 30-day certificates)",
        "result": f"median round {inside:.2f} s while renewing ({len(during)} rounds), "
        f"{other:.2f} s otherwise ({len(outside)}): {per_renewal * 1e3:.0f} ms of round "
        f"time per renewal; spread over the window of 30-day certificates: "
        f"{extra * 1e3:.3f} ms per {other:.1f} s round",
        "target": "no visible effect on round time",
        "seconds": per_renewal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--revocations", type=int, default=20)
    parser.add_argument("--renewing-nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=24)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-trust-") as tmp:
        work = Path(tmp)
        (work / "app.py").write_text(APP)
        config = work / "fedge.toml"
        config.write_text(
            '[app]\ntarget = "app:create_app"\n[run]\nnum_clients = 100000\nrounds = 1\n'
        )
        if args.devices:
            with Launcher(work / "enroll", config) as fleet:
                rows.append(enrollment(fleet, args.devices))
        if args.revocations:
            with Launcher(work / "revoke", config) as fleet:
                fleet.server("--wait-for", str(args.revocations + 1))
                wait_for(fleet.status, "the server")
                rows.append(revocation(fleet, args.revocations))
        if args.renewing_nodes:
            rows.append(renewals(args.renewing_nodes, args.rounds, work / "renew"))
    report("trust", "Fleet trust: enrollment and revocation", rows)


if __name__ == "__main__":
    main()
