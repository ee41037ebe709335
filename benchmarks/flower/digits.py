"""Flower's side of `benchmarks/flower_sim_bench.py`: the digits job as a Flower app.

Run by the benchmark with the Flower venv's python (Flower is not a fedge dependency):
``python benchmarks/flower/digits.py --out result.json``. The job of
`examples/digits/fedge.toml`, written the way a Flower user would (Message API:
`ClientApp` with train/evaluate handlers, `ServerApp` with `flwr.serverapp.strategy.FedAvg`)
and run by Flower's simulation engine (`run_simulation`, Ray backend): scikit-learn's
8x8 digits scaled to [0, 1], 80% split IID over 10 clients (each keeping a fifth for
federated evaluation) and 20% held out for the server's evaluation; NumPy softmax
regression from zeros, 5 local epochs of minibatch SGD (batch 16, lr 0.5) per round, 5
rounds, every client training and half of them evaluating. The split, the partition, the
per-client seeds (`SeedSequence([seed, round, client])`) and the SGD steps are those of
fedge's example, so both sides train the same model and should end at the same accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from sklearn.datasets import load_digits

CLASSES = 10


Arrays = tuple[np.ndarray, np.ndarray]


Data = tuple[list[np.ndarray], Arrays, Arrays]
_loaded: dict[tuple[int, int], Data] = {}


def data(seed: int, clients: int) -> Data:
    """Client index sets, the training arrays and the held-out test arrays (as fedge's
    example: a permutation cut 80/20, then the 80% shuffled and split evenly); loaded
    once per process (a plain dict: Ray pickles the apps, and a functools cache does
    not survive that)."""
    if (seed, clients) in _loaded:
        return _loaded[seed, clients]
    digits = load_digits()
    x = digits.data.astype(np.float32) / np.float32(16.0)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    split = np.random.default_rng(seed).permutation(len(train))
    parts = [np.sort(p) for p in np.array_split(split, clients)]
    _loaded[seed, clients] = parts, (x[train], y[train]), (x[test], y[test])
    return _loaded[seed, clients]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def loss_accuracy(
    w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    logits = x @ w + b
    loss = float(-log_softmax(logits)[np.arange(len(y)), y].mean())
    return loss, float((logits.argmax(axis=1) == y).mean())


def sgd(
    w: np.ndarray,
    b: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
) -> Arrays:
    rng = np.random.default_rng(seed)
    onehot = np.eye(w.shape[1], dtype=w.dtype)
    w, b = w.copy(), b.copy()
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch):
            idx = order[start : start + batch]
            probs = np.exp(log_softmax(x[idx] @ w + b))
            grad = (probs - onehot[y[idx]]) / len(idx)
            w -= lr * (x[idx].T @ grad)
            b -= lr * grad.sum(axis=0)
    return w, b


class CheckedFedAvg(FedAvg):
    """Flower's FedAvg that stops the run if any client's training failed (Flower's
    own carries on with the replies it got, which would time a broken job)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [m.error.reason for m in replies if m.has_error()]
        if failed:
            raise RuntimeError(f"round {server_round}: {len(failed)} clients failed: {failed[0]}")
        return super().aggregate_train(server_round, replies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--fraction-evaluate", type=float, default=0.5)
    parser.add_argument("--num-cpus", type=float, default=None, help="per client actor")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    def local(context: Context) -> tuple[Arrays, Arrays]:
        """This client's training and evaluation examples."""
        cid = int(context.node_config["partition-id"])
        parts, (x, y), _ = data(args.seed, args.clients)
        idx = parts[cid]
        cut = max(1, len(idx) // 5)  # a fifth for federated evaluation
        return (x[idx[cut:]], y[idx[cut:]]), (x[idx[:cut]], y[idx[:cut]])

    client_app = ClientApp()

    @client_app.train()
    def _(msg: Message, context: Context) -> Message:
        w, b = msg.content["arrays"].to_numpy_ndarrays()
        (x, y), _ = local(context)
        cid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        seed = int(np.random.SeedSequence([args.seed, server_round, cid]).generate_state(1)[0])
        w, b = sgd(w, b, x, y, args.epochs, args.batch_size, args.lr, seed)
        loss, accuracy = loss_accuracy(w, b, x, y)
        metrics = {"train_loss": loss, "train_accuracy": accuracy, "num-examples": len(y)}
        content = RecordDict({"arrays": ArrayRecord([w, b]), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @client_app.evaluate()
    def _(msg: Message, context: Context) -> Message:
        w, b = msg.content["arrays"].to_numpy_ndarrays()
        _, (x, y) = local(context)
        loss, accuracy = loss_accuracy(w, b, x, y)
        metrics = {"eval_loss": loss, "eval_accuracy": accuracy, "num-examples": len(y)}
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    history: dict[int, dict[str, float]] = {}
    server_app = ServerApp()

    @server_app.main()
    def _(grid: Grid, context: Context) -> None:
        _, (x, _), (x_test, y_test) = data(args.seed, args.clients)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            w, b = arrays.to_numpy_ndarrays()
            loss, accuracy = loss_accuracy(w, b, x_test, y_test)
            history[server_round] = {"loss": loss, "accuracy": accuracy}
            return MetricRecord({"loss": loss, "accuracy": accuracy})

        strategy = CheckedFedAvg(fraction_train=1.0, fraction_evaluate=args.fraction_evaluate)
        initial = [np.zeros((x.shape[1], CLASSES), np.float32), np.zeros(CLASSES, np.float32)]
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=args.rounds,
            train_config=ConfigRecord(),
            evaluate_fn=evaluate,
        )

    backend_config: dict[str, dict[str, float]] = {}
    if args.num_cpus is not None:  # else Flower's default (2 CPUs per client actor)
        backend_config["client_resources"] = {"num_cpus": args.num_cpus, "num_gpus": 0.0}
    started = time.perf_counter()
    run_simulation(
        server_app, client_app, num_supernodes=args.clients, backend_config=backend_config
    )
    seconds = time.perf_counter() - started
    if not history or max(history) != args.rounds or math.isnan(history[args.rounds]["accuracy"]):
        raise SystemExit(f"Flower's run did not finish its {args.rounds} rounds: {history}")
    args.out.write_text(
        json.dumps(
            {"simulation_seconds": seconds, "rounds": history, "final": history[args.rounds]}
        )
    )


if __name__ == "__main__":
    main()
