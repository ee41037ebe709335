"""Model registry throughput: publish, then pull (with hash and signature checks), a
100 MB model through a directory and through a real S3 server (moto's server mode in
its own process) and, with --ceph, a real single-node Ceph RADOS Gateway started for the
run (`fedge.store.cephrgw`: a monitor, one BlueStore OSD on a file, radosgw).

    python benchmarks/store_bench.py [--mb 100] [--ceph]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedge.security import init_ca
from fedge.store import open_registry
from fedge.store.cephrgw import CephRGW
from fedge.store.s3server import S3Server
from fedge.weights import to_file

sys.path.insert(0, str(Path(__file__).parent))
from common import report

MB = 1e6


def cpu_seconds(pids: list[int]) -> float:
    """CPU time used so far by this process and the server's processes (all threads)."""
    total = time.process_time()
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(
    store: str, url: str, model: Path, pki: Path, tmp: Path, pids: list[int]
) -> dict[str, Any]:
    """Publish (hash, sign, upload) then pull (download, hash, verify) three times: the
    fastest of each (the machine is shared: the slower runs measure the neighbours), and
    the CPU time it took, in this process and the server's (what the time would be on
    free cores, at most, if nothing waited on the disk)."""
    registry = open_registry(url, sign_key=pki / "release.key", verify_keys=[pki / "release.pub"])
    size = model.stat().st_size
    rows = []
    for attempt in range(3):
        cpu, start = cpu_seconds(pids), time.perf_counter()
        registry.publish("bench", model, f"v{attempt}-{time.time_ns()}")
        published, published_cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu
        cpu, start = cpu_seconds(pids), time.perf_counter()
        registry.pull("bench", "latest", tmp / "pulled.safetensors")
        pulled, pulled_cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu
        rows.append((published, pulled, published_cpu, pulled_cpu))
        # the next publish must upload again: a new blob, not one already stored
        with model.open("r+b") as f:
            f.seek(size - 4)
            f.write(os.urandom(4))
    published, pulled = min(r[0] for r in rows), min(r[1] for r in rows)
    published_cpu, pulled_cpu = min(r[2] for r in rows), min(r[3] for r in rows)
    return {
        "store": store,
        "model_MB": size / MB,
        "publish_s": published,
        "publish_MB_per_s": size / MB / published,
        "pull_verified_s": pulled,
        "pull_MB_per_s": size / MB / pulled,
        "publish_cpu_s": published_cpu,
        "pull_cpu_s": pulled_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--ceph", action="store_true", help="measure a Ceph RGW too")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-store-bench-") as name:
        tmp = Path(name)
        init_ca(tmp / "pki")
        model = tmp / "model.safetensors"
        rng = np.random.default_rng(0)
        to_file({"w": rng.random(args.mb * 250_000, dtype=np.float32)}, model)
        rows.append(measure("file", f"file://{tmp / 'store'}", model, tmp / "pki", tmp, []))
        servers: list[tuple[str, Any]] = [("s3 (moto)", S3Server(tmp / "moto.log"))]
        if args.ceph:
            servers.append(("s3 (Ceph RGW)", CephRGW(tmp / "ceph")))
        for store, server in servers:
            with server:
                saved = dict(os.environ)
                os.environ.update(server.env)
                try:
                    server.create_bucket("bench")
                    url = "s3://bench/models"  # the endpoint comes from AWS_ENDPOINT_URL
                    rows.append(measure(store, url, model, tmp / "pki", tmp, server.pids))
                finally:
                    os.environ.clear()
                    os.environ.update(saved)
    report("store", f"Model registry: publish and verified pull of a {args.mb} MB model", rows)


if __name__ == "__main__":
    main()
