"""Local training: plans are followed exactly, and training actually learns."""

from __future__ import annotations

import copy

import torch

from amble.client import LocalTrainer, batch_indices, evaluate
from amble.data import make_synthetic
from amble.models import build_model
from amble.strategies import Plan


def test_batch_indices_cover_each_epoch_before_repeating() -> None:
    order = batch_indices(10, 4, 5, torch.Generator().manual_seed(0))  # 20 draws = 2 epochs
    flat = order.flatten().tolist()
    assert order.shape == (5, 4)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))


def _setup() -> tuple[LocalTrainer, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    data = make_synthetic(num_train=256, num_test=128, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    return LocalTrainer(copy.deepcopy(model)), start, data.x_train, data.y_train


def test_training_follows_the_plan_and_reduces_loss() -> None:
    trainer, start, x, y = _setup()
    model = build_model("mlp", (1, 28, 28), 10)
    model.load_state_dict(start)
    _, loss_before = evaluate(model, x, y)

    result = trainer.train(start, x, y, Plan(batch_size=32, local_steps=40, lr=0.2), seed=1)

    assert (result.steps, result.samples) == (40, 1280)
    model.load_state_dict({k: start[k] + result.delta[k] for k in result.delta})
    _, loss_after = evaluate(model, x, y)
    assert loss_after < loss_before * 0.5
    assert set(result.delta) == set(start)  # every float tensor has a delta


def test_same_seed_same_update_and_start_state_untouched() -> None:
    trainer, start, x, y = _setup()
    snapshot = {k: v.clone() for k, v in start.items()}
    plan = Plan(batch_size=16, local_steps=5, lr=0.05)

    first = trainer.train(start, x, y, plan, seed=3)
    second = trainer.train(start, x, y, plan, seed=3)
    third = trainer.train(start, x, y, plan, seed=4)

    for name in first.delta:
        assert torch.equal(first.delta[name], second.delta[name])
        assert torch.equal(start[name], snapshot[name])
    assert any(not torch.equal(first.delta[n], third.delta[n]) for n in first.delta)


def test_proximal_term_pulls_the_update_towards_the_start() -> None:
    trainer, start, x, y = _setup()
    free = trainer.train(start, x, y, Plan(32, 20, 0.1), seed=2)
    prox = trainer.train(start, x, y, Plan(32, 20, 0.1, prox_mu=5.0), seed=2)

    def norm(delta: dict[str, torch.Tensor]) -> float:
        return float(sum((v**2).sum() for v in delta.values()))

    assert norm(prox.delta) < norm(free.delta)


def test_warmup_starts_from_the_base_rate() -> None:
    trainer, start, x, y = _setup()
    plain = trainer.train(start, x, y, Plan(32, 1, 0.2), seed=2)
    warm = trainer.train(start, x, y, Plan(32, 1, 0.2, lr_warmup_steps=2, lr_warmup_from=0.1), seed=2)
    # the first step of a ramp from 0.1 to 0.2 runs at 0.1: half the plain update. Both steps take the
    # same gradient g (same start, same batch), and -0.1 g is exactly half of -0.2 g, so they differ only
    # by the roundings of w - lr g (FMA or not: a product and a sum, each within u |value|, u = 2**-24)
    # and of the delta w' - w: at most 3 u (|w| + |0.2 g|) apart.
    u = 2.0**-24
    for name in plain.delta:
        bound = 3 * u * (float(start[name].abs().max()) + float(plain.delta[name].abs().max()))
        torch.testing.assert_close(warm.delta[name], plain.delta[name] / 2, rtol=0, atol=bound)
