"""Fixtures for integration tests: real fedge processes on 127.0.0.1, started with the one
launcher (`fedge.launch`). Fleet behaviour tests take the `transport` fixture, so a new
transport runs them all by adding one parameter here (and its `Link` in `attacker`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.launch import FEDGE, Launcher, wait_for
from fedge.node.link import Link
from fedge.store.cephrgw import CephRGW
from fedge.store.s3server import S3Server

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"
TIMEOUT = 60.0
TRANSPORTS = ["grpc", "mqtt"]

# Wraps the digits app so that fit() sleeps (and says so in a file): lets a test act
# while a round is running, and know for sure that it is.
SLOW_APP = """
import time
from pathlib import Path

import fedge
from app import create_app as _digits


def create_app(num_clients, seed, fit_delay=0.0, slow_round=0, marker_dir="", **options):
    inner = _digits(num_clients, seed, **options)

    def client_fn(cid):
        client = inner.client_fn(cid)
        fit = client.fit

        def slow_fit(weights, config):
            if marker_dir:
                Path(marker_dir, f"fit-{config['round']}-{cid}").touch()
            if not slow_round or config.get("round") == slow_round:
                time.sleep(fit_delay)
            return fit(weights, config)

        client.fit = slow_fit
        return client

    return fedge.App(
        client_fn, inner.initial_weights, inner.evaluate_fn, onnx_model=inner.onnx_model
    )
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (moto's server mode) in its own process, for one test module."""
    with S3Server(tmp_path_factory.mktemp("s3") / "moto.log") as server:
        yield server


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephRGW]:
    """A real single-node Ceph cluster with a RADOS Gateway, for the whole session (it
    takes ~15 s to start): tests that take it are marked ``ceph`` (``make test-ceph``)."""
    with CephRGW(tmp_path_factory.mktemp("ceph") / "cluster") as cluster:
        yield cluster


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Launcher]:
    """A launcher over a digits config (4 clients, 3 rounds) in tmp_path, on the test's
    `transport` if it takes one; tests that need another config write one and pass it
    to `server`/`node`."""
    transport = "grpc"
    if "transport" in request.fixturenames:
        transport = request.getfixturevalue("transport")
    config = write_config(tmp_path / "app")
    with Launcher(tmp_path, config, transport=transport) as launcher:
        yield launcher


def attacker(fleet: Launcher, transport: str, identity: str) -> Link:
    """A node `Link` as `identity` (with its own project certificate), driven by hand: it
    sends whatever a hostile node would."""
    if transport == "grpc":
        from fedge.transport.grpc.link import GrpcLink

        if fleet.insecure:
            return GrpcLink(fleet.address, identity, None, insecure=True)
        return GrpcLink(fleet.address, identity, fleet.issue(identity))
    if transport == "mqtt":
        from fedge.transport.mqtt.link import MqttLink

        return MqttLink(fleet.broker_url(), identity, fleet.issue(identity))
    raise ValueError(transport)


def write_config(
    directory: Path,
    *,
    num_clients: int = 4,
    rounds: int = 3,
    round_timeout: float = 60.0,
    run_extra: str = "",
    fit_delay: float | None = None,
    slow_round: int = 0,
    marker_dir: Path | None = None,
    fraction_evaluate: float = 0.5,
    strategy: str = "fedavg",
    strategy_extra: str = "",
    extra: str = "",
    name: str = "fedge.toml",
) -> Path:
    """A copy of examples/digits (config and app.py) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(DIGITS / "app.py", directory / "app.py")
    options = 'partition = "iid", epochs = 5, batch_size = 16, lr = 0.5'
    target = "app:create_app"
    if fit_delay is not None or marker_dir is not None:
        (directory / "slowapp.py").write_text(SLOW_APP)
        target = "slowapp:create_app"
        options += f", fit_delay = {fit_delay or 0.0}, slow_round = {slow_round}"
        options += f', marker_dir = "{marker_dir or ""}"'
    path = directory / name
    path.write_text(
        textwrap.dedent(
            f"""\
            [app]
            target = "{target}"
            options = {{ {options} }}

            [run]
            num_clients = {num_clients}
            rounds = {rounds}
            seed = 0
            round_timeout = {round_timeout}
            {run_extra}

            [strategy]
            name = "{strategy}"
            fraction_evaluate = {fraction_evaluate}
            {strategy_extra}
            """
        )
        + textwrap.dedent(extra)
    )
    return path


def cli(fleet: Launcher, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``fedge ARGS`` as the operator or a device runs it, with the fleet's environment."""
    return subprocess.run(
        [*FEDGE, *map(str, args)], capture_output=True, text=True, env=fleet.env, timeout=60
    )


def finished(proc: subprocess.Popen[bytes], fleet: Launcher, name: str = "server") -> None:
    code = wait_exit(proc)
    assert code == 0, fleet.log(name)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"process {proc.args} still running after {timeout:.0f} s") from None


def checkpoint_rounds(fleet: Launcher) -> list[int]:
    found = sorted(fleet.state_dir.glob("runs/*/checkpoints/round-*.safetensors"))
    return sorted(int(p.name[6:12]) for p in found)


def latest_weights(fleet: Launcher) -> dict[str, np.ndarray]:
    from fedge.checkpoint import latest_checkpoint

    (run,) = (fleet.state_dir / "runs").iterdir()
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None
    return ckpt.weights


def simulate_config(config: Path, out: Path) -> tuple[dict[str, Any], bytes]:
    """`fedge sim` of the config in a fresh interpreter: (history dict, model file bytes)."""
    model = out.with_suffix(".safetensors")
    run = subprocess.run(
        [*FEDGE, "sim", "-q", "--config", config, "--out", out, "--model-out", model],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(out.read_text()), model.read_bytes()


def without_timings(history: dict[str, Any]) -> dict[str, Any]:
    """A history with its wall-clock fields removed: what must be equal across fleets."""
    rounds = [{k: v for k, v in r.items() if not k.endswith("_time")} for r in history["rounds"]]
    return {"initial_metrics": history["initial_metrics"], "rounds": rounds}


__all__ = ["TIMEOUT", "attacker", "wait_for"]
