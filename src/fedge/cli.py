"""The `fedge` command. Errors print as one line on stderr and exit non-zero."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedge.errors import FedgeError

app = typer.Typer(
    help="fedge: federated learning for Linux edge fleets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="TOML config of the run.")]
OutOption = Annotated[Path | None, typer.Option("--out", help="Write per-round results (JSON).")]


@app.callback()
def _root() -> None:
    """fedge: federated learning for Linux edge fleets."""


@app.command()
def sim(
    config: ConfigOption = Path("fedge.toml"),
    out: OutOption = None,
    rounds: Annotated[int | None, typer.Option(help="Override run.rounds.")] = None,
    backend: Annotated[str | None, typer.Option(help="inprocess or process.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress view.")] = False,
) -> None:
    """Simulate a federation on this machine, with the app named in the config."""
    from fedge.app import load_app
    from fedge.config import load_config
    from fedge.progress import ProgressObserver, history_table
    from fedge.sim import simulate

    cfg = load_config(config)
    if rounds is not None:
        cfg.run.rounds = rounds
    if backend is not None:
        cfg.simulation = cfg.simulation.model_validate(
            {**cfg.simulation.model_dump(), "backend": backend}
        )
    user_app = load_app(
        cfg.app.target,
        cfg.base_dir,
        num_clients=cfg.run.num_clients,
        seed=cfg.run.seed,
        **cfg.app.options,
    )
    with ProgressObserver(cfg.run.rounds, console, disable=quiet) as observer:
        history = simulate(
            user_app.client_fn,
            cfg.run.num_clients,
            cfg.run.rounds,
            strategy=cfg.build_strategy(),
            initial_weights=user_app.initial_weights,
            evaluate_fn=user_app.evaluate_fn,
            seed=cfg.run.seed,
            fit_config=cfg.fit,
            evaluate_config=cfg.evaluate,
            backend=cfg.simulation.backend,
            workers=cfg.simulation.workers,
            stragglers=cfg.simulation.stragglers,
            dropouts=cfg.simulation.dropouts,
            max_round_retries=cfg.run.max_round_retries,
            observer=observer,
        )
    Console().print(history_table(history))
    if out is not None:
        out.write_text(json.dumps(history.to_dict(), indent=2))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except FedgeError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise SystemExit(1) from None
