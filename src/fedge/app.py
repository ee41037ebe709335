"""An app bundles what a run needs from user code: clients, initial weights, evaluation.

A TOML config names a factory as ``"module:function"`` (module path relative to the
config file). The factory is called with ``num_clients``, ``seed`` and the
``[app.options]`` table as keyword arguments and returns an `App`. The simulator, the
server and every node load the same app, so a deployment runs the simulated code.
`fedge export` loads it too, for the one thing weights alone do not say: the model's
inference graph (`App.onnx_model`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.client import Client
from fedge.errors import ConfigError
from fedge.weights import Weights

if TYPE_CHECKING:  # a node loads the app too, and needs no coordinator (nor onnx)
    from onnx import ModelProto

    from fedge.coordinator import Workflow


@dataclass
class App:
    client_fn: Callable[[int], Client]
    initial_weights: Weights | None = None
    evaluate_fn: Callable[[Weights], Mapping[str, float]] | None = None
    workflow: Workflow | None = None
    """How each round runs on the server (default: `fedge.coordinator.fit_round`)."""
    onnx_model: Callable[[Weights], ModelProto] | None = None
    """The inference graph with these weights in it, for `fedge export`: e.g.
    `fedge.adapters.numpy.softmax_onnx` or `fedge.adapters.torch.to_onnx`. Called only
    by the export, so onnx is imported only there."""


def _forget_foreign(top: str, base: Path) -> None:
    """Drop a module `top` imported from elsewhere when `base` has its own: every example
    names its module ``app``, and one process (a test run, a simulation's worker) may load
    several apps; importing again would hand back the first one."""
    cached = sys.modules.get(top)
    if cached is None or not ((base / f"{top}.py").exists() or (base / top).is_dir()):
        return
    if base not in Path(getattr(cached, "__file__", None) or "/").resolve().parents:
        for name in [n for n in sys.modules if n == top or n.startswith(f"{top}.")]:
            del sys.modules[name]


def load_app(target: str, base_dir: Path, **kwargs: Any) -> App:
    """Import ``module:function`` (searching `base_dir` first) and build the App."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"app.target must look like 'module:function', got {target!r}")
    base = str(base_dir.resolve())
    if sys.path[:1] != [base]:  # first, even when an earlier app put it further down
        with contextlib.suppress(ValueError):
            sys.path.remove(base)
        sys.path.insert(0, base)
    _forget_foreign(module_name.partition(".")[0], Path(base))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"app.target {target!r}: cannot import {module_name!r} "
            f"(looked in {base} and sys.path): {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"app.target {target!r}: {module_name} has no callable {attr!r}")
    try:  # a misspelt [app.options] key is a config error, not a traceback
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"app.target {target!r} cannot take these options: {exc}") from exc
    except ValueError:  # no signature to check (e.g. some builtins): just call it
        pass
    app = factory(**kwargs)
    if not isinstance(app, App):
        raise ConfigError(
            f"app.target {target!r} returned {type(app).__name__}, expected fedge.App"
        )
    return app
