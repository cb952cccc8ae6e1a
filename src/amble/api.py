"""Run AMBLE from Python (a notebook, a script): a config in code or YAML, your model and arrays, the results back.

    import amble
    result = amble.run(
        {"name": "mine", "data": {"num_devices": 8, "partition": {"kind": "natural"}}, "rounds": 20,
         "devices_per_round": 4, "strategies": ["fedavg", "amble"]},
        model=make_net,                       # f(input_shape, num_classes, **model_args) -> nn.Module
        data={"x": x, "y": y, "owner": owner},  # or x_train, y_train, x_test, y_test[, owner_train]
    )
    result.strategies["amble"]["time_to_target_s"], result.report

It drives the same code as ``amble run`` (:func:`amble.sim.run_experiment`) and writes the same files.
Arrays are checked and written to ``OUT/data.npz``, which the config then names, so the run can be
resumed and its outputs say what it trained on. A model factory that is importable by its module and
name is recorded as that import path (it works with Ray too); any other callable (a notebook's
function, a lambda) is used in this process only.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amble.config import ExperimentConfig, apply_override, config_from_dict, config_to_dict, load_config, parse_override
from amble.data.files import save_arrays
from amble.errors import ConfigError
from amble.imports import is_import_path
from amble.models import ModelFactory

DATA_FILE = "data.npz"
"""Where arrays passed to :func:`run` are written, inside the run's output directory."""


@dataclass(frozen=True)
class RunResult:
    """What a run produced: per-strategy summary numbers and where its files are."""

    out_dir: Path
    config: ExperimentConfig
    strategies: dict[str, dict[str, Any]]
    """By strategy label: final_accuracy, best_accuracy, time_to_target_s, virtual_time_s, ... (summary.json)."""

    @property
    def metrics(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def devices(self) -> Path:
        return self.out_dir / "devices.jsonl"

    @property
    def summary(self) -> Path:
        return self.out_dir / "summary.json"

    @property
    def report(self) -> Path:
        return self.out_dir / "report.html"


def run(
    config: ExperimentConfig | Mapping[str, Any] | str | Path,
    *,
    model: str | ModelFactory | None = None,
    model_args: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = False,
    resume: bool = False,
) -> RunResult:
    """Run every strategy of ``config`` as ``amble run`` does and return the results.

    ``config`` is a YAML path, a dict of the same keys or an :class:`~amble.config.ExperimentConfig`;
    ``overrides`` are ``--set`` strings (``"rounds=10"``). ``model`` (a built-in name, an import path or
    a factory ``f(input_shape, num_classes, **model_args)``) and ``model_args`` replace the config's;
    ``data`` (numpy arrays or tensors named as :mod:`amble.data.files` says) replaces ``data.dataset``.
    Outputs go to ``out_dir`` (default ``runs/<name>``).
    """
    from amble.sim import run_experiment  # the simulator pulls in torch and the server: only when running

    raw = _raw_config(config, overrides or [])
    factory: ModelFactory | None = None
    if model is not None:
        raw["model"], factory = _model_entry(model)
    if model_args is not None:
        raw["model_args"] = dict(model_args)
    name = str(raw.get("name", "experiment"))
    out = Path(out_dir) if out_dir is not None else Path("runs") / name
    if data is not None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"data must be a dict of arrays (x, y[, owner] or x_train, ...), not {type(data)}")
        target = (out / DATA_FILE).resolve()
        save_arrays(data, target)
        section = raw.get("data")
        raw["data"] = {**(section if isinstance(section, dict) else {}), "dataset": str(target)}
    resolved = config_from_dict(raw, "given to amble.run")
    summary = run_experiment(resolved, out, progress=progress, resume=resume, model_factory=factory)
    return RunResult(out, resolved, dict(summary["strategies"]))


def _raw_config(config: ExperimentConfig | Mapping[str, Any] | str | Path, overrides: list[str]) -> dict[str, Any]:
    if isinstance(config, str | Path):
        return config_to_dict(load_config(config, overrides), with_secrets=True)
    if isinstance(config, ExperimentConfig):
        raw = config_to_dict(config, with_secrets=True)
    elif isinstance(config, Mapping):
        raw = copy.deepcopy(dict(config))
    else:
        raise ConfigError(f"config must be a YAML path, a dict or an ExperimentConfig, not {type(config).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    return raw


def _model_entry(model: str | Callable[..., Any]) -> tuple[str, ModelFactory | None]:
    """The config's ``model`` value and, for a callable not importable by name, the callable itself."""
    if isinstance(model, str):
        return model, None
    if not callable(model):
        raise ConfigError(f"model must be a name, an import path or a callable, not {type(model).__name__}")
    module, qualname = getattr(model, "__module__", "") or "", getattr(model, "__qualname__", "") or ""
    path = f"{module}:{qualname}"
    if module != "__main__" and is_import_path(path) and _imports_back(path, model):
        return path, None
    # Recorded for the outputs only; the callable itself builds the model, in this process.
    safe_module = module if re.fullmatch(r"[A-Za-z_][\w.]*", module) else "in_memory"
    return f"{safe_module}:{re.sub(r'[^0-9A-Za-z_.]', '_', qualname).strip('.') or 'model'}", model


def _imports_back(path: str, model: object) -> bool:
    from amble.imports import resolve_callable

    try:
        return bool(resolve_callable(path, "model") is model)
    except ConfigError:
        return False
