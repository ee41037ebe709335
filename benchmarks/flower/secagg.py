"""Flower's side of `benchmarks/secagg_flower_bench.py`: the same workload on Flower.

Run by the benchmark with the Flower venv's python (Flower is not a fedge dependency):
``python benchmarks/flower/secagg.py --clients 100 --params 100000 --rounds 4 --secure
--out result.json``. Flower's SecAgg+ (`SecAggPlusWorkflow` with `secaggplus_mod`) or
its plain FedAvg fit workflow runs in Flower's simulation engine (Ray backend). Each
client's update is the same fixed random step as on fedge's side; a dropped client
raises in `fit`, which `secaggplus_mod` calls in its masked-input stage, after it shared
its secrets: the server then rebuilds its mask keys, as on fedge's side. The JSON holds
the wall time of every round (the fit workflow alone, not Ray's start-up) and the
largest error of the final aggregate against the plain mean of the surviving updates.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.client import Client, ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.simulation import run_simulation

EXAMPLES = 10  # what every client reports, as on fedge's side


def step(cid: int, params: int) -> np.ndarray:
    """The client's fixed update, drawn exactly as on fedge's side."""
    return np.random.default_rng(cid).normal(0, 0.1, params).astype(np.float32)


class Step(NumPyClient):
    def __init__(self, cid: int, params: int, drops: bool) -> None:
        self.delta, self.drops = step(cid, params), drops

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        if self.drops:
            raise ConnectionError("gone before sending its masked input")
        return [parameters[0] + self.delta], EXAMPLES, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--dropped", default="", help="comma-separated client ids")
    parser.add_argument("--secure", action="store_true")
    parser.add_argument("--num-shares", type=int, default=15)
    parser.add_argument("--threshold", type=int, default=8)
    parser.add_argument("--clipping-range", type=float, default=1.0)
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dropped = {int(c) for c in args.dropped.split(",") if c}
    times: list[float] = []
    final: list[np.ndarray] = []

    def client_fn(context: Context) -> Client:
        cid = int(context.node_config["partition-id"])
        return Step(cid, args.params, cid in dropped).to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if args.secure else [])
    server_app = ServerApp()

    @server_app.main()
    def _(grid: Grid, context: Context) -> None:
        n = args.clients
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters([np.zeros(args.params, np.float32)]),
            accept_failures=True,
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=args.rounds), strategy=strategy
        )
        fit: Callable[[Grid, Context], None] = default_fit_workflow
        if args.secure:
            fit = SecAggPlusWorkflow(
                num_shares=args.num_shares,
                reconstruction_threshold=args.threshold,
                max_weight=EXAMPLES,
                clipping_range=args.clipping_range,
                quantization_range=1 << args.bits,
            )

        def timed(grid: Grid, context: Context) -> None:
            started = time.perf_counter()
            fit(grid, context)
            times.append(time.perf_counter() - started)

        DefaultWorkflow(fit_workflow=timed)(grid, legacy)
        params = legacy.state.array_records[MAIN_PARAMS_RECORD]  # the global model
        final.extend(a.numpy() for a in params.values())

    started = time.perf_counter()
    run_simulation(
        server_app,
        client_app,
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    total = time.perf_counter() - started
    survivors = [c for c in range(args.clients) if c not in dropped]
    # each round starts from the last one's model: after R rounds the model is R steps
    expected = args.rounds * np.mean([step(c, args.params) for c in survivors], axis=0)
    error = float(np.abs(final[0] - expected).max()) if final else float("nan")
    args.out.write_text(
        json.dumps(
            {
                "round_seconds": times,
                "total_seconds": total,
                "max_error": error,
                "rounds_done": len(times),
            }
        )
    )


if __name__ == "__main__":
    main()
