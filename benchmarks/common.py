"""Shared benchmark plumbing: machine facts, a printed table, JSON under results/."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
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


FLOWER_VENV = Path(os.environ.get("FLOWER_VENV", "/work/flower-venv"))
"""Where the Flower comparisons look for Flower (never in fedge's venv: Flower is not a
fedge dependency); `make flower-venv` creates it."""


def flower_python(path: Path | None) -> Path | None:
    """The Flower venv's python (`path`, default FLOWER_VENV's), or None after saying
    how to create it, so a comparison can still report fedge's side."""
    python = path or FLOWER_VENV / "bin" / "python"
    if python.exists():
        return python
    print(
        f"Flower's python {python} is missing, so only fedge's side is measured. "
        f"Create it with `make flower-venv` (python3 -m venv {FLOWER_VENV} && "
        f"{FLOWER_VENV}/bin/pip install 'flwr[simulation]==1.42.0' scikit-learn numpy), "
        "or pass --flower-python.",
        file=sys.stderr,
    )
    return None


def run_flower(python: Path, script: str, args: list[str]) -> dict[str, Any]:
    """Run `benchmarks/flower/SCRIPT` with Flower's python; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "out.json", Path(tmp) / "flower.log"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with log.open("w") as sink:
            done = subprocess.run(
                [str(python), str(Path(__file__).parent / "flower" / script), *args,
                 "--out", str(out)],
                cwd=tmp, env=env, stdout=sink, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip
        if done.returncode != 0 or not out.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"Flower's {script} failed (exit {done.returncode}):\n{tail}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result
