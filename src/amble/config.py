"""The experiment config: typed, validated on load, overridable with ``--set a.b=value``.

A config is YAML. Every section is a frozen pydantic model that forbids unknown keys, so a typo
fails at load time with a message naming the key, instead of silently running the default.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializeAsAny,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from amble.config_run import EvalConfig as EvalConfig
from amble.config_run import RunSection as RunSection
from amble.config_server import RayConfig as RayConfig
from amble.config_server import ServerConfig as ServerConfig
from amble.errors import ConfigError
from amble.imports import is_import_path
from amble.redaction import redact, redact_values
from amble.strategies.base import BaseWork, Strategy, StrategySettings
from amble.strategies.registry import aggregator_class, server_optimizer_of, strategy_class
from amble.strategies.serveropt import ServerOptimizerSettings


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartitionConfig(_Section):
    """How the training set is split over devices (SPEC 7)."""

    kind: Literal["iid", "shards", "dirichlet", "quantity", "natural"] = "iid"
    """``natural``: the dataset's owner column decides (one device per owner, or owners grouped onto
    ``data.num_devices`` devices balanced by samples)."""
    shards_per_device: int = Field(2, ge=1)
    alpha: float = Field(0.5, gt=0)
    quantity_sigma: float = Field(1.0, ge=0)
    min_samples: int = Field(1, ge=1)


BUILTIN_DATASETS = ("fashion-mnist", "mnist", "cifar10", "synthetic")
BUILTIN_MODELS = ("mlp", "cnn", "lenet", "resnet20", "cifar-cnn", "mlp-small")
USER_FILE_SUFFIXES = (".npz", ".safetensors")


def is_user_data_path(dataset: str) -> bool:
    """Whether ``data.dataset`` names a file or folder of the user's (not a built-in, not an import path)."""
    return dataset not in BUILTIN_DATASETS and not is_import_path(dataset)


class DataConfig(_Section):
    dataset: str = "fashion-mnist"
    """A built-in dataset (fashion-mnist | mnist | cifar10 | synthetic); a ``.npz`` or ``.safetensors``
    file of arrays; an image folder (``train/<class>/*``, ``test/<class>/*``); or an import path
    ``package.module:function`` to a loader returning the same arrays. Relative paths in a YAML file
    are relative to that file's folder."""
    root: str = "auto"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Arrays given as ``x, y[, owner]`` (no test split of their own): the share held out for testing,
    drawn by the seed."""
    partition: PartitionConfig = PartitionConfig()
    num_devices: int = Field(100, ge=1)
    synthetic_size: tuple[int, int] = (2000, 500)
    """Train and test samples of the generated ``synthetic`` dataset (ignored by real datasets)."""

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                f"data.dataset must be one of {', '.join(BUILTIN_DATASETS)}, a .npz/.safetensors file, an image "
                "folder or an import path 'package.module:function'"
            )
        return value

    @field_validator("synthetic_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError("data.synthetic_size must be [train, test] with both >= 1")
        return value


class TierConfig(_Section):
    share: float = Field(gt=0, le=1)
    slowdown: float = Field(gt=0)


class FleetConfig(_Section):
    """Device heterogeneity (SPEC 4). Slowdowns multiply the reference device's step time."""

    kind: Literal["uniform", "lognormal", "tiers", "trace"] = "tiers"
    tiers: list[TierConfig] = [
        TierConfig(share=0.5, slowdown=1.0),
        TierConfig(share=0.3, slowdown=3.0),
        TierConfig(share=0.2, slowdown=10.0),
    ]
    slowdown_range: tuple[float, float] = (1.0, 10.0)
    sigma: float = Field(1.0, ge=0)
    trace: str | None = None
    """``kind: trace``: a CSV (one device per row) or a recorded ``fleet_trace.json`` (``amble serve``)."""
    bandwidth_mbps: tuple[float, float] = (5.0, 50.0)
    latency_s: float = Field(0.05, ge=0)
    step_overhead_s: float = Field(0.0, ge=0)
    jitter: float = Field(0.05, ge=0)
    p_dropout: float = Field(0.0, ge=0, lt=1)
    availability: float = Field(1.0, gt=0, le=1)
    t_ref: dict[int, float] | None = None
    """Per-step seconds of the reference device by batch size; calibrated on this machine when absent."""

    @model_validator(mode="after")
    def _check(self) -> FleetConfig:
        if self.kind == "trace" and not self.trace:
            raise ValueError(
                "fleet.kind 'trace' needs fleet.trace: a CSV with one device per row, or the fleet_trace.json "
                "amble serve recorded"
            )
        if self.kind == "tiers" and abs(sum(t.share for t in self.tiers) - 1.0) > 1e-6:
            raise ValueError("fleet.tiers shares must sum to 1")
        lo, hi = self.bandwidth_mbps
        if not 0 < lo <= hi:
            raise ValueError("fleet.bandwidth_mbps must be [low, high] with 0 < low <= high")
        lo, hi = self.slowdown_range
        if not 0 < lo <= hi:
            raise ValueError("fleet.slowdown_range must be [low, high] with 0 < low <= high")
        if self.t_ref is not None and (not self.t_ref or min(self.t_ref.values()) <= 0):
            raise ValueError("fleet.t_ref must map batch sizes to positive seconds per step")
        return self


class TrainConfig(_Section):
    """The base local work ``(B0, E0, lr0)`` that FedAvg uses and AMBLE scales from."""

    batch_size: int = Field(32, ge=1)
    local_epochs: int = Field(1, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    vectorize: bool = False
    """Simulation: train devices that share a plan as one vectorised computation (``torch.func.vmap``);
    the same results up to float rounding, faster for small models. Models with BatchNorm train per device."""


def _known_aggregator(name: str) -> str:
    try:
        aggregator_class(name)
    except ConfigError as exc:
        raise PydanticCustomError("aggregator", "{reason}", {"reason": str(exc)}) from None
    return name


AggregatorName = Annotated[str, AfterValidator(_known_aggregator)]
"""A built-in aggregator (``fedavg``, ``fednova``) or ``package.module:Class``, checked when the config loads."""


class StrategyEntry(_Section):
    """One entry of ``strategies``: which strategy, filed under which label, with which aggregator.

    The strategy's own keys are the fields of its ``settings_model`` (declared once, in its module):
    each entry is validated by a model made of both (:func:`entry_model`), so the keys stay flat in
    YAML (``{name: amble, deadline_quantile: 0.8}``) and ``--set strategies.1.q=...`` reaches them.
    """

    name: str
    """A built-in strategy (``fedavg``, ``amble``, ...) or a user's ``package.module:Class``."""
    label: str | None = None
    aggregator: AggregatorName | None = None
    """Overrides the strategy's own aggregator and the config's ``aggregator``."""
    server_optimizer: ServerOptimizerSettings | None = None
    """How the server steps the model from the aggregate (``{kind: adam, lr: 0.01}``); None: the
    strategy's own (``none``: the aggregate itself; ``fedavgm``: momentum; ``fedadam``: adam)."""

    def settings(self) -> StrategySettings:
        """The strategy's settings object, as its constructor takes it."""
        model = strategy_class(self.name).settings_model
        return model.model_validate(self.model_dump(exclude=set(StrategyEntry.model_fields)))


@functools.cache
def entry_model(strategy: type[Strategy]) -> type[StrategyEntry]:
    """The config entry of ``strategy``: its settings plus ``name``, ``label`` and ``aggregator``."""
    made = create_model(f"{strategy.__name__}Entry", __base__=(strategy.settings_model, StrategyEntry))
    return cast(type[StrategyEntry], made)


def _strategy_entry(value: Any) -> StrategyEntry:
    """Validate one ``strategies`` item with the model of the strategy its ``name`` names."""
    if isinstance(value, StrategyEntry):
        return value
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise PydanticCustomError(
            "strategy_entry", "a strategy is a name, or a table with a 'name' key such as name: amble"
        )
    try:
        model = entry_model(strategy_class(value["name"]))
    except ConfigError as exc:
        raise PydanticCustomError("strategy_name", "{reason}", {"reason": str(exc)}) from None
    unknown = sorted(set(value) - set(model.model_fields))
    if unknown:
        known = ", ".join(k for k in model.model_fields if k != "name")
        raise PydanticCustomError(
            "strategy_key",
            "strategy '{name}' has no setting {unknown}; its keys are: {known}",
            {"name": value["name"], "unknown": ", ".join(repr(k) for k in unknown), "known": known},
        )
    return model.model_validate(value)


StrategyConfig = Annotated[SerializeAsAny[StrategyEntry], PlainValidator(_strategy_entry)]
"""A ``strategies`` item; dumped with its strategy's settings (``SerializeAsAny``), not only the entry's keys."""


def _default_strategies() -> list[StrategyEntry]:
    return [_strategy_entry({"name": "fedavg"})]


class ExperimentConfig(_Section):
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    data: DataConfig = DataConfig()
    model: str = "lenet"
    """A built-in model (mlp | cnn | lenet | resnet20 | cifar-cnn | mlp-small) or an import path
    ``package.module:function`` to ``function(input_shape, num_classes, **model_args) -> nn.Module``."""
    model_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the model's constructor (JSON values: they travel to devices and workers)."""
    fleet: FleetConfig = FleetConfig()
    rounds: int = Field(50, ge=1)
    devices_per_round: int = Field(10, ge=1)
    train: TrainConfig = TrainConfig()
    strategies: list[StrategyConfig] = Field(default_factory=_default_strategies)
    aggregator: AggregatorName | None = None
    """Overrides every strategy's aggregator (a strategy's own ``aggregator`` key wins); None: their defaults."""
    server: ServerConfig = ServerConfig()
    ray: RayConfig = RayConfig()
    eval: EvalConfig = EvalConfig()
    run: RunSection = RunSection()

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in BUILTIN_MODELS and not is_import_path(value):
            raise ValueError(
                f"model must be one of {', '.join(BUILTIN_MODELS)}, or an import path 'package.module:function' to "
                "a model of your own"
            )
        return value

    @field_validator("model_args")
    @classmethod
    def _json_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model_args must hold JSON values (numbers, strings, lists, tables): {exc}") from None
        return value

    @field_validator("strategies", mode="before")
    @classmethod
    def _names_to_tables(cls, value: Any) -> Any:
        """Allow ``- fedavg`` as shorthand for ``- {name: fedavg}``."""
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if not self.strategies:
            raise ValueError("strategies must list at least one strategy")
        labels = [strategy_label(s) for s in self.strategies]
        if len(set(labels)) != len(labels):
            raise ValueError(f"strategies must have distinct labels, got {labels}; set 'label' on repeats")
        base = BaseWork(self.train.batch_size, self.train.local_epochs, self.train.lr)
        for strategy in self.strategies:
            try:
                strategy.settings().check(base)
            except ValueError as exc:
                raise ValueError(f"strategy '{strategy_label(strategy)}': {exc}") from None
            _check_server_optimizer(strategy)
        uses_variates = any(strategy_class(s.name)(base, s.settings()).uses_control_variates() for s in self.strategies)
        if uses_variates and self.train.momentum > 0:
            raise ValueError(
                f"control variates (strategy scaffold, or control_variates: true) with train.momentum "
                f"{self.train.momentum:g} diverge: the correction passes through the momentum buffer and option II's "
                "estimate (x - y) / (K lr) then overshoots by 1 / (1 - momentum); set train.momentum to 0"
            )
        if trains_on_ray(self) and uses_variates:
            raise ValueError(
                "control variates (strategy scaffold, or control_variates: true) do not train on Ray yet: set "
                "ray.train: false (the parameter server's functions may still run on Ray)"
            )
        if self.server.runtime == "ray" and self.server.store == "memory":
            raise ValueError(
                "server.runtime 'ray' runs functions on Ray actors in other processes, which need a shared "
                "store: set server.store to a Redis URL (redis://HOST:PORT/DB) every Ray node can reach"
            )
        if self.server.runtime == "ray" and self.server.workers:
            raise ValueError(
                "server.workers starts `amble worker` processes, but with server.runtime 'ray' functions run on "
                "Ray actors: set server.workers to 0"
            )
        if isinstance(self.run.parallel, int) and self.run.parallel > 1 and not embedded(self):
            raise ValueError(
                f"run.parallel {self.run.parallel} plays strategies in separate processes, which only embedded runs "
                "do (server.store: memory, server.runtime: local, training in the run's process): set run.parallel "
                "to 1 or auto"
            )
        if self.devices_per_round > self.data.num_devices:
            raise ValueError(
                f"devices_per_round ({self.devices_per_round}) exceeds data.num_devices ({self.data.num_devices})"
            )
        return self


def _check_server_optimizer(strategy: StrategyEntry) -> None:
    """Refuse settings that would be ignored: a server optimizer's knobs with kind ``none``, or any on an
    asynchronous strategy (FedBuff's publishes do not go through ``finalize``)."""
    given = strategy.server_optimizer
    if given is not None and getattr(strategy_class(strategy.name), "asynchronous", False):
        raise ValueError(
            f"strategy '{strategy_label(strategy)}': server_optimizer is applied by the synchronous rounds' finalize, "
            "not by an asynchronous strategy's publishes: drop it (FedBuff steps with its own server_lr)"
        )
    if given is None or server_optimizer_of(strategy).resolved_kind != "none":
        return
    knobs = given.knobs_changed()
    if knobs:
        raise ValueError(
            f"strategy '{strategy_label(strategy)}': server_optimizer sets {', '.join(knobs)} but its kind is none, "
            "so they would be ignored: set server_optimizer.kind to momentum, adam or yogi, or drop them"
        )


def strategy_label(strategy: StrategyEntry) -> str:
    """The name a strategy's results are filed under: its ``label``, else its name (a class name for an
    import path: ``mypkg.strats:MyStrategy`` is filed under ``MyStrategy``)."""
    if strategy.label:
        return strategy.label
    return strategy.name.rpartition(":")[2] if is_import_path(strategy.name) else strategy.name


def _format_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors()[:5]:
        key = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-"))
        where = f"key '{key}'" if key else "config"
        got = item.get("input")
        shown = f" (got {redact(repr(got))})" if item["type"] != "missing" and not isinstance(got, dict) else ""
        lines.append(f"{where}: {item['msg']}{shown}")
    more = f"\n  ... and {len(error.errors()) - 5} more" if len(error.errors()) > 5 else ""
    joined = "\n  ".join(lines)
    return f"invalid config {source}:\n  {joined}{more}\nFix the key(s) above; see examples/quickstart.yaml."


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (for example rounds=10), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``raw[path[0]][path[1]]... = value``; list items are addressed by index."""
    node: Any = raw
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        dotted = ".".join(path[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {'.'.join(path)}: '{dotted}' is not an index of a {len(node)}-item list")
            index = int(part)
            if isinstance(node[index], str) and not last:
                node[index] = {"name": node[index]}
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {'.'.join(path)}: '{dotted}' is inside a value that is not a table")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config, apply ``--set`` overrides and validate everything."""
    raw: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        config_path = Path(path)
        if not config_path.is_file():
            raise ConfigError(f"config file {config_path} not found; pass a YAML file such as examples/quickstart.yaml")
        try:
            loaded = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {config_path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_path} must hold a YAML mapping at the top level")
        raw = loaded
        _anchor_data_path(raw, config_path.parent)
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    config = config_from_dict(raw, source)
    dataset = config.data.dataset
    if is_user_data_path(dataset) and not Path(dataset).expanduser().exists():
        raise ConfigError(
            f"invalid config {source}:\n  key 'data.dataset': {dataset!r} is none of the built-in datasets "
            f"({', '.join(BUILTIN_DATASETS)}), not an import path 'package.module:function', and no such file or "
            "folder exists: give a .npz/.safetensors file or an image folder (relative paths are relative to the "
            "config file's folder)"
        )
    return config


def _anchor_data_path(raw: dict[str, Any], folder: Path) -> None:
    """A relative ``data.dataset`` path in a YAML file is relative to that file's folder (not the cwd)."""
    data = raw.get("data")
    dataset = data.get("dataset") if isinstance(data, dict) else None
    if isinstance(data, dict) and isinstance(dataset, str) and dataset.strip() and is_user_data_path(dataset):
        path = Path(dataset).expanduser()
        data["dataset"] = str(path if path.is_absolute() else (folder / path).resolve())


def config_from_dict(raw: dict[str, Any], source: str = "(dict)") -> ExperimentConfig:
    """Validate a config; a relative ``data.dataset`` path left (from ``--set`` or a dict) is made absolute
    against the current directory, so the resolved config names the same file wherever it is read."""
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    dataset = config.data.dataset
    if is_user_data_path(dataset) and not Path(dataset).expanduser().is_absolute():
        data = config.data.model_copy(update={"dataset": str(Path(dataset).expanduser().resolve())})
        config = config.model_copy(update={"data": data})
    return config


def config_to_dict(config: ExperimentConfig, with_secrets: bool = False) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (what summary.json records): every password in it
    (a store URL's) shown as ``***``, as everything written or shown must. ``with_secrets``: as it is,
    for a copy that stays in this process's memory."""
    dumped = config.model_dump(mode="json")
    return dumped if with_secrets else cast(dict[str, Any], redact_values(dumped))


def embedded(config: ExperimentConfig) -> bool:
    """Whether a simulation runs whole in its own process: the memory store, local functions and training."""
    return config.server.store == "memory" and config.server.runtime == "local" and not trains_on_ray(config)


def trains_on_ray(config: ExperimentConfig) -> bool:
    """Whether the simulation trains its devices on Ray (``ray.train``, by default with the Ray runtime)."""
    return config.server.runtime == "ray" if config.ray.train is None else config.ray.train
