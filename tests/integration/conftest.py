"""Helpers for integration tests that start real fedge processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"
FEDGE = [sys.executable, "-m", "fedge"]
TIMEOUT = 60.0

# Wraps the digits app so that fit() sleeps: lets a test act while a round is running.
SLOW_APP = """
import time

import fedge
from app import create_app as _digits


def create_app(num_clients, seed, fit_delay=0.0, slow_round=0, **options):
    inner = _digits(num_clients, seed, **options)

    def client_fn(cid):
        client = inner.client_fn(cid)
        fit = client.fit

        def slow_fit(weights, config):
            if not slow_round or config.get("round") == slow_round:
                time.sleep(fit_delay)
            return fit(weights, config)

        client.fit = slow_fit
        return client

    return fedge.App(client_fn, inner.initial_weights, inner.evaluate_fn)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    directory: Path,
    *,
    num_clients: int = 4,
    rounds: int = 3,
    round_timeout: float = 60.0,
    fit_delay: float | None = None,
    slow_round: int = 0,
    fraction_evaluate: float = 0.5,
    strategy_extra: str = "",
    name: str = "fedge.toml",
) -> Path:
    """A copy of examples/digits/fedge.toml (and app.py) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(DIGITS / "app.py", directory / "app.py")
    options = 'partition = "iid", epochs = 5, batch_size = 16, lr = 0.5'
    target = "app:create_app"
    if fit_delay is not None:
        (directory / "slowapp.py").write_text(SLOW_APP)
        target = "slowapp:create_app"
        options += f", fit_delay = {fit_delay}, slow_round = {slow_round}"
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

            [strategy]
            name = "fedavg"
            fraction_evaluate = {fraction_evaluate}
            {strategy_extra}
            """
        )
    )
    return path


class Processes:
    """Every process a test starts; all are SIGTERMed, then SIGKILLed, at teardown."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cache = logs.parent / "cache"  # the nodes' model caches
        self.procs: list[subprocess.Popen[bytes]] = []
        self._files: list[Any] = []

    def start(
        self, name: str, *args: str | Path, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        self._files.append(log)
        proc = subprocess.Popen(
            [*FEDGE, *map(str, args)],
            cwd=cwd or self.logs,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(self.cache)},
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._files:
            f.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path / "logs")
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    from fedge.security import init_ca, issue

    certs = tmp_path / "pki"
    init_ca(certs)
    issue(certs, "server", server=True, hosts=["127.0.0.1", "localhost"])
    issue(certs, "admin")
    for cid in range(5):
        issue(certs, f"node-{cid}")
    return certs


def start_server(
    procs: Processes,
    config: Path,
    address: str,
    state: Path,
    out: Path,
    *,
    certs: Path | None,
    wait: int,
    name: str = "server",
    options: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    security = ["--certs", str(certs)] if certs is not None else ["--insecure"]
    return procs.start(
        name,
        "server",
        "--config", config,
        "--address", address,
        *security,
        "--state-dir", state,
        "--out", out,
        "--wait-for", str(wait),
        *options,
    )  # fmt: skip


def start_node(
    procs: Processes,
    config: Path,
    address: str,
    cid: int,
    certs: Path,
    name: str | None = None,
    *options: str,
) -> subprocess.Popen[bytes]:
    """A node with identity ``node-CID``; `name` names its log, `options` go before ``node``."""
    return procs.start(
        name or f"node-{cid}",
        *options,
        "node",
        "--server", address,
        "--config", config,
        "--cid", str(cid),
        "--certs", certs,
        "--name", f"node-{cid}",
    )  # fmt: skip


def finished(proc: subprocess.Popen[bytes], procs: Processes, name: str = "server") -> None:
    code = wait_exit(proc)
    assert code == 0, procs.log(name)


def wait_for(
    condition: Callable[[], Any], what: str, timeout: float = TIMEOUT, interval: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def status_or_none(address: str, certs: Path | None, insecure: bool = False) -> Any:
    from fedge.transport.grpc.control import fetch_status

    try:
        return fetch_status(address, certs, "admin", insecure, timeout=2.0)
    except grpc.RpcError:
        return None


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"process {proc.args} still running after {timeout:.0f} s") from None


def checkpoint_rounds(state_dir: Path) -> list[int]:
    d = state_dir / "checkpoints"
    if not d.exists():
        return []
    return sorted(int(p.name[6:12]) for p in d.glob("round-*.safetensors"))


SIM_SCRIPT = """
import json, sys
from pathlib import Path
from fedge.app import load_app
from fedge.config import load_config
from fedge.sim import simulate
from fedge.weights import to_bytes

cfg = load_config(sys.argv[1])
app = load_app(cfg.app.target, cfg.base_dir, num_clients=cfg.run.num_clients,
               seed=cfg.run.seed, **cfg.app.options)
h = simulate(app.client_fn, cfg.run.num_clients, cfg.run.rounds,
             strategy=cfg.build_strategy(), initial_weights=app.initial_weights,
             evaluate_fn=app.evaluate_fn, seed=cfg.run.seed, fit_config=cfg.fit,
             evaluate_config=cfg.evaluate, max_round_retries=cfg.run.max_round_retries)
out = Path(sys.argv[2])
out.with_suffix(".json").write_text(json.dumps(h.to_dict()))
out.with_suffix(".safetensors").write_bytes(to_bytes(h.weights))
"""


def simulate_config(config: Path, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the config's simulation in a fresh interpreter: (history dict, final weights)."""
    from fedge.weights import from_bytes

    run = subprocess.run(
        [sys.executable, "-c", SIM_SCRIPT, str(config), str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    history = json.loads(out.with_suffix(".json").read_text())
    weights = from_bytes(out.with_suffix(".safetensors").read_bytes())
    return history, dict(weights)


def assert_weights_close(a: Any, b: Any, tol: float = 1e-6) -> None:
    import numpy as np

    assert list(a) == list(b)
    for name in a:
        diff = float(np.max(np.abs(np.asarray(a[name], np.float64) - np.asarray(b[name]))))
        assert diff <= tol, f"tensor {name!r} differs by {diff}"


def assert_metrics_close(fleet: dict[str, Any], sim: dict[str, Any], tol: float = 1e-6) -> None:
    assert [r["round"] for r in fleet["rounds"]] == [r["round"] for r in sim["rounds"]]
    for f, s in zip(fleet["rounds"], sim["rounds"], strict=True):
        assert f["status"] == s["status"] == "ok", (f, s)
        assert set(f["metrics"]) == set(s["metrics"])
        for key in s["metrics"]:
            assert abs(f["metrics"][key] - s["metrics"][key]) <= tol, (f["round"], key)
