"""The container images at work (`make test-images`): a server and two node containers
from `make images` (Podman, host network, read-only root filesystems, no capabilities,
uid 10001) train the app the Kubernetes manifests deploy (deploy/k8s/base/app) over
mutual TLS; the containers' HEALTHCHECK is asked while they run; then a `fedge serve`
container follows the models the server published (read-only) and answers an inference
request. Reports the images' sizes (issue 12: node image ≤ 300 MB without PyTorch) and
the run. Not part of `make test`: building and running images takes minutes.

    python benchmarks/container_bench.py [--rounds 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import ROOT, report

from fedge.security import init_ca, issue

VERSION = "0.1.0"
NODE_IMAGE = f"localhost/fedge-node:{VERSION}"
IMAGE = f"localhost/fedge:{VERSION}"
BASE_IMAGE = "localhost/fedge-base:bookworm"
UID = 10001
HARDENED = [  # what the restricted Pod Security profile asks, as podman options
    "--network=host",
    "--read-only",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    f"--user={UID}:{UID}",
    "--health-interval=disable",  # asked by hand below: no systemd timers here
]


def podman(*args: str, check: bool = True, timeout: float = 120) -> str:
    run = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and run.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: exit {run.returncode}: {run.stderr[-2000:]}")
    return run.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def logs(name: str) -> str:
    run = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=60)
    return (run.stdout + run.stderr)[-3000:]


def image_mb(image: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image)) / 1e6


def owned(path: Path) -> Path:
    """`path` and everything under it, owned by the containers' user."""
    for p in [path, *path.rglob("*")]:
        os.chown(p, UID, UID)
    return path


def healthy(name: str) -> bool:
    run = subprocess.run(
        ["podman", "healthcheck", "run", name], capture_output=True, text=True, timeout=60
    )
    return run.returncode == 0


def wait(condition: Any, what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def setup(work: Path, rounds: int) -> None:
    pki = work / "pki"
    init_ca(pki)
    issue(pki, "server", role="server", hosts=["127.0.0.1", "localhost"])
    for cid in range(2):
        issue(pki, f"node-{cid}")
        mine = work / f"certs-{cid}"  # writable: a node renews its certificate here
        mine.mkdir()
        for name in ("ca.crt", f"node-{cid}.crt", f"node-{cid}.key"):
            shutil.copy(pki / name, mine / name)
        (work / f"cache-{cid}").mkdir()
    shutil.copytree(ROOT / "deploy" / "k8s" / "base" / "app", work / "app")
    config = work / "app" / "fedge.toml"
    text = config.read_text().replace("rounds = 5", f"rounds = {rounds}")
    assert f"rounds = {rounds}" in text
    config.write_text(text)
    for name in ("state", "models", "serve-cache"):
        (work / name).mkdir()
    owned(work)


def run_fleet(work: Path, rounds: int) -> dict[str, Any]:
    port, health = free_port(), free_port()
    server = "fedge-bench-server"
    started = time.perf_counter()
    podman(
        "run", "-d", "--name", server, *HARDENED,
        "-v", f"{work / 'pki'}:/etc/fedge/certs:ro",
        "-v", f"{work / 'app'}:/etc/fedge/app:ro",
        "-v", f"{work / 'state'}:/var/lib/fedge/state",
        "-v", f"{work / 'models'}:/var/lib/fedge/models",
        IMAGE, "--log-level=info", "server",
        "--config=/etc/fedge/app/fedge.toml",
        f"--address=127.0.0.1:{port}", f"--health-address=127.0.0.1:{health}",
        "--certs=/etc/fedge/certs", "--state-dir=/var/lib/fedge/state",
        "--out=/var/lib/fedge/state/results.json",
    )  # fmt: skip
    wait(lambda: healthy(server), "the server container's health check", 120)
    serving = time.perf_counter() - started
    nodes = []
    for cid in range(2):
        name = f"fedge-bench-node-{cid}"
        podman(
            "run", "-d", "--name", name, *HARDENED,
            "-v", f"{work / f'certs-{cid}'}:/var/lib/fedge/certs",
            "-v", f"{work / f'cache-{cid}'}:/var/cache/fedge",
            "-v", f"{work / 'app'}:/etc/fedge/app:ro",
            NODE_IMAGE, "--log-level=info", "node",
            f"--server=127.0.0.1:{port}", f"--cid={cid}", f"--name=node-{cid}",
            "--certs=/var/lib/fedge/certs", "--cache-dir=/var/cache/fedge",
            "--config=/etc/fedge/app/fedge.toml",
        )  # fmt: skip
        nodes.append(name)
    nodes_healthy = all(healthy(n) for n in nodes)
    code = int(podman("wait", server, timeout=600))
    elapsed = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"the server exited {code}:\n{logs(server)}")
    history = json.loads((work / "state" / "results.json").read_text())
    records = history["rounds"]
    assert [r["round"] for r in records] == list(range(1, rounds + 1)), records
    assert all(r["participants"] == [0, 1] for r in records), records
    return {
        "server_ready_s": serving,
        "run_s": elapsed,
        "rounds": rounds,
        "accuracy_initial": history["initial_metrics"]["accuracy"],
        "accuracy_final": records[-1]["metrics"]["accuracy"],
        "nodes_healthy": nodes_healthy,
    }


def run_serve(work: Path) -> dict[str, Any]:
    port = free_port()
    name = "fedge-bench-serve"
    podman(
        "run", "-d", "--name", name, *HARDENED,
        "-v", f"{work / 'models'}:/var/lib/fedge/models:ro",
        "-v", f"{work / 'pki' / 'release.pub'}:/etc/fedge/ca/release.pub:ro",
        "-v", f"{work / 'serve-cache'}:/var/cache/fedge",
        IMAGE, "serve", "--model=synthetic", "--store=file:///var/lib/fedge/models",
        "--release-key=/etc/fedge/ca/release.pub", "--host=127.0.0.1", f"--port={port}",
        "--cache-dir=/var/cache/fedge", "--threads=1",
    )  # fmt: skip

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                return True
        except OSError:
            return False

    wait(ready, "fedge serve to load the published model", 120)
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 60], "data": [0.1] * 120}]}
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/synthetic/infer",
        data=body,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        outputs = {o["name"]: o["shape"] for o in json.loads(reply.read())["outputs"]}
    assert outputs["probabilities"] == [2, 10], outputs
    return {"serve_healthy": healthy(name), "serve_outputs": outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    conf = subprocess.run(
        [str(ROOT / "scripts" / "podman-conf.sh"), BASE_IMAGE],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if conf:
        os.environ["CONTAINERS_CONF"] = conf
    names = ["fedge-bench-server", "fedge-bench-node-0", "fedge-bench-node-1", "fedge-bench-serve"]
    podman("rm", "--force", "--ignore", *names, check=False)
    work = Path(tempfile.mkdtemp(prefix="fedge-containers-"))
    try:
        setup(work, args.rounds)
        run = run_fleet(work, args.rounds) | run_serve(work)
    except BaseException:
        for name in names:
            print(f"--- {name}\n{logs(name)}")
        raise
    finally:
        podman("rm", "--force", "--ignore", *names, check=False)
        if not args.keep:
            shutil.rmtree(work)
    rows = [  # sizes as podman counts them (uncompressed layers)
        {"image": "fedge-node (node; core only)", "MB": image_mb(NODE_IMAGE), "target MB": 300},
        {"image": "fedge (server, serve)", "MB": image_mb(IMAGE), "target MB": "-"},
        {"image": "fedge-base (Debian, Python)", "MB": image_mb(BASE_IMAGE), "target MB": "-"},
    ]  # fmt: skip
    report("containers", "Container images (Podman) and a containerised fleet", rows, run=run)
    print(
        f"server healthy after {run['server_ready_s']:.1f} s; {run['rounds']} rounds in "
        f"{run['run_s']:.1f} s from the server's start; accuracy {run['accuracy_initial']:.3f}"
        f" -> {run['accuracy_final']:.3f}; nodes healthy: {run['nodes_healthy']}; serve "
        f"healthy: {run['serve_healthy']}, outputs {run['serve_outputs']}"
    )


if __name__ == "__main__":
    main()
