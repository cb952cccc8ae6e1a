"""Training many simulated devices at once: one vectorised computation over stacked parameters.

Devices of a round that run the same plan (batch size, steps, learning rate and its warm-up, FedProx
term) on the same model differ only in their data and batch order, so their local SGD can run as
one computation: the parameters of ``n`` devices stacked along a new first axis, each step's ``n``
mini-batches gathered into one ``(n, B, ...)`` tensor, and the per-device gradients taken at once
with ``torch.func.vmap(grad(loss))`` (batched matrix products instead of ``n`` small ones). The
update is SGD exactly as :class:`~amble.client.trainer.LocalTrainer` runs it (weight decay, then
momentum, the same batch order from the same seeds), so the results equal the per-device path up to
floating-point summation order.

It applies to models whose state is their parameters (no buffers: BatchNorm keeps running
statistics, which a vectorised step would share); other models, and plans no other device shares,
take the per-device path.
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


def group_key(plan: Plan, num_samples: int) -> tuple[object, ...]:
    """Devices with equal keys can train in one vectorised group."""
    batch = min(plan.batch_size, num_samples)
    return (batch, plan.local_steps, plan.lr, plan.prox_mu, plan.lr_warmup_steps, plan.lr_warmup_from)


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
        plan: Plan,
        seeds: list[int],
        corrections: list[Params | None] | None = None,
    ) -> list[GroupResult]:
        """Train ``len(data)`` devices from ``start`` on one plan; the i-th uses ``data[i]`` and ``seeds[i]``,
        and adds ``corrections[i]`` (SCAFFOLD's ``c - c_k``; None: zero) to its every gradient."""
        count = len(data)
        batch = min(plan.batch_size, *(len(y) for _, y in data))
        steps = plan.local_steps
        # Every device's batch order, exactly as LocalTrainer draws it, as rows of one gather index.
        offsets, orders = 0, []
        for (_, y), seed in zip(data, seeds, strict=True):
            order = batch_indices(len(y), batch, steps, torch.Generator().manual_seed(seed))  # (steps, B)
            orders.append(order + offsets)
            offsets += len(y)
        index = torch.stack(orders)  # (n, steps, B)
        xs = torch.cat([x for x, _ in data])
        ys = torch.cat([y for _, y in data])

        base = {name: start[name] for name in self.names}
        params = {name: value.unsqueeze(0).repeat(count, *[1] * value.dim()) for name, value in base.items()}
        velocity: dict[str, torch.Tensor] = {}
        shift: dict[str, torch.Tensor] = {}
        if corrections is not None and any(c is not None for c in corrections):
            shift = {
                name: torch.stack(
                    [torch.zeros_like(base[name]) if c is None else c[name].to(base[name].dtype) for c in corrections]
                )
                for name in self.names
            }
        with torch.no_grad():
            for step in range(steps):
                taken = index[:, step]  # (n, B)
                grads = self._grads(params, xs[taken], ys[taken])
                lr = step_lr(plan, step)
                for name in self.names:
                    d = grads[name]
                    if shift:  # SCAFFOLD: grad + c - c_k, per device
                        d = d + shift[name]
                    if plan.prox_mu > 0:  # FedProx: the gradient of mu/2 ||w - w_start||^2
                        d = d + plan.prox_mu * (params[name] - base[name])
                    if self.weight_decay:
                        d = d.add(params[name], alpha=self.weight_decay)
                    if self.momentum:
                        if name in velocity:
                            velocity[name].mul_(self.momentum).add_(d)
                        else:
                            velocity[name] = d.clone()
                        d = velocity[name]
                    params[name].add_(d, alpha=-lr)
        return [
            GroupResult({name: params[name][i] - base[name] for name in self.names}, steps, steps * batch)
            for i in range(count)
        ]
