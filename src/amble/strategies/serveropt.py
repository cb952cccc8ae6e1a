"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"): how a round's aggregate
becomes the published model.

The strategy's aggregator gives ``new`` from the base model ``x``; the pseudo-gradient is
``g = x - new`` (float64, floating tensors only) and the server optimizer steps from ``x``:

- ``none``: publish ``new`` unchanged (FedAvg and every strategy before server optimizers);
- ``momentum`` (FedAvgM, Hsu et al. 2019): ``m = beta1 m + g``, ``x' = x - lr m``;
- ``adam`` (FedAdam): ``m = beta1 m + (1 - beta1) g``, ``v = beta2 v + (1 - beta2) g^2``,
  ``x' = x - lr m / (sqrt(v) + tau)`` (Reddi's variant: no bias correction);
- ``yogi`` (FedYogi): as ``adam`` with ``v = v - (1 - beta2) g^2 sign(v - g^2)``.

Pure functions on tensor dicts: the state (``m``, ``v``) is returned, never kept here; the parameter
server stores it next to the model version it belongs to. Like the aggregators, nothing here imports
torch (only tensor methods are used), so the config can validate these settings without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # at run time only a name: the config validates these settings without torch
    import torch

Params = dict[str, "torch.Tensor"]
"""Tensors by name (as ``amble.strategies.base.Params``; declared here too, since base.py imports this
module: every strategy carries a server optimizer)."""

ServerOptimizerKind = Literal["none", "momentum", "adam", "yogi"]

DEFAULT_LR: dict[str, float] = {"none": 1.0, "momentum": 1.0, "adam": 10**-1.5, "yogi": 10**-1.5}
"""The server learning rate of each kind when none is given. ``momentum``: 1.0 with ``beta1`` 0.9, the
common FedAvgM setting (Hsu et al. 2019; Reddi et al. 2021). ``adam`` and ``yogi``: 10^-1.5, from the
range 10^-2 .. 10^-1.5 of Reddi et al.'s tuned FedAdam server lrs (appendix D) for client lrs near
this repo's 0.05; one 8-round check on the quickstart (Fashion-MNIST shards) put 10^-1.5 ahead of
10^-2 (accuracy 0.42 vs 0.39 at round 8, best 0.47 vs 0.39)."""

PASSED_THROUGH_SUFFIXES = (".running_mean", ".running_var")
"""BatchNorm running statistics are averages the devices measure, not parameters a gradient moves: they
are published as the aggregator gives them (a server step could make a variance negative)."""


class ServerOptimizerSettings(BaseModel):
    """A strategy entry's ``server_optimizer``: ``{kind: adam, lr: 0.01, ...}``.

    ``kind`` left out means the strategy's own (``none`` except for ``fedavgm`` and ``fedadam``);
    ``lr`` left out means the kind's default (:data:`DEFAULT_LR`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ServerOptimizerKind | None = None
    lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Server learning rate (must be > 0)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """Momentum (``momentum``) or first-moment decay (``adam``, ``yogi``); in [0, 1)."""
    beta2: float = Field(0.99, ge=0, lt=1)
    """Second-moment decay (``adam``, ``yogi``); in [0, 1)."""
    tau: float = Field(1e-3, gt=0, allow_inf_nan=False)
    """Adaptivity: added to ``sqrt(v)`` (``adam``, ``yogi``); must be > 0."""

    def over(self, default: ServerOptimizerSettings) -> ServerOptimizerSettings:
        """These settings, with what they leave out taken from ``default`` (a strategy's own): all of
        ``default``'s keys when the kind is the same (or left out), only its kind otherwise."""
        if self.kind is not None and self.kind != default.kind:
            return self
        given = {k: v for k, v in self.model_dump(exclude_unset=True).items() if v is not None}
        return ServerOptimizerSettings.model_validate({**default.model_dump(exclude_unset=True), **given})

    def knobs_changed(self) -> list[str]:
        """The settings besides ``kind`` that differ from their defaults (so a config that went through
        a JSON dump, where every field is set, is judged the same as the YAML it came from)."""
        fields = ServerOptimizerSettings.model_fields
        return sorted(name for name in fields if name != "kind" and getattr(self, name) != fields[name].default)

    @property
    def resolved_kind(self) -> ServerOptimizerKind:
        return self.kind or "none"

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.resolved_kind]

    def state_names(self) -> tuple[str, ...]:
        """The per-parameter state this kind keeps: ``m`` (momentum), ``m`` and ``v`` (adam, yogi)."""
        return {"none": (), "momentum": ("m",), "adam": ("m", "v"), "yogi": ("m", "v")}[self.resolved_kind]

    def describe(self) -> str:
        kind = self.resolved_kind
        if kind == "none":
            return "none"
        if kind == "momentum":
            return f"momentum(lr={self.resolved_lr:g}, beta1={self.beta1:g})"
        return f"{kind}(lr={self.resolved_lr:g}, beta1={self.beta1:g}, beta2={self.beta2:g}, tau={self.tau:g})"


NO_SERVER_OPTIMIZER = ServerOptimizerSettings()


def moves(name: str, base: Params, new: Params) -> bool:
    """Whether the server optimizer steps tensor ``name`` (floating, aggregated, not a running statistic)."""
    return name in new and base[name].is_floating_point() and not name.endswith(PASSED_THROUGH_SUFFIXES)


def server_step(
    settings: ServerOptimizerSettings, base: Params, new: Params, state: Params | None
) -> tuple[Params, Params]:
    """The published model and the optimizer's next state, from the base model, the aggregator's
    ``new`` model and the state the base model was published with (None, or a tensor missing: zeros).

    The state is flat: ``m/<tensor>`` (and ``v/<tensor>``) per stepped tensor, float64. Computed in
    float64 and rounded to each tensor's dtype once. Inputs are not mutated. With kind ``none`` the
    result is ``new`` itself and the state is empty.
    """
    kind = settings.resolved_kind
    if kind == "none":
        return new, {}
    lr, beta1, beta2, tau = settings.resolved_lr, settings.beta1, settings.beta2, settings.tau
    state = state or {}
    published: Params = {}
    next_state: Params = {}
    for name, x in base.items():
        if not moves(name, base, new):
            published[name] = new[name] if name in new else x.clone()
            continue
        x64 = x.double()
        g = x64 - new[name].double()  # the pseudo-gradient
        m = state.get(f"m/{name}")
        if kind == "momentum":
            m = g if m is None else beta1 * m + g
            step = m
        else:
            m = (1 - beta1) * g if m is None else beta1 * m + (1 - beta1) * g
            v = state.get(f"v/{name}")
            g2 = g * g
            if v is None:
                v = g.new_zeros(g.shape)
            # yogi: v moves towards g^2 by (1 - beta2) g^2 at most, so it forgets a large g^2 more slowly
            v = beta2 * v + (1 - beta2) * g2 if kind == "adam" else v - (1 - beta2) * g2 * (v - g2).sign()
            next_state[f"v/{name}"] = v
            step = m / (v.sqrt() + tau)
        next_state[f"m/{name}"] = m
        published[name] = (x64 - lr * step).to(x.dtype)
    return published, next_state
