"""Bounds on what a node may send. Nodes may lie, so every count, size and string that
comes from one is checked against these before it is used (`[limits]` in the config
overrides the first two)."""

from collections.abc import Iterable

MAX_EXAMPLES = 1_000_000
"""Largest example count one result may claim: it weighs the update in FedAvg, so one
node claiming 1e15 would otherwise dictate the model. Set it to your largest honest
dataset; robust strategies (median, Krum) ignore example counts altogether."""
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
