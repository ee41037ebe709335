"""The TOML config of a run, validated with msgspec; errors name the offending key.

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
example_weights = "capped"  # or "reported", "uniform": what an example count weighs
example_cap = 600

[compression]               # how fit updates travel: none, fp16, q8, topk or auto
mode = "q8"
```
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from fedge.errors import ConfigError
from fedge.limits import MAX_EXAMPLES, MAX_UPLOAD_BYTES, ExampleMode, ExampleWeights

if TYPE_CHECKING:  # a node reads the config too, and needs no strategy
    from fedge.strategy import Strategy

Positive = msgspec.Meta(gt=0)


class _Section(msgspec.Struct, forbid_unknown_fields=True):
    pass


class AppSection(_Section):
    target: Annotated[str, msgspec.Meta(pattern=r"^[\w.]+:\w+$")]
    options: dict[str, Any] = {}


class RunSection(_Section):
    num_clients: Annotated[int, msgspec.Meta(ge=1)] = 10
    rounds: Annotated[int, msgspec.Meta(ge=1)] = 5
    seed: Annotated[int, msgspec.Meta(ge=0)] = 0
    round_timeout: Annotated[float, Positive] | None = None
    max_round_retries: Annotated[int, msgspec.Meta(ge=0)] = 2


class SimulationSection(_Section):
    backend: Literal["inprocess", "process", "ray"] = "inprocess"
    workers: Annotated[int, msgspec.Meta(ge=1)] | None = None
    ray_address: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    """backend "ray": the cluster to join ("auto", "HOST:PORT"); unset: a local Ray."""
    stragglers: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    dropouts: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    speed_spread: Annotated[float, msgspec.Meta(ge=1)] = 1.0
    task_times: list[Annotated[float, Positive]] | None = None


class LimitsSection(_Section):
    max_examples: Annotated[int, msgspec.Meta(ge=1)] = MAX_EXAMPLES
    max_upload_mb: Annotated[int, msgspec.Meta(ge=1)] = MAX_UPLOAD_BYTES >> 20
    example_weights: ExampleMode = "reported"
    """How much a result's example count weighs (`fedge.limits.ExampleWeights`)."""
    example_cap: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """With example_weights = "capped": the most examples one result counts for."""

    def __post_init__(self) -> None:
        self.weights()  # the policy's own checks
        if self.example_cap is not None and self.example_cap > self.max_examples:
            raise ValueError(
                f"example_cap = {self.example_cap} exceeds max_examples = {self.max_examples}, "
                "which refuses larger counts anyway"
            )

    def weights(self) -> ExampleWeights:
        return ExampleWeights(self.example_weights, self.example_cap)


Encoding = Literal["fp16", "q8", "topk", "stc"]
STRONGEST_FIRST: tuple[Encoding, ...] = ("stc", "topk", "q8", "fp16")
"""The encodings, the most compressing first (fedge.compression describes them)."""


class CompressionSection(_Section):
    mode: Literal["none", "fp16", "q8", "topk", "stc", "auto"] = "none"
    topk_fraction: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.01
    """Share of each float tensor's entries a topk update keeps (at least one)."""
    stc_fraction: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.1
    """The same for stc, whose entries cost ~1/8 of topk's: 0.1 takes about the bytes of
    topk at 0.01, and is ~15 points more accurate after as many rounds (docs/benchmarks.md)."""
    auto_thresholds: dict[Encoding, Annotated[float, Positive]] = msgspec.field(
        default_factory=lambda: {"topk": 1.0, "q8": 10.0, "fp16": 100.0}
    )
    """For mode "auto": an encoding is used while the node's measured uplink is below its
    value in MB/s (the most compressing such one wins); above them all, none."""

    def __post_init__(self) -> None:
        listed = [e for e in STRONGEST_FIRST if e in self.auto_thresholds]
        values = [self.auto_thresholds[e] for e in listed]
        if values != sorted(values):  # else a weaker encoding could never be chosen
            shown = ", ".join(f"{e} = {self.auto_thresholds[e]}" for e in listed)
            raise ValueError(
                f"auto_thresholds must grow from the strongest encoding to the weakest "
                f"({' < '.join(listed)}), got {{ {shown} }}"
            )

    def fraction(self, encoding: str) -> float:
        """The share of each tensor a sparse `encoding` keeps (1 for the dense ones)."""
        return {"topk": self.topk_fraction, "stc": self.stc_fraction}.get(encoding, 1.0)

    def encodings(self) -> tuple[Encoding, ...]:
        """The encodings this config lets a node use (the server refuses the others)."""
        if self.mode == "none":
            return ()
        if self.mode == "auto":
            return tuple(e for e in STRONGEST_FIRST if e in self.auto_thresholds)
        return (self.mode,)


class SecureAggregationSection(_Section):
    """SecAgg+ (fedge.secure_aggregation): the server sees only the sum of the updates."""

    enabled: bool = False
    neighbours: Annotated[int, msgspec.Meta(ge=2, le=255)] | None = None
    """Each client's neighbours in the masking graph; default ~2 log2(clients), <= n - 1."""
    threshold: Annotated[float, msgspec.Meta(ge=0.5, lt=1)] = 0.5
    """Shares that rebuild a secret: floor(threshold * neighbours) + 1, a majority at least."""
    clipping_range: Annotated[float, Positive] = 1.0
    """Each coordinate of an update delta is clipped to [-range, range], then quantized."""
    bits: Annotated[int, msgspec.Meta(ge=1, le=24)] = 16
    """Quantization levels per coordinate: 2^bits."""
    groups: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Groups that each run SecAgg+; > 1 lets a robust strategy run across group sums."""


class StoreSection(_Section):
    url: str = ""
    """``file:///path`` or ``s3://bucket/prefix``; empty: the server publishes nothing."""
    model: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] = "model"
    every: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Publish every N rounds (the last round always)."""
    keep: Annotated[int, msgspec.Meta(ge=1)] = 5
    """Newest versions kept; tagged versions (best, production, ...) are kept too."""
    best_metric: str = ""
    """A centralized evaluation metric: the version with the best value is tagged best."""
    best_mode: Literal["max", "min"] = "max"
    endpoint: str = ""
    """An S3 API endpoint other than AWS (Ceph RGW, MinIO); AWS_ENDPOINT_URL works too."""
    region: str = ""
    profile: str = ""
    """A profile of the AWS shared credentials and config files; AWS_PROFILE works too."""
    credentials_file: str = ""
    """A shared credentials file (e.g. a mounted Secret) instead of ~/.aws/credentials:
    the keys stay out of the run's config, which is recorded with the run."""

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("file:///", "s3://")):
            raise ValueError(f"expected file:///path or s3://bucket/prefix, got {self.url!r}")
        if (self.profile or self.credentials_file) and not self.url.startswith("s3://"):
            raise ValueError("profile and credentials_file are for s3:// stores only")


class MetricsSection(_Section):
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    """The server's Prometheus ``/metrics`` port (``fedge server --metrics-port``); none: off."""
    host: str = "127.0.0.1"


class RunConfig(_Section):
    app: AppSection
    run: RunSection = msgspec.field(default_factory=RunSection)
    strategy: dict[str, Any] = msgspec.field(default_factory=lambda: {"name": "fedavg"})
    fit: dict[str, Any] = {}
    evaluate: dict[str, Any] = {}
    simulation: SimulationSection = msgspec.field(default_factory=SimulationSection)
    limits: LimitsSection = msgspec.field(default_factory=LimitsSection)
    compression: CompressionSection = msgspec.field(default_factory=CompressionSection)
    secure_aggregation: SecureAggregationSection = msgspec.field(
        default_factory=SecureAggregationSection
    )
    store: StoreSection = msgspec.field(default_factory=StoreSection)
    """Where the server publishes models; not a setting of the run (it may change)."""
    metrics: MetricsSection = msgspec.field(default_factory=MetricsSection)
    """Where the server serves its metrics; not a setting of the run either."""
    base_dir: Path = msgspec.field(default_factory=lambda: Path("."))
    """Directory of the config file; app modules are imported from here."""

    def build_strategy(self) -> Strategy:
        return build_strategy(self.strategy)

    def settings(self) -> dict[str, Any]:
        """Everything that defines the run, as plain JSON (comments and layout of the
        file do not count): two configs with equal settings are the same run."""
        fields = [f for f in self.__struct_fields__ if f not in ("base_dir", "store", "metrics")]
        if not self.secure_aggregation.enabled:  # as runs recorded before it existed
            fields.remove("secure_aggregation")
        settings = {f: msgspec.to_builtins(getattr(self, f)) for f in fields}
        if self.limits.example_weights == "reported":  # as runs recorded before the policy
            del settings["limits"]["example_weights"], settings["limits"]["example_cap"]
        return settings


def load_config(path: Path | str, *, strategy: bool = True) -> RunConfig:
    """Read and validate a TOML config file; with `strategy`, its strategy parameters too
    (a node, which has no strategy, passes False and loads no strategy module)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    config = parse_config(raw, source=str(path))
    config.base_dir = path.parent
    if strategy:
        config.build_strategy()
    return config


def parse_config(raw: dict[str, Any], *, source: str = "config") -> RunConfig:
    if "base_dir" in raw:
        raise ConfigError(f"{source}: unknown key 'base_dir'")
    try:
        return msgspec.convert(raw, RunConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(str(exc), raw)}") from exc


_WHERE = re.compile(r"^(?P<msg>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.S)
_FIELD = re.compile(r"^Object (?P<what>contains unknown|missing required) field `(?P<name>[^`]+)`$")


def _describe(error: str, raw: Any) -> str:
    """msgspec's "Expected `int` >= 1 - at `$.run.rounds`" as "'run.rounds' = 0:
    Expected `int` >= 1": the key in the file's terms, with the value found there."""
    where = _WHERE.match(error)
    assert where is not None  # the pattern matches any string
    msg, parts = where["msg"], [p for p in re.split(r"\.|\[|\]", where["path"] or "") if p]
    field = _FIELD.match(msg)
    if field:
        key = ".".join([*parts, field["name"]])
        return (
            f"unknown key '{key}'"
            if field["what"] == "contains unknown"
            else f"missing key '{key}'"
        )
    value = raw
    for part in parts:
        value = value[int(part)] if isinstance(value, list) else value[part]
    if where["key"]:  # a table's key, not one of its values, is wrong
        msg = f"{msg} (as a key)"
    return f"'{'.'.join(parts)}' = {value!r}: {msg}"


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
            msgspec.convert(value, types[key])
        except msgspec.ValidationError as exc:
            raise ConfigError(f"'strategy.{key}' = {value!r}: {exc}") from exc
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
