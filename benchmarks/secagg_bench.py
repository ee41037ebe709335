"""Secure aggregation cost: a SecAgg+ round against a plain FedAvg round, in simulation.

100 clients × 100k float32 parameters, 10% of them dropping after they shared their
secrets (they never send their masked input: the costliest dropout for the server, which
must rebuild their mask keys and remove the masks their neighbours shared with them).
Local training is a fixed random step, so the numbers are the protocol's own cost; with
real training the ratio only falls: --train-ms adds busy work per fit, --mnist1d trains
a 100,010-parameter MLP on MNIST-1D for real.
Median of --repeats rounds after a warm-up round each.

With --fleet N the same comparison runs on a real fleet instead: a `fedge server` and N
`fedge node` processes over mutual TLS on this machine, no dropout, the median round of
--repeats rounds after the first (`wall_time - wait_time` of the server's history). Every
node's share of the protocol then runs in its own process, as on real devices — here on
2 cores, so the nodes' crypto still competes for CPU.

Usage: python benchmarks/secagg_bench.py [--clients 100] [--params 100000] [--repeats 3]
       python benchmarks/secagg_bench.py --mnist1d
       python benchmarks/secagg_bench.py --fleet 20 [--params 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

import fedge
from fedge.app import App
from fedge.client import Client, ClientWrapper, Config, FitResult, Message, Result
from fedge.launch import Launcher
from fedge.secure_aggregation import MASKED, Settings, secured
from fedge.strategy import FedAvg
from fedge.weights import Weights

sys.path.insert(0, str(Path(__file__).parent))
from common import report


class Step(Client):
    """A fixed random step (drawn once per client: a client object is made per task),
    plus `busy` seconds of work standing in for training."""

    steps: ClassVar[dict[tuple[int, int], np.ndarray]] = {}

    def __init__(self, cid: int, params: int, busy: float) -> None:
        if (cid, params) not in self.steps:
            rng = np.random.default_rng(cid)
            self.steps[cid, params] = rng.normal(0, 0.1, params).astype(np.float32)
        self.delta, self.busy = self.steps[cid, params], busy

    def fit(self, weights: Weights, config: Config) -> FitResult:
        until = time.perf_counter() + self.busy
        while time.perf_counter() < until:
            pass
        return FitResult({"w": weights["w"] + self.delta}, 10, {})


class DropsAtMasking(ClientWrapper):
    def handle(self, message: Message) -> Result:
        if message.kind == MASKED:
            raise ConnectionError("gone before sending its masked input")
        return self.inner.handle(message)


@functools.cache
def mnist1d_parts(clients: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from fedge.datasets import load_mnist1d

    x, y, _, _ = load_mnist1d(num_samples=20_000, seed=42)
    return [(x[i::clients], y[i::clients]) for i in range(clients)]


def mnist1d_mlp(clients: int) -> tuple[Callable[[int], Client], Weights]:
    """Real training: a 40-1960-10 MLP (100,010 parameters) fit as the attack benchmark
    fits MNIST-1D (2 epochs, batches of 32, NumPy), each client on 1/clients of its
    16,000 training examples."""
    from byzantine_bench import MLPClient

    parts = mnist1d_parts(clients)
    rng = np.random.default_rng(0)
    initial = {
        "w1": (rng.standard_normal((40, HIDDEN)) * np.sqrt(2 / 40)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.standard_normal((HIDDEN, 10)) * np.sqrt(2 / HIDDEN)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    return (lambda cid: MLPClient(*parts[cid], epochs=2, batch_size=32, lr=0.1)), initial


HIDDEN = 1960  # 40 * 1960 + 1960 + 1960 * 10 + 10 = 100,010 parameters


def one_round(
    clients: int, params: int, dropped: set[int], secure: bool, busy: float, mlp: bool = False
) -> tuple[float, Weights]:
    """Wall time of one simulated round and the global model after it; `mlp`: the
    MNIST-1D MLP's real training instead of a fixed step."""
    strategy = FedAvg(clients_per_round=clients)
    if mlp:
        base, initial = mnist1d_mlp(clients)
    else:
        initial = {"w": np.zeros(params, np.float32)}

        def base(cid: int) -> Client:
            return Step(cid, params, busy)

    app = App(base, initial)
    if secure:
        app = secured(app, Settings(), strategy)
    inner = app.client_fn

    def client_fn(cid: int) -> Client:
        client = inner(cid)
        return DropsAtMasking(client) if cid in dropped and secure else client

    # plain FedAvg: the dropped clients never answer either
    plain_clients = clients if secure else clients - len(dropped)
    started = time.perf_counter()
    history = fedge.simulate(
        client_fn, plain_clients, 1, strategy=FedAvg(clients_per_round=plain_clients),
        initial_weights=initial, workflow=app.workflow, max_round_retries=0,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert history.rounds[-1].status == "ok", history.rounds[-1].reason
    assert history.weights is not None
    return elapsed, history.weights


FLEET_APP = """
import numpy as np
import fedge

class Step(fedge.Client):
    def __init__(self, cid):
        self.delta = np.random.default_rng(cid).normal(0, 0.1, PARAMS).astype(np.float32)

    def fit(self, weights, config):
        return fedge.FitResult({"w": weights["w"] + self.delta}, 10, {})

def create_app(num_clients, seed):
    return fedge.App(Step, {"w": np.zeros(PARAMS, np.float32)})
"""
FLEET_CONFIG = """
[app]
target = "app:create_app"
[run]
rounds = ROUNDS
num_clients = NODES
round_timeout = 120
seed = 0
[strategy]
name = "fedavg"
fraction_evaluate = 0.0
"""
SECURE = """
[secure_aggregation]
enabled = true
"""


def fleet_rounds(nodes: int, params: int, rounds: int, secure: bool) -> list[float]:
    """Work seconds of each round of a real fleet run, first round left out."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "app.py").write_text(textwrap.dedent(FLEET_APP).replace("PARAMS", str(params)))
        text = FLEET_CONFIG.replace("ROUNDS", str(rounds)).replace("NODES", str(nodes))
        config = work / "fedge.toml"
        config.write_text(text + (SECURE if secure else ""))
        with Launcher(work, config) as fleet:
            out = work / "out.json"
            server = fleet.server("--wait-for", str(nodes), "--out", out)
            for cid in range(nodes):
                fleet.node(cid)
            if server.wait(timeout=600) != 0:
                raise RuntimeError(fleet.log("server"))
        history = json.loads(out.read_text())
    assert all(r["status"] == "ok" for r in history["rounds"]), history["rounds"]
    return [r["wall_time"] - r["wait_time"] for r in history["rounds"][1:]]


def fleet_main(nodes: int, params: int, repeats: int) -> None:
    plain = statistics.median(fleet_rounds(nodes, params, repeats + 1, secure=False))
    secure = statistics.median(fleet_rounds(nodes, params, repeats + 1, secure=True))
    rows: list[dict[str, Any]] = [
        {"round": "plain FedAvg", "nodes": nodes, "seconds": plain, "vs plain": 1.0},
        {"round": "SecAgg+", "nodes": nodes, "seconds": secure, "vs plain": secure / plain},
    ]
    report(
        "secagg_fleet",
        f"SecAgg+ vs plain FedAvg on a real fleet (mutual TLS): {nodes} node processes × "
        f"{params:,} params (median of {repeats} rounds)",
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-ms", type=float, default=0.0, help="busy work per fit")
    parser.add_argument("--fleet", type=int, default=0, help="nodes of a real fleet")
    parser.add_argument(
        "--mnist1d", action="store_true", help="real training: the MNIST-1D MLP, 100k params"
    )
    args = parser.parse_args()
    if args.fleet:
        return fleet_main(args.fleet, args.params, args.repeats)
    dropped = set(range(0, args.clients, round(1 / args.dropout))) if args.dropout else set()
    busy = args.train_ms / 1000
    times: dict[str, list[float]] = {"plain": [], "secure": []}
    for _ in range(args.repeats + 1):  # the first of each is a warm-up
        for kind in times:
            times[kind].append(
                one_round(args.clients, args.params, dropped, kind == "secure", busy, args.mnist1d)[
                    0
                ]
            )
    plain, secure = (statistics.median(t[1:]) for t in times.values())
    rows: list[dict[str, Any]] = [
        {"round": "plain FedAvg", "clients": args.clients - len(dropped), "seconds": plain,
         "vs plain": 1.0},
        {"round": f"SecAgg+ ({len(dropped)} dropped after sharing)", "clients": args.clients,
         "seconds": secure, "vs plain": secure / plain},
    ]  # fmt: skip
    training = "MNIST-1D MLP" if args.mnist1d else f"train {args.train_ms:g} ms per fit"
    report(
        "secagg_mnist1d" if args.mnist1d
        else f"secagg_train{args.train_ms:g}ms" if args.train_ms else "secagg",
        f"SecAgg+ vs plain FedAvg: {args.clients} clients × "
        f"{100_010 if args.mnist1d else args.params:,} params, {training} "
        f"(simulation, median of {args.repeats})",
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
