"""Local training on one device: run a plan from a start model, return the update (delta)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from amble.strategies.base import Params, Plan, step_lr


@dataclass(frozen=True)
class LocalResult:
    delta: Params
    """``local - start`` for every floating-point entry of the state dict."""
    steps: int
    samples: int
    mean_loss: float


def batch_indices(num_samples: int, batch_size: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """``steps x batch_size`` indices drawn epoch by epoch (a fresh permutation per epoch).

    Every step sees exactly ``batch_size`` samples; an epoch boundary may fall inside a step.
    """
    needed = steps * batch_size
    epochs = -(-needed // num_samples)
    stream = torch.cat([torch.randperm(num_samples, generator=generator) for _ in range(epochs)])
    return stream[:needed].view(steps, batch_size)


class LocalTrainer:
    """Reuses one model object for every device, loading each round's start state into it."""

    def __init__(self, model: nn.Module, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.model = model
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.loss_fn = nn.CrossEntropyLoss()

    def train(
        self,
        start: Params,
        x: torch.Tensor,
        y: torch.Tensor,
        plan: Plan,
        seed: int,
        time_budget_s: float | None = None,
        correction: Params | None = None,
    ) -> LocalResult:
        """Run ``plan`` from ``start``. With ``time_budget_s`` (a real device facing its deadline), stop
        before a step that would end past the budget, judged by the mean step time so far (the first
        step always runs); without it, exactly ``plan.local_steps`` steps, unaffected by time.

        ``correction`` (SCAFFOLD's ``c - c_k``, by parameter name) is added to every step's gradient
        before weight decay and momentum: ``w -= lr * (grad + c - c_k)`` in plain SGD."""
        model = self.model
        model.load_state_dict(start)
        model.train()
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        shifts = [] if correction is None else [(p, correction[name].to(p.dtype)) for name, p in named]
        anchor = [p.detach().clone() for p in params] if plan.prox_mu > 0 else []
        optimizer = torch.optim.SGD(params, lr=plan.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        batch_size = min(plan.batch_size, len(y))
        generator = torch.Generator().manual_seed(seed)
        order = batch_indices(len(y), batch_size, plan.local_steps, generator)
        total_loss = torch.zeros(())
        steps, began = 0, time.perf_counter()
        for step, index in enumerate(order):
            if time_budget_s is not None and step > 0:
                elapsed_s = time.perf_counter() - began
                if elapsed_s + elapsed_s / step > time_budget_s:
                    break
            if plan.lr_warmup_steps:
                optimizer.param_groups[0]["lr"] = step_lr(plan, step)
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(model(x[index]), y[index])
            total_loss += loss.detach()
            if anchor:  # FedProx: mu/2 ||w - w_start||^2
                loss = loss + 0.5 * plan.prox_mu * sum(
                    ((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)
                )
            loss.backward()
            for p, shift in shifts:
                if p.grad is not None:
                    p.grad.add_(shift)
            optimizer.step()
            steps = step + 1
        with torch.no_grad():
            delta = {
                name: value - start[name] for name, value in model.state_dict().items() if value.is_floating_point()
            }
        return LocalResult(delta, steps, steps * batch_size, float(total_loss) / max(steps, 1))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)``."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for begin in range(0, len(y), batch_size):
        logits = model(x[begin : begin + batch_size])
        target = y[begin : begin + batch_size]
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return correct / len(y), loss_sum / len(y)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (for per-device, per-round randomness)."""
    return int(np.random.default_rng(list(parts)).integers(2**63 - 1))
