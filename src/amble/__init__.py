"""AMBLE: adaptive mini-batch and local epochs for federated learning, with a serverless parameter server.

The Python API (:mod:`amble.api`): ``amble.run(config, model=..., data=...)`` returns an ``amble.RunResult``;
``amble.load_config(path)`` reads a YAML config. They load on first use, so ``import amble`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["RunResult", "load_config", "run"]


def __getattr__(name: str) -> Any:
    if name in ("RunResult", "run"):
        from amble import api

        return getattr(api, name)
    if name == "load_config":
        from amble.config import load_config

        return load_config
    raise AttributeError(f"module 'amble' has no attribute {name!r}")
