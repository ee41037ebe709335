"""Byzantine clients: final accuracy per attack and defense on digits and MNIST-1D.

50 clients, an IID split of each training set, all 50 train every round (in-process);
5 (10%) or 10 (20%) of them are malicious. Digits (1,437 training examples, ~29 a
client) trains the digits example's softmax regression, 20 rounds of 5 local epochs.
MNIST-1D is generated with 20,000 samples (16,000 to train, 320 a client; the published
set's 5,000 left 80 a client, whose updates were so noisy that no rule could tell a
flipped one apart) and trains a small NumPy MLP (40-64-10; the example's CNN costs ~10
ms a fit, too slow for ~300 runs), 30 rounds of 2 local epochs. Attacks are malicious
`Client` wrappers (label flipping is the same client on flipped labels, y -> 9 - y):

- sign flipping: the client's honest delta, negated;
- scaling x10: trained on flipped labels, the delta boosted x10 (Bhagoji et al. 2019's
  explicit boosting, https://arxiv.org/abs/1811.12470);
- Gaussian noise: the model plus N(0, 10^2) per weight, no training (at N(0, 1) neither
  model noticed);
- label flipping: trained on flipped labels, sent as it is;
- a little is enough (Baruch et al. 2019, https://arxiv.org/abs/1902.06156): mean - z std
  per coordinate with the paper's z_max for n and f;
- inner-product manipulation (Xie et al. 2020, https://arxiv.org/abs/1903.03936):
  -eps times the mean; eps = 0.5 (aimed at the robust rules) and eps = 10 (past
  (n - f) / f, where it turns the mean around);
- count lie: the sign-flipped delta, claiming 1,000,000 examples (limits.max_examples).

ALIE and IPM are the papers' non-omniscient variants: the mean and std are those of the
attackers' own honest deltas, which the colluders compute in the round from their own
data (each trains honestly with its own seed, so the attack is deterministic); they never
see an honest client's update. Defenses: FedAvg, FedMedian, FedTrimmedAvg (beta 0.2),
Krum, Multi-Krum (m = n - f), Bulyan (each told f), norm bounding (clip_updates around
FedAvg at the median honest delta norm of a clean first round) and centered clipping
(radius: the median distance). Every defense runs with limits.example_weights =
"reported", the default; "fedavg capped" is FedAvg with example_weights = "capped" at the
largest honest count, run against the count lie only (elsewhere it is FedAvg). A clean
run (no attacker) per defense gives the reference.

Secure and robust (--secure): the same runs through the real SecAgg+ workflow
(`fedge.secure_aggregation.secured`, as a fleet runs it) in G random groups of 50 / G
clients each round, with the median or the trimmed mean across the G group means, on
the strong attacks only (sign flip, scaling x10, Gaussian noise, IPM eps=10, count lie;
SecAgg+ costs ~5 ms a client a round); SecAgg+ FedAvg in one group is the reference.
The attack wrappers sit inside the secure client, so each attacker's poisoned update is
what gets masked. A spy outside the secure client reads each round's groups (the
connected components of the peers each client is given in the masked stage) to count
the groups that hold an attacker.

Usage: python benchmarks/byzantine_bench.py [--only digits] [--rounds-scale 1] [--secure]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import fedge
from fedge.adapters.numpy import SoftmaxRegressionClient, softmax_loss, softmax_weights
from fedge.app import App
from fedge.client import Client, ClientWrapper, Config, FitResult, Message, Result
from fedge.coordinator import client_seed
from fedge.datasets import iid, load_digits, load_mnist1d
from fedge.limits import MAX_EXAMPLES, ExampleWeights
from fedge.secure_aggregation import MASKED, NO_PEER, Settings, secured
from fedge.strategy import (
    Bulyan,
    CenteredClip,
    ClipUpdates,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from fedge.strategy.clip import delta_norm
from fedge.weights import Weights

sys.path.insert(0, str(Path(__file__).parent))
from common import report

NUM_CLIENTS = 50
FRACTIONS = (0.1, 0.2)
SEED = 0
NOISE_STD = 10.0
BOOST = 10.0
IPM_EPS = (0.5, 10.0)
F32 = np.float32


# --- data and models -------------------------------------------------------------------


class MLPClient(fedge.Client):
    """A 40-64-10 ReLU network trained with minibatch SGD in NumPy (manual backprop)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
                 lr: float) -> None:  # fmt: skip
        self.x, self.y, self.epochs, self.batch, self.lr = x, y, epochs, batch_size, lr

    def fit(self, weights: Weights, config: Config) -> FitResult:
        w1, b1, w2, b2 = (np.array(weights[k], dtype=F32) for k in ("w1", "b1", "w2", "b2"))
        rng = np.random.default_rng(int(config["seed"]))
        onehot = np.eye(10, dtype=F32)
        for _ in range(self.epochs):
            order = rng.permutation(len(self.y))
            for start in range(0, len(order), self.batch):
                idx = order[start : start + self.batch]
                x = self.x[idx]
                h = np.maximum(x @ w1 + b1, 0)
                logits = h @ w2 + b2
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                g = (p / p.sum(axis=1, keepdims=True) - onehot[self.y[idx]]) / len(idx)
                gh = (g @ w2.T) * (h > 0)
                w2 -= self.lr * (h.T @ g)
                b2 -= self.lr * g.sum(axis=0)
                w1 -= self.lr * (x.T @ gh)
                b1 -= self.lr * gh.sum(axis=0)
        return FitResult({"w1": w1, "b1": b1, "w2": w2, "b2": b2}, len(self.y))


def mlp_weights(seed: int) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((40, 64)) * math.sqrt(2 / 40)).astype(F32),
        "b1": np.zeros(64, F32),
        "w2": (rng.standard_normal((64, 10)) * math.sqrt(2 / 64)).astype(F32),
        "b2": np.zeros(10, F32),
    }


def mlp_accuracy(weights: Weights, x: np.ndarray, y: np.ndarray) -> float:
    h = np.maximum(x @ weights["w1"] + weights["b1"], 0)
    return float(((h @ weights["w2"] + weights["b2"]).argmax(axis=1) == y).mean())


@dataclass
class Data:
    name: str
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    client: Callable[[np.ndarray, np.ndarray], Client]
    initial: Weights
    accuracy: Callable[[Weights], float]
    rounds: int


def digits() -> Data:
    x, y = load_digits()
    order = np.random.default_rng(SEED).permutation(len(y))
    cut = int(0.8 * len(y))
    tr, te = order[:cut], order[cut:]
    return Data(
        "digits", x[tr], y[tr], x[te], y[te],
        lambda a, b: SoftmaxRegressionClient(a, b, epochs=5, batch_size=16, lr=0.5),
        softmax_weights(x.shape[1], 10),
        lambda w: softmax_loss(w, x[te], y[te])[1],
        rounds=20,
    )  # fmt: skip


def mnist1d() -> Data:
    x, y, x_test, y_test = load_mnist1d(num_samples=20_000, seed=42)
    return Data(
        "mnist1d", x, y, x_test, y_test,
        lambda a, b: MLPClient(a, b, epochs=2, batch_size=32, lr=0.4),
        mlp_weights(SEED),
        lambda w: mlp_accuracy(w, x_test, y_test),
        rounds=30,
    )  # fmt: skip


# --- attacks: malicious client wrappers ------------------------------------------------


def delta(result: FitResult, weights: Weights) -> dict[str, np.ndarray]:
    return {k: np.subtract(result.weights[k], weights[k], dtype=F32) for k in weights}


def moved(weights: Weights, step: dict[str, np.ndarray], scale: float = 1.0) -> Weights:
    return {k: (weights[k] + F32(scale) * step[k]).astype(F32) for k in weights}


class SignFlip(ClientWrapper):
    def __init__(self, inner: Client, claim: int | None = None) -> None:
        super().__init__(inner)
        self.claim = claim

    def fit(self, weights: Weights, config: Config) -> FitResult:
        start = {k: a.copy() for k, a in weights.items()}
        result = self.inner.fit(weights, config)
        count = result.num_examples if self.claim is None else self.claim
        return FitResult(moved(start, delta(result, start), -1.0), count)


class Boost(ClientWrapper):
    """Sends its (poisoned) delta scaled by `factor`."""

    def __init__(self, inner: Client, factor: float) -> None:
        super().__init__(inner)
        self.factor = factor

    def fit(self, weights: Weights, config: Config) -> FitResult:
        start = {k: a.copy() for k, a in weights.items()}
        result = self.inner.fit(weights, config)
        return FitResult(moved(start, delta(result, start), self.factor), result.num_examples)


class Noise(ClientWrapper):
    def __init__(self, inner: Client, count: int) -> None:
        super().__init__(inner)
        self.count = count

    def fit(self, weights: Weights, config: Config) -> FitResult:
        rng = np.random.default_rng(int(config["seed"]))
        noisy = {k: (a + NOISE_STD * rng.standard_normal(a.shape)).astype(F32)
                 for k, a in weights.items()}  # fmt: skip
        return FitResult(noisy, self.count)


class Collusion:
    """The attackers' shared view of a round: each one's honest delta, trained on its own
    data with its own seed (computed once per round, by whichever attacker asks first)."""

    def __init__(self, clients: dict[int, Client]) -> None:
        self.clients = clients
        self.round = -1
        self.deltas: list[dict[str, np.ndarray]] = []

    def mean_std(self, weights: Weights, config: Config) -> tuple[dict[str, Any], dict[str, Any]]:
        if config["round"] != self.round:
            self.round = int(config["round"])
            self.deltas = []
            for cid, client in self.clients.items():
                own = {**config, "seed": client_seed(SEED, self.round, cid)}
                start = {k: a.copy() for k, a in weights.items()}
                self.deltas.append(delta(client.fit(dict(start), own), start))
        stack = {k: np.stack([d[k] for d in self.deltas]) for k in weights}
        return {k: s.mean(axis=0) for k, s in stack.items()}, {
            k: s.std(axis=0) for k, s in stack.items()
        }


class LittleIsEnough(ClientWrapper):
    def __init__(self, inner: Client, collusion: Collusion, z: float, count: int) -> None:
        super().__init__(inner)
        self.collusion, self.z, self.count = collusion, z, count

    def fit(self, weights: Weights, config: Config) -> FitResult:
        mean, std = self.collusion.mean_std(weights, config)
        step = {k: mean[k] - self.z * std[k] for k in weights}
        return FitResult(moved(weights, step), self.count)


class InnerProduct(ClientWrapper):
    def __init__(self, inner: Client, collusion: Collusion, eps: float, count: int) -> None:
        super().__init__(inner)
        self.collusion, self.eps, self.count = collusion, eps, count

    def fit(self, weights: Weights, config: Config) -> FitResult:
        mean, _ = self.collusion.mean_std(weights, config)
        return FitResult(moved(weights, mean, -self.eps), self.count)


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max: s = floor(n/2 + 1) - f supporters needed, z = Phi^-1((n - s) / n)."""
    s = math.floor(n / 2 + 1) - f
    return statistics.NormalDist().inv_cdf((n - s) / n)


@dataclass(frozen=True)
class Attacker:
    """What an attack is built from, for one malicious client id."""

    cid: int
    honest: Client
    flipped: Client
    """The same client on flipped labels."""
    collusion: Collusion
    f: int
    count: int
    """Its true example count, which all but the count lie report."""


ATTACKS: dict[str, Callable[[Attacker], Client]] = {
    "sign flip": lambda a: SignFlip(a.honest),
    "scaling x10": lambda a: Boost(a.flipped, BOOST),
    "gaussian noise": lambda a: Noise(a.honest, a.count),
    "label flip": lambda a: a.flipped,
    "little is enough": lambda a: LittleIsEnough(
        a.honest, a.collusion, alie_z(NUM_CLIENTS, a.f), a.count
    ),
    **{
        f"inner product eps={eps:g}": lambda a, eps=eps: InnerProduct(  # type: ignore[misc]
            a.honest, a.collusion, eps, a.count
        )
        for eps in IPM_EPS
    },
    "count lie": lambda a: SignFlip(a.honest, claim=MAX_EXAMPLES),
}

# --- defenses ----------------------------------------------------------------------------

DefenseFn = Callable[[int, float], Strategy]
"""(f, norm bound) -> strategy."""

DEFENSES: dict[str, DefenseFn] = {
    "fedavg": lambda f, c: FedAvg(),
    "fedmedian": lambda f, c: FedMedian(),
    "trimmed": lambda f, c: FedTrimmedAvg(beta=0.2),
    "krum": lambda f, c: Krum(num_malicious=f, min_results=2 * f + 3),
    "multikrum": lambda f, c: MultiKrum(num_malicious=f, min_results=2 * f + 3),
    "bulyan": lambda f, c: Bulyan(num_malicious=f, min_results=4 * f + 3),
    "norm bound": lambda f, c: ClipUpdates(FedAvg(), max_norm=c),
    "centered clip": lambda f, c: CenteredClip(),
}
CAPPED = "fedavg capped"
NORM_BOUNDS: dict[str, float] = {}


class Norms(ClientWrapper):
    def __init__(self, inner: Client, found: list[float]) -> None:
        super().__init__(inner)
        self.found = found

    def fit(self, weights: Weights, config: Config) -> FitResult:
        start = {k: a.copy() for k, a in weights.items()}
        result = self.inner.fit(weights, config)
        self.found.append(delta_norm(result.weights, start))
        return result


def grid(data: Data, attacks: Iterable[str]) -> Iterator[tuple[int, str | None, dict[str, Any]]]:
    """(attackers, attack or None for the clean run, the row to fill) for every malicious
    fraction and attack."""
    for fraction in FRACTIONS:
        f = round(fraction * NUM_CLIENTS)
        for attack in (None, *attacks):
            yield (
                f,
                attack,
                {
                    "data": data.name,
                    "malicious": f"{f} ({fraction:.0%})",
                    "attack": attack or "none (clean)",
                },
            )


def run(data: Data, parts: list[np.ndarray], rounds: int, strategy: Strategy,
        attack: str | None, f: int, policy: ExampleWeights | None = None,
        groups: int = 0, poisoned: list[float] | None = None) -> float:  # fmt: skip
    """Final accuracy of one run; attackers are the f clients at evenly spaced ids. With
    `groups`, through SecAgg+ in that many groups, each round's fraction of groups that
    hold an attacker appended to `poisoned`."""

    def honest(cid: int) -> Client:
        return data.client(data.x[parts[cid]], data.y[parts[cid]])

    def flipped(cid: int) -> Client:
        return data.client(data.x[parts[cid]], 9 - data.y[parts[cid]])

    bad = set(range(0, NUM_CLIENTS, NUM_CLIENTS // f)) if attack and f else set()
    collusion = Collusion({cid: honest(cid) for cid in sorted(bad)})
    clients: dict[int, Client] = {
        cid: ATTACKS[attack](
            Attacker(cid, honest(cid), flipped(cid), collusion, f, len(parts[cid]))
        )
        if attack and cid in bad
        else honest(cid)
        for cid in range(NUM_CLIENTS)
    }
    if not groups:
        history = fedge.simulate(
            clients.__getitem__, NUM_CLIENTS, rounds, strategy=strategy,
            initial_weights=data.initial, seed=SEED, example_weights=policy,
        )  # fmt: skip
        assert history.weights is not None
        return data.accuracy(history.weights)
    app = secured(App(clients.__getitem__, data.initial), Settings(groups=groups), strategy)
    seen: dict[str, dict[int, set[int]]] = {}
    history = fedge.simulate(
        lambda cid: GroupSpy(app.client_fn(cid), cid, seen), NUM_CLIENTS, rounds,
        strategy=strategy, initial_weights=data.initial, seed=SEED, workflow=app.workflow,
        max_round_retries=0,
    )  # fmt: skip
    assert history.weights is not None and len(seen) == rounds
    for graph in seen.values():
        found = components(graph)
        assert len(found) == groups and sum(map(len, found)) == NUM_CLIENTS, found
        if poisoned is not None:
            poisoned.append(sum(bool(g & bad) for g in found) / groups)
    return data.accuracy(history.weights)


def components(graph: dict[int, set[int]]) -> list[set[int]]:
    """The groups: SecAgg+ draws each one's neighbour graph among its own members."""
    left, found = set(graph), []
    while left:
        group, todo = set(), [left.pop()]
        while todo:
            cid = todo.pop()
            group.add(cid)
            todo += [p for p in graph[cid] if p not in group]
        left -= group
        found.append(group)
    return found


class GroupSpy(ClientWrapper):
    """Outside the secure client: notes the peers it is given in the masked stage."""

    def __init__(self, inner: Client, cid: int, seen: dict[str, dict[int, set[int]]]) -> None:
        super().__init__(inner)
        self.cid, self.seen = cid, seen

    def handle(self, message: Message) -> Result:
        if message.kind == MASKED:
            peers = {int(p) for p in message.payload["peers"] if p != NO_PEER}
            self.seen.setdefault(str(message.config["secagg_label"]), {})[self.cid] = peers
        return self.inner.handle(message)


def bench(data: Data, rounds: int) -> list[dict[str, Any]]:
    parts = iid(len(data.y), NUM_CLIENTS, SEED)
    found: list[float] = []
    fedge.simulate(
        lambda cid: Norms(data.client(data.x[parts[cid]], data.y[parts[cid]]), found),
        NUM_CLIENTS, 1, initial_weights=data.initial, seed=SEED,
    )  # fmt: skip
    bound = statistics.median(found)
    cap = max(len(p) for p in parts)
    rows = []
    for f, attack, row in grid(data, ATTACKS):
        started = time.perf_counter()
        for name, make in DEFENSES.items():
            row[name] = 100 * run(data, parts, rounds, make(f, bound), attack, f)
        if attack == "count lie":
            policy = ExampleWeights("capped", cap)
            row[CAPPED] = 100 * run(data, parts, rounds, FedAvg(), attack, f, policy)
        else:
            row[CAPPED] = row["fedavg"]
        row["seconds"] = time.perf_counter() - started
        print(row, flush=True)
        rows.append(row)
    NORM_BOUNDS[data.name] = bound
    return rows


SECURE_ATTACKS = ("sign flip", "scaling x10", "gaussian noise", "inner product eps=10", "count lie")
GROUPS = (16, 10)
"""16 groups of 3-4 (at most 50 // 3: SecAgg+ needs 3 a group) and 10 groups of 5."""
TRIM_BETA = 0.4
"""Trims int(0.4 G) group means from each end: 6 of 16, 4 of 10."""
SECURE: dict[str, Callable[[], Strategy]] = {
    "median": FedMedian,
    "trimmed": lambda: FedTrimmedAvg(beta=TRIM_BETA),
}


def tolerated(name: str, groups: int) -> int:
    """Poisoned groups the rule survives: fewer than half for the median, int(beta G) for
    the trimmed mean."""
    return (groups - 1) // 2 if name == "median" else int(TRIM_BETA * groups)


def bench_secure(data: Data, rounds: int) -> list[dict[str, Any]]:
    """One row per attack: SecAgg+ FedAvg in one group (the quantization range is its only
    defense), then each robust rule across each G's group means, and the poisoned groups."""
    parts = iid(len(data.y), NUM_CLIENTS, SEED)
    rows = []
    for f, attack, row in grid(data, SECURE_ATTACKS):
        started = time.perf_counter()
        row["secagg fedavg"] = 100 * run(data, parts, rounds, FedAvg(), attack, f, groups=1)
        for groups in GROUPS:
            for name, make in SECURE.items():
                poisoned: list[float] = []
                row[f"secagg {name} G={groups}"] = 100 * run(
                    data, parts, rounds, make(), attack, f, groups=groups, poisoned=poisoned
                )
                over = sum(round(p * groups) > tolerated(name, groups) for p in poisoned)
                row[f"{name} G={groups} rounds beyond"] = over / len(poisoned)
            row[f"poisoned G={groups} mean"] = statistics.fmean(poisoned)
            row[f"poisoned G={groups} max"] = max(poisoned)
        row["seconds"] = time.perf_counter() - started
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["digits", "mnist1d"], help="one data set")
    parser.add_argument("--rounds-scale", type=float, default=1.0, help="x each set's rounds")
    parser.add_argument(
        "--secure", action="store_true", help="only the SecAgg+ groups + robust rule runs"
    )
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for make in (digits, mnist1d):
        if args.only and make.__name__ != args.only:
            continue
        data = make()
        rounds = max(1, round(data.rounds * args.rounds_scale))
        rows += bench_secure(data, rounds) if args.secure else bench(data, rounds)
    name = "byzantine" + ("_secure" if args.secure else "")
    if args.secure:
        title = f"SecAgg+ in groups + a robust rule: final accuracy (%), {NUM_CLIENTS} clients"
        extra: dict[str, Any] = {"groups": GROUPS, "trim_beta": TRIM_BETA}
    else:
        title = f"Final accuracy (%) under attack, {NUM_CLIENTS} clients, 10% / 20% malicious"
        extra = {"norm_bounds": NORM_BOUNDS}
    report(name + (f"_{args.only}" if args.only else ""), title, rows, **extra)


if __name__ == "__main__":
    main()
