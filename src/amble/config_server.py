"""The config's sections for where the parameter server and the training run: ``server`` and ``ray``
(in their own module to keep ``config.py`` readable; ``amble.config`` re-exports both)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """A config section: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(Section):
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
    samples (its own included), checked once ``devices_per_round`` other devices have registered, and
    again for every registered device when a round starts (one over it is left out of the round)."""
    max_concurrent_requests: int = Field(512, ge=1)
    """``amble serve``: requests served at once (uvicorn's ``limit_concurrency``); more get 503."""

    store: str = Field("memory", pattern=r"^(memory|rediss?://.+|unix://.+)$")
    """``memory`` (embedded, one process) or a Redis URL such as ``redis://127.0.0.1:6379/0``, whose
    functions run in ``amble worker`` processes."""
    runtime: Literal["local", "ray"] = "local"
    """Where functions run: ``local`` (in process with ``memory``, else ``amble worker`` processes) or
    ``ray`` (Ray actors; needs a Redis store every node can reach, see the ``ray`` section)."""
    workers: int = Field(0, ge=0)
    """With a Redis store: at least this many local ``amble worker`` processes serve the run, started
    by it and replaced when they die or wedge (0 and no ``autoscale``: only workers started elsewhere)."""
    autoscale: bool = False
    """With a Redis store: start more local workers while events wait (one per waiting event, up to
    ``max_instances``); those above ``workers`` leave after ``keep_alive_s`` idle, so with
    ``workers: 0`` the pool scales to zero between bursts."""
    visibility_timeout_s: float = Field(30.0, gt=0)
    """With a Redis store: seconds an un-acked event waits before another worker claims it."""
    drain_timeout_s: float = Field(120.0, gt=0)
    """With a Redis store: seconds without any function progress before the run fails (never hangs)."""
    keep_alive_s: float = Field(60.0, ge=0)
    """Seconds an idle function instance stays warm (virtual clock; real idle seconds for the
    ``autoscale`` pool's workers)."""
    max_instances: int = Field(4, ge=1)
    """The most function instances at once (virtual pool; real workers with ``autoscale``)."""
    reuse: bool = True
    """False: every event gets a fresh (cold) instance; the real pool's workers then run one event each."""
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

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        if self.autoscale and (self.store == "memory" or self.runtime != "local"):
            raise ValueError(
                "server.autoscale scales local `amble worker` processes: it needs a Redis store "
                "(server.store: redis://...) and server.runtime: local"
            )
        return self


class RayConfig(Section):
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
