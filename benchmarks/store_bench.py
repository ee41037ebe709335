"""Model registry throughput: publish, then pull (with hash and signature checks), a
100 MB model through a directory and through a real S3 server (moto's server mode in
its own process; Ceph RGW too with --ceph ENDPOINT, credentials from the environment).

    python benchmarks/store_bench.py [--mb 100] [--ceph http://127.0.0.1:7480]
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
from fedge.store.s3server import S3Server
from fedge.weights import to_file

sys.path.insert(0, str(Path(__file__).parent))
from common import report

MB = 1e6


def measure(url: str, endpoint: str, model: Path, pki: Path, tmp: Path) -> dict[str, Any]:
    registry = open_registry(
        url, endpoint=endpoint, sign_key=pki / "release.key", verify_keys=[pki / "release.pub"]
    )
    size = model.stat().st_size
    rows = []
    for attempt in range(2):
        start = time.perf_counter()
        registry.publish("bench", model, f"v{attempt}-{time.time_ns()}")
        published = time.perf_counter() - start
        start = time.perf_counter()
        registry.pull("bench", "latest", tmp / "pulled.safetensors")
        pulled = time.perf_counter() - start
        rows.append((published, pulled))
        # the next publish must upload again: a new blob, not one already stored
        with model.open("r+b") as f:
            f.seek(size - 4)
            f.write(os.urandom(4))
    published, pulled = min(r[0] for r in rows), min(r[1] for r in rows)
    return {
        "store": url.split(":")[0] + ("" if not endpoint else f" ({endpoint})"),
        "model_MB": size / MB,
        "publish_s": published,
        "publish_MB_per_s": size / MB / published,
        "pull_verified_s": pulled,
        "pull_MB_per_s": size / MB / pulled,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--ceph", default="", help="a Ceph RGW endpoint to measure too")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-store-bench-") as name:
        tmp = Path(name)
        init_ca(tmp / "pki")
        model = tmp / "model.safetensors"
        rng = np.random.default_rng(0)
        to_file({"w": rng.random(args.mb * 250_000, dtype=np.float32)}, model)
        rows.append(measure(f"file://{tmp / 'store'}", "", model, tmp / "pki", tmp))
        saved = dict(os.environ)
        with S3Server(tmp / "moto.log") as s3:
            os.environ.update(s3.env)
            s3.create_bucket("bench")
            rows.append(measure("s3://bench/models", s3.endpoint, model, tmp / "pki", tmp))
        os.environ.clear()
        os.environ.update(saved)  # Ceph's credentials are the caller's
        if args.ceph:
            rows.append(measure("s3://bench/models", args.ceph, model, tmp / "pki", tmp))
    report("store", f"Model registry: publish and verified pull of a {args.mb} MB model", rows)


if __name__ == "__main__":
    main()
