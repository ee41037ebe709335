"""The Ray backend: the same models as in-process, bit for bit, through the API and the
CLI, on a local Ray and on a running cluster joined by address; nothing left running.

One Ray session (2 CPUs) serves the module; `fedge sim` runs join it by address, or
start and stop a Ray of their own. Every process Ray starts inherits a marker in its
environment, so a test can tell that none of them outlived its run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedge
from fedge import Client, Config, FitResult, Weights
from fedge.adapters.numpy import SoftmaxRegressionClient, softmax_weights
from fedge.errors import ConfigError
from fedge.sim import ClientFn
from fedge.strategy import FedAvg, FedBuff, FedProx
from fedge.strategy.base import Strategy
from fedge.weights import read_file

ray = pytest.importorskip("ray")
from fedge.sim_ray import start  # noqa: E402 (needs ray)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"
MARKER = "FEDGE_RAY_TEST"
CPUS = 2

# this module's classes reach the actors by value (the workers cannot import a test module)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def marked(marker: str) -> list[str]:
    """Processes other than this one whose environment holds ``MARKER=marker``."""
    wanted, found = f"{MARKER}={marker}".encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(f"{entry.name} {(entry / 'cmdline').read_bytes()[:80]!r}")
        except OSError:  # gone meanwhile, or a zombie
            continue
    return found


def gone(marker: str, within: float = 30.0) -> list[str]:
    """The marked processes still there after waiting up to `within` s for them to end."""
    ends = time.monotonic() + within
    while (left := marked(marker)) and time.monotonic() < ends:
        time.sleep(0.2)
    return left


def idle(within: float = 20.0) -> bool:
    """Whether all the session's CPUs are free (no actor holds one) within `within` s."""
    ends = time.monotonic() + within
    while ray.available_resources().get("CPU") != CPUS:
        if time.monotonic() > ends:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture(scope="module", autouse=True)
def ray_tmpdir() -> Iterator[Path]:
    """Ray's session files (logs, sockets) of this module's Rays, removed afterwards."""
    where = Path(tempfile.mkdtemp(prefix="fedge-ray-"))  # short: Ray's sockets live there
    os.environ["RAY_TMPDIR"] = str(where)
    yield where
    del os.environ["RAY_TMPDIR"]
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def session(ray_tmpdir: Path) -> Iterator[str]:
    """A local Ray for the module; its address. Afterwards, none of its processes runs."""
    marker = uuid.uuid4().hex
    os.environ[MARKER] = marker  # inherited by Ray's processes, not kept by this one
    try:
        assert start(num_cpus=CPUS) is True
    finally:
        del os.environ[MARKER]
    assert marked(marker), "Ray's processes should carry the marker"
    assert list(ray_tmpdir.glob("ray/session_*")), "Ray should keep its files there"
    yield str(ray.get_runtime_context().gcs_address)
    ray.shutdown()
    assert gone(marker) == []


# --- the API ------------------------------------------------------------------------------

RNG = np.random.default_rng(5)
TEACHER = RNG.normal(size=(6, 3))
XS = [RNG.normal(0.2 * c, size=(20 + 3 * c, 6)).astype(np.float32) for c in range(8)]
INITIAL = softmax_weights(6, 3)


def softmax(cid: int) -> Client:
    x = XS[cid]
    return SoftmaxRegressionClient(x, (x @ TEACHER).argmax(1), epochs=2, batch_size=4, lr=0.1)


def assert_same(a: Weights, b: Weights) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


def timeless(history: fedge.History) -> list[dict[str, object]]:
    return [
        {k: v for k, v in r.items() if not k.endswith("_time")} for r in history.to_dict()["rounds"]
    ]


@pytest.mark.parametrize(
    ("strategy", "faults"),
    [
        (FedAvg(fraction_fit=0.5, fraction_evaluate=0.5), {}),
        (FedProx(proximal_mu=0.1), {"stragglers": 0.4, "dropouts": 0.2}),
        (FedBuff(buffer_size=3, concurrency=5), {"speed_spread": 4.0}),  # one task at a time
    ],
    ids=["fedavg", "fedprox-faults", "fedbuff-clock"],
)
def test_ray_gives_the_model_and_history_of_in_process(
    session: str, strategy: Strategy, faults: dict[str, float]
) -> None:
    def run(backend: str) -> fedge.History:
        return fedge.simulate(
            lambda cid: softmax(cid),
            len(XS),
            3,
            strategy=strategy,
            initial_weights=INITIAL,
            seed=3,
            backend=backend,  # type: ignore[arg-type]
            max_round_retries=5,
            **faults,  # type: ignore[arg-type]
        )

    in_process, on_ray = run("inprocess"), run("ray")
    assert on_ray.weights is not None and in_process.weights is not None
    assert_same(on_ray.weights, in_process.weights)
    assert timeless(on_ray) == timeless(in_process)
    assert on_ray.weights["weight"].tobytes() != INITIAL["weight"].tobytes()
    assert idle(), "the run's actors are gone"


def test_the_model_goes_to_the_object_store_once_per_round_and_tasks_name_it(
    session: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedge.sim_ray

    puts: list[object] = []
    jobs: list[fedge.sim_ray.RayJob] = []
    put, imap = ray.put, fedge.sim_ray.RayPool.imap

    def counting_put(value: object) -> object:
        puts.append(value)
        return put(value)

    def recording_imap(pool: Any, batch: list[fedge.sim_ray.RayJob]) -> Any:
        jobs.extend(batch)
        return imap(pool, batch)

    monkeypatch.setattr(fedge.sim_ray.ray, "put", counting_put)
    monkeypatch.setattr(fedge.sim_ray.RayPool, "imap", recording_imap)
    everyone = FedAvg(fraction_evaluate=1.0)
    fedge.simulate(softmax, len(XS), 3, strategy=everyone, initial_weights=INITIAL, backend="ray")
    models = [p for p in puts if isinstance(p, dict)]
    assert len(puts) == len(models) + 1, "besides the models, only client_fn, once"
    assert len(jobs) == 3 * 2 * len(XS)  # a fit and an evaluate per client and round
    assert len(models) <= 2 * 3, "at most once per round for fit and once for evaluate"
    assert {type(job[2]) for job in jobs} == {str}, "tasks carry the version, not the weights"
    assert all(not isinstance(v, np.ndarray) for job in jobs for v in job[3].values())


class OddClientsFail(Client):
    def __init__(self, cid: int) -> None:
        self.cid = cid

    def fit(self, weights: Weights, config: Config) -> FitResult:
        if self.cid % 2:
            raise ValueError(f"sensor {self.cid} unplugged")
        weights["bias"] += 1  # in place: the actor's copy, never the model in the store
        return FitResult(weights, 10)


def test_a_client_exception_is_a_failure_of_that_client_only(session: str) -> None:
    history = fedge.simulate(OddClientsFail, 4, 2, initial_weights=INITIAL, backend="ray")
    assert [r.participants for r in history.rounds] == [[0, 2], [0, 2]]
    assert history.rounds[0].failures == {
        1: "client 1 raised ValueError: sensor 1 unplugged",
        3: "client 3 raised ValueError: sensor 3 unplugged",
    }
    assert history.weights is not None
    np.testing.assert_array_equal(history.weights["bias"], np.full(3, 2, np.float32))


class KillsItsWorker(Client):
    def __init__(self, cid: int) -> None:
        self.cid = cid

    def fit(self, weights: Weights, config: Config) -> FitResult:
        if self.cid == 1:
            os._exit(3)  # as a segfault or the OOM killer would: the actor's process ends
        return FitResult(weights, 10)


def test_a_worker_that_dies_fails_its_tasks_and_comes_back(session: str) -> None:
    # one actor, one task a call: 0 runs, 1 kills the actor (2 may be queued behind it and
    # fail too), 3 is sent once 1 has failed, and runs on the restarted actor. Ray may
    # lose 0's reply with the actor ("may or may not have been executed"): then 0 fails
    # too, as a result that never arrived must
    history = fedge.simulate(
        KillsItsWorker, 4, 2, initial_weights=INITIAL, backend="ray", workers=1
    )
    assert [r.status for r in history.rounds] == ["ok", "ok"]
    for record in history.rounds:
        assert 1 in record.failures and 3 in record.participants
        assert sorted([*record.participants, *record.failures]) == [0, 1, 2, 3]
        for cid, reason in record.failures.items():
            assert reason.startswith(f"client {cid}: the Ray worker failed: "), reason
            assert "\n" not in reason
    assert idle()


def test_workers_that_cannot_build_the_clients_say_why(session: str) -> None:
    def factory() -> ClientFn:
        raise ImportError("No module named 'sensors'")

    with pytest.raises(ConfigError) as raised:
        fedge.simulate(
            softmax, 2, 1, initial_weights=INITIAL, backend="ray", client_factory=factory
        )
    assert "the Ray workers could not build the clients" in str(raised.value)
    assert "No module named 'sensors'" in str(raised.value)
    lock = threading.Lock()
    with pytest.raises(ConfigError, match=r"Ray workers: cannot pickle '_thread\.lock'"):
        fedge.simulate(lambda c: lock and softmax(c), 2, 1, initial_weights=INITIAL, backend="ray")
    with pytest.raises(ConfigError, match="3 Ray actors of one CPU each, but the Ray cluster"):
        fedge.simulate(softmax, 2, 1, initial_weights=INITIAL, backend="ray", workers=3)
    assert idle()


# --- the CLI ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Weights]:
    """The digits example with 2 workers, and its model from an in-process `fedge sim`."""
    where = tmp_path_factory.mktemp("digits")
    shutil.copy(DIGITS / "app.py", where / "app.py")
    text = (DIGITS / "fedge.toml").read_text().replace("rounds = 5", "rounds = 3")
    (where / "fedge.toml").write_text(text.replace("[simulation]", "[simulation]\nworkers = 2"))
    sim(where, "--backend", "inprocess", "--model-out", where / "inprocess.safetensors")
    return where, read_file(where / "inprocess.safetensors")


def sim(where: Path, *args: str | Path, marker: str = "") -> subprocess.CompletedProcess[str]:
    # RAY_AUTH_MODE=token, as docs/simulation.md says a shell joining a cluster needs
    # (the session's Ray authenticates with the token in ~/.ray/auth_token)
    env = {**os.environ, MARKER: marker, "RAY_AUTH_MODE": "token"}
    run = subprocess.run(
        [sys.executable, "-m", "fedge", "sim", "-c", where / "fedge.toml", "-q", *map(str, args)],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    return run


def test_cli_on_a_local_ray_writes_the_in_process_model_and_stops_ray(
    digits: tuple[Path, Weights],
) -> None:
    where, in_process = digits
    marker = uuid.uuid4().hex
    sim(where, "--backend", "ray", "--model-out", where / "local.safetensors", marker=marker)
    assert_same(read_file(where / "local.safetensors"), in_process)
    assert gone(marker) == [], "fedge sim left Ray processes running"


def test_cli_joins_a_running_cluster_and_leaves_it_running(
    session: str, digits: tuple[Path, Weights]
) -> None:
    where, in_process = digits
    out = where / "joined.safetensors"
    sim(where, "--backend", "ray", "--ray-address", session, "--model-out", out)
    assert_same(read_file(out), in_process)
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == CPUS
    assert idle(), "its actors were stopped"
