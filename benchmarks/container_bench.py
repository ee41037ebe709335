"""The container images at work (`make test-images`), run as the Kubernetes manifests
say: the containers of deploy/k8s/overlays/k3s-edge, rendered by kustomize, are started
with Podman (host network) with their images, commands, arguments, environment, user,
read-only root filesystem, dropped capabilities and mounts, the volumes filled as
Kubernetes would (ConfigMaps from the rendered output, Secrets from a fresh CA). The
server and two edge nodes (their init container first) train over mutual TLS; each
container's HEALTHCHECK is asked while it runs; then `fedge serve` follows the models the
server published (read-only) and answers an inference request. Reports the images' sizes
(issue 12: node image ≤ 300 MB without PyTorch) and the run. Not part of `make test`:
building and running images takes minutes.

    python benchmarks/container_bench.py [--rounds 3] [--keep]

What Kubernetes does and this does not: resource limits, probes (the HEALTHCHECK stands
in), NetworkPolicies, Pod Security admission (tests/deploy checks the manifests for it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from common import ROOT, report

from fedge.security import init_ca, issue

OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "k3s-edge"
BASE_IMAGE = "localhost/fedge-base:bookworm"
UID = 10001
EDGE = ["edge-1", "edge-2"]  # the Kubernetes node names overlays/k3s-edge gives client ids


def podman(*args: str, check: bool = True, timeout: float = 120) -> str:
    run = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and run.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: exit {run.returncode}: {run.stderr[-2000:]}")
    return run.stdout.strip()


def logs(name: str) -> str:
    run = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=60)
    return (run.stdout + run.stderr)[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_mb(image: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image)) / 1e6


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


def rendered() -> dict[tuple[str, str], dict[str, Any]]:
    """The overlay's resources by (kind, name), as `kubectl kustomize` renders them;
    generated ConfigMaps also under their name without kustomize's hash."""
    beside = Path(sys.executable).parent / "kubectl"
    kubectl = str(beside) if beside.exists() else shutil.which("kubectl") or "kubectl"
    out = subprocess.run(
        [kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, check=True
    ).stdout
    docs = {}
    for doc in yaml.safe_load_all(out):
        name = doc["metadata"]["name"]
        docs[doc["kind"], name] = doc
        if doc["kind"] == "ConfigMap":
            docs[doc["kind"], name.rsplit("-", 1)[0]] = doc
    return docs


def start(
    name: str,
    pod: dict[str, Any],
    container: dict[str, Any],
    volumes: dict[str, Path],
    env: dict[str, str] | None = None,
    replace: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
    detach: bool = True,
) -> str:
    """`container` of `pod` under podman as Kubernetes would run it; `volumes` are the
    host directories standing in for the pod's volumes, `env` sets variables the
    cluster would fill in, `replace` rewrites arguments (addresses: host network)."""
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    user = (
        f"{sc.get('runAsUser', pod_sc['runAsUser'])}:{sc.get('runAsGroup', pod_sc['runAsGroup'])}"
    )
    options = ["--name", name, "--network=host", f"--user={user}", "--health-interval=disable"]
    if sc.get("readOnlyRootFilesystem"):
        options.append("--read-only")
    options += [f"--cap-drop={cap}" for cap in sc.get("capabilities", {}).get("drop", [])]
    if sc.get("allowPrivilegeEscalation") is False:
        options.append("--security-opt=no-new-privileges")
    for mount in container.get("volumeMounts", []):
        ro = ":ro" if mount.get("readOnly") else ""
        options += ["-v", f"{volumes[mount['name']]}:{mount['mountPath']}{ro}"]
    given = env or {}
    for variable in container.get("env", []):
        value = given.get(variable["name"], variable.get("value"))
        assert value is not None, f"{name}: set {variable['name']} (valueFrom in the manifest)"
        options += ["-e", f"{variable['name']}={value}"]
    command = container.get("command", [])
    if command:
        options += ["--entrypoint", command[0]]
    args = [*command[1:], *container.get("args", []), *extra]
    for old, new in (replace or {}).items():
        args = [a.replace(old, new) for a in args]
    if not detach:
        run = subprocess.run(
            ["podman", "run", *options, container["image"], *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, f"{name} exited {run.returncode}: {run.stderr[-2000:]}"
        return name
    podman("run", "-d", *options, container["image"], *args)
    return name


def config_map(docs: dict[tuple[str, str], dict[str, Any]], name: str, into: Path) -> Path:
    into.mkdir()
    for key, value in docs["ConfigMap", name]["data"].items():
        (into / key).write_text(value)
    return into


def files(into: Path, *sources: Path) -> Path:
    """A Secret's volume: these files in one directory."""
    into.mkdir()
    for source in sources:
        shutil.copy(source, into / source.name)
    return into


def owned(path: Path) -> Path:
    """`path` and everything under it owned by the pods' user (Kubernetes: fsGroup)."""
    for p in [path, *path.rglob("*")]:
        os.chown(p, UID, UID)
    return path


def run_all(work: Path, rounds: int) -> dict[str, Any]:
    docs = rendered()
    pki = work / "pki"
    init_ca(pki)
    issue(pki, "server", role="server", hosts=["127.0.0.1", "localhost"])
    for node in EDGE:
        issue(pki, node, days=365)
    app = config_map(docs, "fedge-app", work / "app")
    text = (app / "fedge.toml").read_text().replace("rounds = 5", f"rounds = {rounds}")
    assert f"rounds = {rounds}" in text
    (app / "fedge.toml").write_text(text)
    cids = config_map(docs, "fedge-cids", work / "cids")
    assert sorted(p.name for p in cids.iterdir()) == EDGE
    server_certs = files(
        work / "server-certs",
        *(pki / f for f in ("ca.crt", "server.crt", "server.key", "issuing.crt", "issuing.key")),
        pki / "release.key",
    )
    node_certs = files(
        work / "node-certs",
        pki / "ca.crt",
        *(pki / f"{n}.{e}" for n in EDGE for e in ("crt", "key")),
    )
    ca = files(work / "ca", pki / "ca.crt", pki / "release.pub")
    empty = {}
    for name in ["state", "models", "server-tmp", "serve-cache", "serve-tmp"] + [
        f"{kind}-{n}" for n in EDGE for kind in ("certs", "cache", "tmp")
    ]:
        (work / name).mkdir()
        empty[name] = work / name
    owned(work)

    port, health, http, metrics = free_port(), free_port(), free_port(), free_port()
    statefulset = docs["StatefulSet", "fedge-server"]["spec"]["template"]["spec"]
    (server_container,) = statefulset["containers"]
    started = time.perf_counter()
    server = start(
        "fedge-bench-server", statefulset, server_container,
        {"state": empty["state"], "models": empty["models"], "app": app,
         "certs": server_certs, "tmp": empty["server-tmp"]},
        replace={
            "0.0.0.0:9091": f"127.0.0.1:{port}",
            "0.0.0.0:9094": f"127.0.0.1:{health}",
            "--metrics-port=9464": f"--metrics-port={metrics}",
            "--metrics-host=0.0.0.0": "--metrics-host=127.0.0.1",
        },
        extra=("--out=/var/lib/fedge/state/results.json",),
    )  # fmt: skip
    wait(lambda: healthy(server), "the server container's health check", 120)
    serving = time.perf_counter() - started
    server_metrics = scrape(metrics, "fedge_build_info")

    daemonset = docs["DaemonSet", "fedge-node"]["spec"]["template"]["spec"]
    (init,), (node_container,) = daemonset["initContainers"], daemonset["containers"]
    nodes, node_metrics = [], []
    for node in EDGE:
        volumes = {
            "app": app, "cids": cids, "node-certs": node_certs,
            "certs": empty[f"certs-{node}"], "cache": empty[f"cache-{node}"],
            "tmp": empty[f"tmp-{node}"],
        }  # fmt: skip
        env = {"NODE_NAME": node, "FEDGE_SERVER": f"127.0.0.1:{port}"}
        start(f"fedge-bench-init-{node}", daemonset, init, volumes, env, detach=False)
        node_metrics.append(free_port())
        replace = {
            "--metrics-port=9465": f"--metrics-port={node_metrics[-1]}",
            "--metrics-host=0.0.0.0": "--metrics-host=127.0.0.1",
        }
        nodes.append(start(f"fedge-bench-{node}", daemonset, node_container, volumes, env, replace))
    nodes_healthy = all(healthy(n) for n in nodes)
    code = int(podman("wait", server, timeout=600))
    elapsed = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"the server exited {code}:\n{logs(server)}")
    history = json.loads((empty["state"] / "results.json").read_text())
    records = history["rounds"]
    assert [r["round"] for r in records] == list(range(1, rounds + 1)), records
    assert all(r["participants"] == [0, 1] for r in records), records
    joins = [scrape(m, "fedge_node_joins_total") for m in node_metrics]

    deployment = docs["Deployment", "fedge-serve"]["spec"]["template"]["spec"]
    (serve_container,) = deployment["containers"]
    serve = start(
        "fedge-bench-serve", deployment, serve_container,
        {"models": empty["models"], "ca": ca, "cache": empty["serve-cache"],
         "tmp": empty["serve-tmp"]},
        replace={"--host=0.0.0.0": "--host=127.0.0.1", "--port=8080": f"--port={http}"},
    )  # fmt: skip
    outputs = infer(http)
    return {
        "server_ready_s": serving,
        "run_s": elapsed,
        "rounds": rounds,
        "accuracy_initial": history["initial_metrics"]["accuracy"],
        "accuracy_final": records[-1]["metrics"]["accuracy"],
        "nodes_healthy": nodes_healthy,
        "server_build_info": server_metrics,
        "node_joins": joins,
        "serve_healthy": healthy(serve),
        "serve_outputs": outputs,
    }


def scrape(port: int, series: str) -> float:
    """The value of `series` (no labels, or its first sample) at /metrics on `port`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith(series) and line[len(series)] in " {":
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {series} in /metrics on port {port}")


def infer(port: int) -> dict[str, list[int]]:
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
    return outputs


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
    names = ["fedge-bench-server", "fedge-bench-serve"]
    names += [f"fedge-bench-{kind}{n}" for n in EDGE for kind in ("", "init-")]
    podman("rm", "--force", "--ignore", *names, check=False)
    work = Path(tempfile.mkdtemp(prefix="fedge-containers-"))
    try:
        run = run_all(work, args.rounds)
    except BaseException:
        for name in names:
            print(f"--- {name}\n{logs(name)}")
        raise
    finally:
        podman("rm", "--force", "--ignore", *names, check=False)
        if not args.keep:
            shutil.rmtree(work)
    docs = rendered()
    image = {
        kind: docs[kind, name]["spec"]["template"]["spec"]["containers"][0]["image"]
        for kind, name in (("DaemonSet", "fedge-node"), ("StatefulSet", "fedge-server"))
    }
    node, full = image["DaemonSet"], image["StatefulSet"]
    rows = [  # sizes as podman counts them (uncompressed layers)
        {"image": f"{node} (node)", "MB": image_mb(node), "target MB": 300},
        {"image": f"{full} (server, serve)", "MB": image_mb(full), "target MB": "-"},
        {
            "image": f"{BASE_IMAGE} (Debian 12, Python)",
            "MB": image_mb(BASE_IMAGE),
            "target MB": "-",
        },
    ]
    report("containers", "Container images (Podman) and a containerised fleet", rows, run=run)
    print(
        f"server healthy after {run['server_ready_s']:.1f} s; {run['rounds']} rounds in "
        f"{run['run_s']:.1f} s from the server's start; accuracy {run['accuracy_initial']:.3f}"
        f" -> {run['accuracy_final']:.3f}; nodes healthy: {run['nodes_healthy']}; node joins "
        f"(their /metrics): {run['node_joins']}; serve "
        f"healthy: {run['serve_healthy']}, outputs {run['serve_outputs']}"
    )


if __name__ == "__main__":
    main()
