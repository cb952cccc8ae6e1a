"""Training many simulated devices at once: one vectorised computation over stacked parameters.

Devices of a round that train with the same effective batch size, learning-rate schedule and FedProx
term on the same model differ only in their data, their batch order and how many steps they take, so
their local SGD can run as one computation: the parameters of ``n`` devices stacked along a new first
axis, each step's mini-batches gathered into one ``(k, B, ...)`` tensor, and the per-device gradients
taken at once with ``torch.func.vmap(grad(loss))`` (batched matrix products instead of ``k`` small
ones). Step counts may differ (AMBLE's plans give every device its own): the group is sorted by steps,
longest first, and step ``s`` runs on the leading ``k`` devices that still have a step ``s`` (a prefix
of the stacked tensors, so nothing is padded and no device computes a step it does not take).

The update is SGD exactly as :class:`~amble.client.trainer.LocalTrainer` runs it (weight decay, then
momentum, the same scalar learning rate per step, the same batch order from the same seeds), so the
results equal the per-device path up to floating-point summation order inside each gradient.

It applies to models whose state is their parameters (no buffers: BatchNorm keeps running
statistics, which a vectorised step would share); other models, and devices whose group would be
a single device, take the per-device path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from amble.client.trainer import batch_indices
from amble.strategies import Params, Plan
from amble.strategies.base import step_lr


@dataclass(frozen=True)
class GroupResult:
    delta: Params
    steps: int
    samples: int


def why_not_vectorized(model: nn.Module) -> str | None:
    """Why this model's devices cannot train vectorised, or None if they can."""
    if any(True for _ in model.buffers()):
        return "the model has buffers (BatchNorm running statistics), which devices cannot share in one step"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return "the model has dropout, whose random masks vmap cannot draw per device"
    return None


def slower_vectorized(model: nn.Module) -> str | None:
    """Why vectorising this model's devices would be slower than training them one by one, or None.

    vmap turns a convolution over stacked weights into one grouped convolution, which oneDNN runs
    slower than the per-device channels-last convolutions: LeNet-5, 20 devices, one thread, 1.17x
    the per-device time with one plan and 1.70x with AMBLE-like plans (BENCHMARKS.md)."""
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        return "the model has convolutions, which train faster per device than as one grouped convolution"
    return None


def group_key(plan: Plan, num_samples: int) -> tuple[object, ...]:
    """Devices with equal keys can train in one vectorised group (their step counts may differ)."""
    batch = min(plan.batch_size, num_samples)
    return (batch, plan.lr, plan.prox_mu, plan.lr_warmup_steps, plan.lr_warmup_from)


class VectorizedTrainer:
    def __init__(self, model: nn.Module, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        reason = why_not_vectorized(model)
        if reason is not None:
            raise ValueError(f"cannot vectorise training: {reason}")
        self.model = model
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.names = [name for name, _ in model.named_parameters()]

        def loss(params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            value: torch.Tensor = F.cross_entropy(functional_call(self.model, dict(params), (x,)), y)
            return value

        self._grads = vmap(grad(loss))

    def train(
        self,
        start: Params,
        data: list[tuple[torch.Tensor, torch.Tensor]],
        plans: Plan | list[Plan],
        seeds: list[int],
        corrections: list[Params | None] | None = None,
    ) -> list[GroupResult]:
        """Train ``len(data)`` devices from ``start``; the i-th uses ``data[i]``, ``plans[i]`` (one plan: all)
        and ``seeds[i]``, and adds ``corrections[i]`` (SCAFFOLD's ``c - c_k``; None: zero) to its every
        gradient. The plans must share a :func:`group_key` (given each device's data); steps may differ."""
        count = len(data)
        plan_of = [plans] * count if isinstance(plans, Plan) else list(plans)
        keys = {group_key(plan, len(y)) for plan, (_, y) in zip(plan_of, data, strict=True)}
        if len(keys) != 1:
            raise ValueError(f"devices of one vectorised group must share batch, lr and FedProx term; got {keys}")
        plan, batch = plan_of[0], min(plan_of[0].batch_size, len(data[0][1]))
        # Longest first: step s runs on the devices [0, active[s]) of the stacked tensors.
        rank = sorted(range(count), key=lambda i: -plan_of[i].local_steps)
        steps = [plan_of[i].local_steps for i in rank]
        index, xs, ys = self._batches([data[i] for i in rank], steps, [seeds[i] for i in rank], batch)
        active = [sum(1 for n in steps if n > step) for step in range(steps[0])]

        base = {name: start[name] for name in self.names}
        params = {name: value.unsqueeze(0).repeat(count, *[1] * value.dim()) for name, value in base.items()}
        shift = self._shifts(base, None if corrections is None else [corrections[i] for i in rank])
        velocity: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for step, k in enumerate(active):
                taken = index[:k, step]  # (k, B)
                live = {name: value[:k] for name, value in params.items()}
                grads = self._grads(live, xs[taken], ys[taken])
                lr = step_lr(plan, step)
                for name in self.names:
                    d = grads[name]
                    if shift:  # SCAFFOLD: grad + c - c_k, per device
                        d = d + shift[name][:k]
                    if plan.prox_mu > 0:  # FedProx: the gradient of mu/2 ||w - w_start||^2
                        d = d + plan.prox_mu * (live[name] - base[name])
                    if self.weight_decay:
                        d = d.add(live[name], alpha=self.weight_decay)
                    if self.momentum:
                        if name in velocity:
                            d = velocity[name][:k].mul_(self.momentum).add_(d)
                        else:
                            velocity[name] = d.clone()
                            d = velocity[name]
                    live[name].add_(d, alpha=-lr)
        results: list[GroupResult | None] = [None] * count
        for row, i in enumerate(rank):
            delta = {name: params[name][row] - base[name] for name in self.names}
            results[i] = GroupResult(delta, steps[row], steps[row] * batch)
        return [result for result in results if result is not None]

    @staticmethod
    def _batches(
        data: list[tuple[torch.Tensor, torch.Tensor]], steps: list[int], seeds: list[int], batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every device's batch order, exactly as LocalTrainer draws it, as rows of one gather index
        ``(n, max steps, B)`` into the devices' concatenated samples (a device's rows past its own
        steps are never read)."""
        index = torch.zeros((len(data), steps[0], batch), dtype=torch.long)
        offset = 0
        for row, ((_, y), n, seed) in enumerate(zip(data, steps, seeds, strict=True)):
            index[row, :n] = batch_indices(len(y), batch, n, torch.Generator().manual_seed(seed)) + offset
            offset += len(y)
        return index, torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])

    def _shifts(self, base: Params, corrections: list[Params | None] | None) -> dict[str, torch.Tensor]:
        """SCAFFOLD's per-device corrections stacked like the parameters (empty: none)."""
        if corrections is None or all(c is None for c in corrections):
            return {}
        return {
            name: torch.stack(
                [torch.zeros_like(base[name]) if c is None else c[name].to(base[name].dtype) for c in corrections]
            )
            for name in self.names
        }
