"""Bounds on what a node may send. Nodes may lie, so every count, size and string that
comes from one is checked against these before it is used (`[limits]` in the config
overrides the first two)."""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

MAX_EXAMPLES = 1_000_000
"""Largest example count one result may claim: it weighs the update in FedAvg, so one
node claiming 1e15 would otherwise dictate the model. Set it to your largest honest
dataset; robust strategies (median, Krum) ignore example counts altogether, and
`ExampleWeights` caps what a count within it may weigh."""
ExampleMode = Literal["reported", "capped", "uniform"]


@dataclass(frozen=True)
class ExampleWeights:
    """How much a result's example count weighs, whatever the strategy: in the aggregate
    and in the means of clients' metrics. A node may over-report to buy influence:
    ``"capped"`` counts at most `cap` examples per result, ``"uniform"`` counts every
    result once; ``"reported"`` takes the count as it is (FedAvg's weighting), within
    `MAX_EXAMPLES`. The count a result reported is still what the round records."""

    mode: ExampleMode = "reported"
    cap: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("reported", "capped", "uniform"):
            raise ValueError(
                f"example_weights must be 'reported', 'capped' or 'uniform', got {self.mode!r}"
            )
        if self.mode == "capped" and self.cap is None:
            raise ValueError("example_cap is required with example_weights = 'capped'")
        if self.mode != "capped" and self.cap is not None:
            raise ValueError(
                f"example_cap = {self.cap} is used only with example_weights = 'capped', "
                f"not {self.mode!r}"
            )
        if self.cap is not None and not (isinstance(self.cap, int) and self.cap >= 1):
            raise ValueError(f"example_cap must be an integer >= 1, got {self.cap!r}")

    def __call__(self, num_examples: int) -> int:
        """The weight of a result that reported `num_examples` (already checked >= 1)."""
        if self.mode == "uniform":
            return 1
        if self.cap is not None:
            return min(num_examples, self.cap)
        return num_examples


MAX_UPLOAD_BYTES = 2 << 30
"""Largest result payload (the encoded update) a node may upload."""
MAX_METRICS = 64
MAX_KEY_LENGTH = 64
"""Metric names and label keys."""
MAX_STRING = 256
"""Free-form strings: capabilities, label values, reasons."""
MAX_LABELS = 32
MAX_ERROR = 4096
"""A node's report of a failed task is cut to this many characters."""
MAX_TASK_ID = 256
MAX_PAYLOAD_BYTES = 1 << 20
"""Inline per-task payloads (a workflow's small arrays) and replies without a model."""


def few(names: Iterable[object], shown: int = 5) -> str:
    """A list for a message: the first few, cut short, and how many more (a node may send
    a million names; a message about them stays short)."""
    items = list(names)
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return f"{[str(n)[:MAX_KEY_LENGTH] for n in items[:shown]]}{more}"
