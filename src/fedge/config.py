"""The TOML config of a run, validated with pydantic; errors name the offending key.

```toml
[app]                       # user code: "module:function" relative to this file
target = "app:create_app"
options = { partition = "iid" }

[run]
num_clients = 10
rounds = 5
seed = 0

[strategy]                  # name, then any parameter of that strategy
name = "fedavg"

[fit]                       # sent to clients with every fit task (plus round and seed)
local_epochs = 5

[simulation]
backend = "inprocess"       # or "process"

[limits]                    # bounds on what nodes may send (they may lie)
max_examples = 1000000
```
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fedge.errors import ConfigError
from fedge.limits import MAX_EXAMPLES, MAX_UPLOAD_BYTES

if TYPE_CHECKING:  # a node reads the config too, and needs no strategy
    from fedge.strategy import Strategy


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AppSection(_Section):
    target: str = Field(pattern=r"^[\w.]+:\w+$")
    options: dict[str, Any] = {}


class RunSection(_Section):
    num_clients: int = Field(10, ge=1)
    rounds: int = Field(5, ge=1)
    seed: int = Field(0, ge=0)
    round_timeout: float | None = Field(None, gt=0)
    max_round_retries: int = Field(2, ge=0)


class SimulationSection(_Section):
    backend: Literal["inprocess", "process"] = "inprocess"
    workers: int | None = Field(None, ge=1)
    stragglers: float = Field(0.0, ge=0, le=1)
    dropouts: float = Field(0.0, ge=0, le=1)


class LimitsSection(_Section):
    max_examples: int = Field(MAX_EXAMPLES, ge=1)
    max_upload_mb: int = Field(MAX_UPLOAD_BYTES >> 20, ge=1)


class RunConfig(_Section):
    app: AppSection
    run: RunSection = RunSection()
    strategy: dict[str, Any] = {"name": "fedavg"}
    fit: dict[str, Any] = {}
    evaluate: dict[str, Any] = {}
    simulation: SimulationSection = SimulationSection()
    limits: LimitsSection = LimitsSection()
    base_dir: Path = Path(".")
    """Directory of the config file; app modules are imported from here."""

    def build_strategy(self) -> Strategy:
        return build_strategy(self.strategy)

    def settings(self) -> dict[str, Any]:
        """Everything that defines the run, as plain JSON (comments and layout of the
        file do not count): two configs with equal settings are the same run."""
        return self.model_dump(mode="json", exclude={"base_dir"})


def load_config(path: Path | str) -> RunConfig:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    config = parse_config(raw, source=str(path))
    config.base_dir = path.parent
    config.build_strategy()  # strategy parameters are checked up front, too
    return config


def parse_config(raw: dict[str, Any], *, source: str = "config") -> RunConfig:
    if "base_dir" in raw:
        raise ConfigError(f"{source}: unknown key 'base_dir'")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e) for e in exc.errors())) from exc


def _describe(error: Any) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if error["type"] == "missing":
        return f"missing key '{key}'"
    return f"'{key}' = {error.get('input')!r}: {error['msg']}"


def build_strategy(table: dict[str, Any]) -> Strategy:
    """A strategy from its config table: ``name`` plus that strategy's parameters, and
    ``wrap``, a list of wrappers (``{ name = "clip_updates", max_norm = 1.0 }``) applied
    inside out."""
    from fedge.strategy import STRATEGIES, WRAPPERS

    params = dict(table)
    wrappers = params.pop("wrap", [])
    name = str(params.pop("name", "fedavg")).lower()
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(
            f"'strategy.name' = {name!r}: unknown strategy; expected one of {sorted(STRATEGIES)}"
        )
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {['strategy.' + k for k in unknown]} for "
            f"{cls.__name__}; expected some of {sorted(allowed)}"
        )
    types = typing.get_type_hints(cls)
    for key, value in params.items():  # e.g. fraction_fit = "high": name the key, not a '<'
        try:
            TypeAdapter(types[key]).validate_python(value, strict=True)
        except ValidationError as exc:
            raise ConfigError(f"'strategy.{key}' = {value!r}: {exc.errors()[0]['msg']}") from exc
    try:
        strategy = cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {name}: {exc}") from exc
    if not isinstance(wrappers, list):
        raise ConfigError(f"'strategy.wrap' must be a list of tables, got {wrappers!r}")
    for i, spec in enumerate(wrappers):
        spec = dict(spec) if isinstance(spec, dict) else {"name": spec}
        kind = str(spec.pop("name", ""))
        wrapper = WRAPPERS.get(kind)
        if wrapper is None:
            raise ConfigError(
                f"'strategy.wrap[{i}].name' = {kind!r}: unknown wrapper; "
                f"expected one of {sorted(WRAPPERS)}"
            )
        try:
            strategy = wrapper(strategy, **spec)
        except TypeError as exc:
            raise ConfigError(f"strategy.wrap[{i}] ({kind}): {exc}") from exc
    return strategy
