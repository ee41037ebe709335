"""Live progress and the final table, drawn with rich; shared by `fedge sim` and `demo`."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedge.coordinator import Observer
from fedge.history import History, RoundRecord


class ProgressObserver(Observer):
    """A bar over rounds and a bar over the current round's results."""

    def __init__(self, rounds: int, console: Console, *, disable: bool = False) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            disable=disable,
        )
        self.rounds_bar = self.progress.add_task("rounds", total=rounds, status="")
        self.results_bar = self.progress.add_task("results", total=1, status="")

    def __enter__(self) -> ProgressObserver:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def round_started(self, round: int, selected: int) -> None:
        self.progress.update(
            self.results_bar,
            description=f"round {round}",
            total=selected,
            completed=0,
            status="training",
        )

    def result_received(self, round: int, received: int, selected: int) -> None:
        self.progress.update(self.results_bar, completed=received)

    def round_finished(self, record: RoundRecord) -> None:
        if record.status == "failed":
            self.progress.update(self.results_bar, status="[red]failed, retrying")
            return
        self.progress.update(self.rounds_bar, advance=1, status=_metrics_text(record))


def _metrics_text(record: RoundRecord) -> str:
    metrics = record.metrics or record.evaluate_metrics or record.fit_metrics
    return "  ".join(f"{k}={v:.4f}" for k, v in list(metrics.items())[:3])


def history_table(history: History) -> Table:
    """Round, clients, status, every metric and wall time, one row per attempt."""
    central = _keys(r.metrics for r in history.rounds)
    federated = _keys(r.evaluate_metrics for r in history.rounds)
    fit: list[str] = []  # clients' own training metrics stay in --out, not in the table
    own = _keys(r.strategy_metrics for r in history.rounds)  # e.g. epsilon spent
    table = Table(
        title=f"fedge: {len(history.completed)} rounds in {history.wall_time:.2f} s",
        caption=f"ended early: {history.ended_early}" if history.ended_early else None,
    )
    for name in [
        "round",
        "clients",
        "status",
        *central,
        *(f"fed_{k}" for k in federated),
        *(f"fit_{k}" for k in fit),
        *own,
        "time (s)",
    ]:
        table.add_column(name, justify="right")
    if history.initial_metrics:
        table.add_row(
            "0",
            "-",
            "initial",
            *(_fmt(history.initial_metrics.get(k)) for k in central),
            *["-"] * (len(federated) + len(fit) + len(own)),
            "-",
        )
    for r in history.rounds:
        table.add_row(
            str(r.round),
            f"{len(r.participants)}/{len(r.selected)}",
            r.status,
            *(_fmt(r.metrics.get(k)) for k in central),
            *(_fmt(r.evaluate_metrics.get(k)) for k in federated),
            *(_fmt(r.fit_metrics.get(k)) for k in fit),
            *(_fmt(r.strategy_metrics.get(k)) for k in own),
            f"{r.wall_time:.3f}",
        )
    return table


def _keys(dicts: object) -> list[str]:
    keys: dict[str, None] = {}
    for d in dicts:  # type: ignore[attr-defined]
        keys.update(dict.fromkeys(d))
    return list(keys)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
