"""Shared benchmark plumbing: machine facts, a printed table, JSON under results/."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def example(name: str) -> ModuleType:
    """The app module of ``examples/NAME`` (the examples are not an installed package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / name / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "os": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }


def report(name: str, title: str, rows: list[dict[str, Any]], **extra: Any) -> None:
    """Print `rows` as a table and write them, with the machine, to results/NAME.json."""
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row.values()))
    # into a pipe or a log: wide enough that no column is cut to 'req…'
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps({"title": title, "machine": machine(), "rows": rows, **extra}, indent=2)
    )
    print(f"wrote {path}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
