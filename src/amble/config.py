"""The experiment config: typed, validated on load, overridable with ``--set a.b=value``.

A config is YAML. Every section is a frozen pydantic model that forbids unknown keys, so a typo
fails at load time with a message naming the key, instead of silently running the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from amble.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartitionConfig(_Section):
    """How the training set is split over devices (SPEC 7)."""

    kind: Literal["iid", "shards", "dirichlet", "quantity"] = "iid"
    shards_per_device: int = Field(2, ge=1)
    alpha: float = Field(0.5, gt=0)
    quantity_sigma: float = Field(1.0, ge=0)
    min_samples: int = Field(1, ge=1)


class DataConfig(_Section):
    dataset: Literal["fashion-mnist", "mnist", "cifar10", "synthetic"] = "fashion-mnist"
    root: str = "auto"
    partition: PartitionConfig = PartitionConfig()
    num_devices: int = Field(100, ge=1)
    synthetic_size: tuple[int, int] = (2000, 500)
    """Train and test samples of the generated ``synthetic`` dataset (ignored by real datasets)."""

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


Aggregator = Literal["fedavg", "fednova"]


class FedAvgConfig(_Section):
    name: Literal["fedavg"]
    label: str | None = None
    aggregator: Aggregator | None = None


class AmbleConfig(_Section):
    """AMBLE planner knobs (SPEC 3); defaults are the safe ones the prototype evidence points to."""

    name: Literal["amble"]
    label: str | None = None
    aggregator: Aggregator | None = None
    deadline_quantile: float = Field(1.0, gt=0, le=1)
    deadline_s: float | None = Field(None, gt=0)
    batch_min: int = Field(16, ge=1)
    batch_max: int = Field(256, ge=1)
    batch_multiple: int = Field(8, ge=1)
    epochs_max: float = Field(5.0, gt=0)
    deadline_slack: float = Field(0.1, ge=0, lt=1)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    lr_max_factor: float = Field(2.0, ge=1)
    lr_warmup_steps: int = Field(0, ge=0)
    prox_mu: float = Field(0.0, ge=0)
    """FedProx's proximal term ``mu/2 ||w - w_r||^2`` in every device's objective: holds long local runs
    on non-IID data closer to the round's model (0: none)."""
    speed_decay: float = Field(0.7, gt=0, le=1)
    speed_window: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> AmbleConfig:
        if self.batch_min > self.batch_max:
            raise ValueError("batch_min must be <= batch_max")
        return self


class _SpeedAware(_Section):
    label: str | None = None
    aggregator: Aggregator | None = None
    speed_decay: float = Field(0.7, gt=0, le=1)
    speed_window: int = Field(8, ge=1)


class DeadlineConfig(_SpeedAware):
    """FedAvg that drops the devices not done by ``T_r`` (the q-quantile of predicted FedAvg times)."""

    name: Literal["deadline"]
    deadline_quantile: float = Field(0.8, gt=0, le=1)
    deadline_s: float | None = Field(None, gt=0)


class FedProxConfig(_SpeedAware):
    """FedProx: proximal term ``prox_mu``; devices past ``T_r`` send the partial work they finished."""

    name: Literal["fedprox"]
    deadline_quantile: float = Field(0.8, gt=0, le=1)
    deadline_s: float | None = Field(None, gt=0)
    prox_mu: float = Field(0.01, ge=0)


class FedNovaConfig(_SpeedAware):
    """FedProx-style partial work with FedNova's normalised aggregation."""

    name: Literal["fednova"]
    deadline_quantile: float = Field(0.8, gt=0, le=1)
    deadline_s: float | None = Field(None, gt=0)
    prox_mu: float = Field(0.0, ge=0)


class AdaBatchConfig(_SpeedAware):
    """DBS: batch proportional to measured throughput, fixed epochs, no lr scaling."""

    name: Literal["adabatch"]
    batch_min: int = Field(16, ge=1)
    batch_max: int = Field(256, ge=1)
    batch_multiple: int = Field(8, ge=1)


AnyStrategyConfig = FedAvgConfig | AmbleConfig | DeadlineConfig | FedProxConfig | FedNovaConfig | AdaBatchConfig
StrategyConfig = Annotated[AnyStrategyConfig, Field(discriminator="name")]
STRATEGY_NAMES = ("fedavg", "amble", "deadline", "fedprox", "fednova", "adabatch")


def _default_strategies() -> list[AnyStrategyConfig]:
    return [FedAvgConfig(name="fedavg")]


class ServerConfig(_Section):
    """The serverless parameter server (SPEC 5)."""

    device_data: Literal["partition", "own"] = "partition"
    """Where real devices' data comes from under ``amble serve``: ``partition`` (each device loads its
    partition of the config's dataset, so the server knows its sample count, its FedAvg weight, and
    refuses any other) or ``own`` (devices bring their own data: a registration is only bounded by
    ``max_samples`` and ``max_weight_share``)."""
    max_samples: int = Field(100_000, ge=1)
    """With ``device_data: own``: the most training samples a device may register."""
    max_weight_share: float = Field(0.5, gt=0, le=1)
    """With ``device_data: own``: no device may register more than this share of all registered
    samples (its own included), checked once ``devices_per_round`` other devices have registered."""
    max_concurrent_requests: int = Field(512, ge=1)
    """``amble serve``: requests served at once (uvicorn's ``limit_concurrency``); more get 503."""

    store: str = Field("memory", pattern=r"^(memory|rediss?://.+|unix://.+)$")
    """``memory`` (embedded, one process) or a Redis URL such as ``redis://127.0.0.1:6379/0``, whose
    functions run in ``amble worker`` processes."""
    runtime: Literal["local", "ray"] = "local"
    """Where functions run: ``local`` (in process with ``memory``, else ``amble worker`` processes) or
    ``ray`` (Ray actors; needs a Redis store every node can reach, see the ``ray`` section)."""
    workers: int = Field(0, ge=0)
    """With a Redis store: local ``amble worker`` processes to start for the run (0: use running ones)."""
    visibility_timeout_s: float = Field(30.0, gt=0)
    """With a Redis store: seconds an un-acked event waits before another worker claims it."""
    drain_timeout_s: float = Field(120.0, gt=0)
    """With a Redis store: seconds without any function progress before the run fails (never hangs)."""
    keep_alive_s: float = Field(60.0, ge=0)
    max_instances: int = Field(4, ge=1)
    reuse: bool = True
    cold_start_s: float = Field(0.25, ge=0)
    """Virtual seconds a cold instance spends starting before it runs (a provisioned container)."""
    invocation_s: float | Literal["measured"] = 0.02
    """Virtual seconds charged per function invocation, or ``measured`` to charge the real wall time
    (then virtual times vary slightly between runs of the same config and seed)."""
    quorum: float = Field(0.5, gt=0, le=1)
    max_update_mb: float = Field(256.0, gt=0)
    max_attempts: int = Field(5, ge=1)
    max_update_norm: float | None = Field(1e4, gt=0)
    """Refuse an update whose L2 norm (all its tensors together) is above this (reason ``norm``);
    ``null``: no absolute bound. The default is far above any honest update of the repo's models."""
    max_update_norm_ratio: float | None = Field(20.0, gt=1)
    """Refuse an update whose L2 norm is above this many times the median norm of the updates that
    made the model it trained from (the previous finalized round's; none before the first). Fixed
    before the round's first upload, so the bound does not depend on the order of arrival. ``null``: off."""


class RayConfig(_Section):
    """Running on Ray (the ``amble[ray]`` extra): with ``server.runtime: ray`` and/or ``train``."""

    address: str = Field("local", pattern=r"^(local|auto|ray://.+|[^\s:/]+:\d+)$")
    """``local`` (start Ray in this process), ``auto`` (a cluster started with ``ray start``) or
    ``ray://HOST:PORT`` / ``HOST:PORT``."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a ``local`` Ray instance (default: all of this machine's)."""
    train: bool | None = None
    """Train the devices of each round on Ray actors; ``None``: when ``server.runtime`` is ``ray``."""
    trainers: int | None = Field(None, ge=1)
    """Training actors, one CPU each (default: the cluster's CPUs)."""


class EvalConfig(_Section):
    every: int = Field(1, ge=1)
    target_accuracy: float = Field(0.75, gt=0, le=1)
    test_samples: int | None = Field(None, ge=1)
    batch_size: int = Field(2000, ge=1)


class ExperimentConfig(_Section):
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    data: DataConfig = DataConfig()
    model: Literal["mlp", "cnn", "lenet", "resnet20", "cifar-cnn", "mlp-small"] = "lenet"
    fleet: FleetConfig = FleetConfig()
    rounds: int = Field(50, ge=1)
    devices_per_round: int = Field(10, ge=1)
    train: TrainConfig = TrainConfig()
    strategies: list[StrategyConfig] = Field(default_factory=_default_strategies)
    aggregator: Aggregator | None = None
    """Overrides every strategy's aggregator (a strategy's own ``aggregator`` key wins); None: their defaults."""
    server: ServerConfig = ServerConfig()
    ray: RayConfig = RayConfig()
    eval: EvalConfig = EvalConfig()

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
        for strategy in self.strategies:
            if isinstance(strategy, AmbleConfig) and strategy.epochs_max < self.train.local_epochs:
                raise ValueError(
                    f"strategy '{strategy_label(strategy)}': epochs_max ({strategy.epochs_max}) is below "
                    f"train.local_epochs ({self.train.local_epochs}); raise epochs_max"
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
        if self.devices_per_round > self.data.num_devices:
            raise ValueError(
                f"devices_per_round ({self.devices_per_round}) exceeds data.num_devices ({self.data.num_devices})"
            )
        return self


def strategy_label(strategy: AnyStrategyConfig) -> str:
    """The name a strategy's results are filed under."""
    return strategy.label or strategy.name


def _format_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors()[:5]:
        parts = [str(p) for p in item["loc"] if not str(p).startswith("function-")]
        # Drop the discriminator tag pydantic inserts after a strategy's index ("strategies.1.amble.lr").
        key = ".".join(p for i, p in enumerate(parts) if not (i and parts[i - 1].isdigit() and p in STRATEGY_NAMES))
        where = f"key '{key}'" if key else "config"
        got = item.get("input")
        shown = f" (got {got!r})" if item["type"] != "missing" and not isinstance(got, dict) else ""
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
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    return config_from_dict(raw, source)


def config_from_dict(raw: dict[str, Any], source: str = "(dict)") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (what summary.json records)."""
    return config.model_dump(mode="json")


def trains_on_ray(config: ExperimentConfig) -> bool:
    """Whether the simulation trains its devices on Ray (``ray.train``, by default with the Ray runtime)."""
    return config.server.runtime == "ray" if config.ray.train is None else config.ray.train
