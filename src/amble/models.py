"""The model zoo: the small networks federated-learning papers train, one ``nn.Module`` each.

Parameter counts for 10 classes (trainable weights and biases, BatchNorm affine included):

    mlp       (1, 28, 28)   199,210   FedAvg 2NN, McMahan et al. 2017
    cnn       (1, 28, 28) 1,663,370   FedAvg CNN, McMahan et al. 2017
    lenet     (1, 28, 28)    61,706   LeNet-5, LeCun et al. 1998 (ReLU, max pooling)
    resnet20  (3, 32, 32)   269,722   ResNet-20 for CIFAR, He et al. 2016 (option-A shortcuts)
    cifar-cnn (3, 32, 32)   188,810   three 3x3 conv-pool blocks (32, 64, 64), fc 128: a fast CIFAR baseline
    mlp-small (1, 28, 28)    50,890   one hidden layer of 64 ReLU units: the simulator benchmarks' tiny model

Every model takes ``(input_shape, num_classes)`` and sizes its layers from them, so the same model
runs on MNIST-like ``(1, 28, 28)`` and CIFAR-like ``(3, 32, 32)`` inputs. A model of the user's own is
named by an import path and built the same way (:func:`build_model`, :data:`ModelFactory`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from amble.errors import ConfigError
from amble.imports import is_import_path, resolve_callable

InputShape = tuple[int, int, int]  # (C, H, W)


class ChannelsLast(nn.Module):
    """A convolutional network whose weights and activations are stored channels-last (NHWC).

    oneDNN's CPU convolutions run faster on that layout: one training step on one thread measured
    0.55x the NCHW step for LeNet-5 and 0.78x for the CIFAR CNN (``benchmarks/cpu_training.py``,
    BENCHMARKS.md). Only the memory layout differs: shapes, parameter names, the state dict's values
    and the maths are the same (the sums inside a convolution run in another order, so the bits may
    differ by rounding from an NCHW run). A subclass calls :meth:`finish` at the end of its
    ``__init__`` and :meth:`nhwc` on its input."""

    def finish(self) -> None:
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs omit the keyword

    @staticmethod
    def nhwc(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


class MLP(nn.Module):
    """FedAvg's "2NN": two fully connected hidden layers of 200 ReLU units over the flattened image."""

    def __init__(self, input_shape: InputShape, num_classes: int, hidden: int = 200) -> None:
        super().__init__()
        self.fc1 = nn.Linear(math.prod(input_shape), hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, C*H*W)
        x = F.relu(self.fc1(x))  # (B, hidden)
        x = F.relu(self.fc2(x))  # (B, hidden)
        logits: torch.Tensor = self.fc3(x)  # (B, num_classes)
        return logits


class SmallMLP(nn.Module):
    """784-64-10: one fully connected hidden layer of 64 ReLU units (cheap enough to measure overhead)."""

    def __init__(self, input_shape: InputShape, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(math.prod(input_shape), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))  # (B, hidden)
        logits: torch.Tensor = self.fc2(x)  # (B, num_classes)
        return logits


class CNN(ChannelsLast):
    """FedAvg's CNN: two 5x5 "same" convolutions (32, 64 channels), each with 2x2 max pooling, fc 512."""

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        _require_size("cnn", input_shape, min_side=4, got=(height // 4, width // 4))
        self.conv1 = nn.Conv2d(channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(64 * (height // 4) * (width // 4), 512)
        self.fc2 = nn.Linear(512, num_classes)
        self.finish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(self.nhwc(x))), 2)  # (B, 32, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, H/4, W/4)
        x = F.relu(self.fc1(x.flatten(1)))  # (B, 512)
        logits: torch.Tensor = self.fc2(x)  # (B, num_classes)
        return logits


class LeNet5(ChannelsLast):
    """LeNet-5: conv 6@5x5 (padded to keep 28x28), pool, conv 16@5x5, pool, fc 120, fc 84."""

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        out_h, out_w = (height // 2 - 4) // 2, (width // 2 - 4) // 2  # spatial size after the 2nd pool
        _require_size("lenet", input_shape, min_side=12, got=(out_h, out_w))
        self.conv1 = nn.Conv2d(channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * out_h * out_w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.finish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(self.nhwc(x))), 2)  # (B, 6, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 16, (H/2-4)/2, (W/2-4)/2): 5x5 for 28x28
        x = F.relu(self.fc1(x.flatten(1)))  # (B, 120)
        x = F.relu(self.fc2(x))  # (B, 84)
        logits: torch.Tensor = self.fc3(x)  # (B, num_classes)
        return logits


class CifarCNN(ChannelsLast):
    """A small CIFAR CNN: three 3x3 "same" conv + ReLU + 2x2 max-pool blocks (32, 64, 64 channels), fc 128.

    A training step on a CPU costs about a quarter of ResNet-20's, and there are no BatchNorm
    running statistics to average, so CIFAR experiments can run many rounds on a laptop.
    """

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        _require_size("cifar-cnn", input_shape, min_side=8, got=(height // 8, width // 8))
        self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(64 * (height // 8) * (width // 8), 128)
        self.fc2 = nn.Linear(128, num_classes)
        self.finish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(self.nhwc(x))), 2)  # (B, 32, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, H/4, W/4)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # (B, 64, H/8, W/8): 4x4 for 32x32
        x = F.relu(self.fc1(x.flatten(1)))  # (B, 128)
        logits: torch.Tensor = self.fc2(x)  # (B, num_classes)
        return logits


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a parameter-free shortcut (He et al. 2016, option A).

    When the block halves the resolution and widens the channels, the shortcut subsamples the input
    by taking every other pixel and zero-pads the new channels, so ResNet-20 keeps 269,722 weights.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_planes = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.extra_planes == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]  # (B, in_planes, H/stride, W/stride)
        before = self.extra_planes // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra_planes - before))  # (B, planes, ...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR: a 16-channel stem, three stages of three blocks (16, 32, 64), global pool."""

    def __init__(self, input_shape: InputShape, num_classes: int, blocks_per_stage: int = 3) -> None:
        super().__init__()
        channels = input_shape[0]
        self.conv = nn.Conv2d(channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        stages: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(in_planes, planes, stride)]
            blocks += [BasicBlock(planes, planes, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))  # (B, 16, H, W)
        x = self.stages(x)  # (B, 64, H/4, W/4)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 64)
        logits: torch.Tensor = self.fc(x)  # (B, num_classes)
        return logits


def _require_size(name: str, input_shape: InputShape, min_side: int, got: tuple[int, int]) -> None:
    """Fail early, naming the model, when the input is too small for its pooling layers."""
    if min(got) < 1:
        raise ConfigError(
            f"model {name!r} needs images of at least {min_side}x{min_side}, got input shape {input_shape}; "
            "choose 'mlp' or 'resnet20' for tiny inputs"
        )


_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "lenet": LeNet5,
    "resnet20": ResNet20,
    "cifar-cnn": CifarCNN,
    "mlp-small": SmallMLP,
}

MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)

ModelFactory = Callable[..., nn.Module]
"""A user's model: ``factory(input_shape, num_classes, **model_args) -> nn.Module``, where ``input_shape``
is one sample's shape (``(30,)`` for 30 features, ``(1, 28, 28)`` for an image, ``(64,)`` for 64 tokens)."""


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    model_args: Mapping[str, Any] | None = None,
    input_dtype: torch.dtype = torch.float32,
    factory: ModelFactory | None = None,
) -> nn.Module:
    """Build a freshly initialised model for samples of ``input_shape`` and ``num_classes`` outputs.

    ``name`` is a built-in model (for ``(C, H, W)`` images) or an import path ``"package.module:function"``
    to a :data:`ModelFactory` installed on this machine; ``factory`` (the Python API's in-memory callable)
    takes the place of the import. A user's model is checked with one forward pass on a batch of two
    zero samples of ``input_dtype``: it must return ``(2, num_classes)`` logits.

    Initialisation draws from torch's global RNG: seed it (``torch.manual_seed``) for reproducibility.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if not input_shape or any(int(size) < 1 for size in input_shape):
        raise ConfigError(f"input_shape must be positive sizes, got {input_shape}")
    shape = tuple(int(size) for size in input_shape)
    args = dict(model_args or {})
    if factory is None and name in _MODELS:
        if len(shape) != 3:
            raise ConfigError(
                f"input_shape must be three positive sizes (C, H, W) for the built-in model {name!r}, got "
                f"{input_shape}; for other data name a model of your own (model: 'package.module:function')"
            )
        return _call(name, _MODELS[name], shape, int(num_classes), args)
    if factory is None:
        if not is_import_path(name):
            raise ConfigError(
                f"unknown model {name!r}; model must be one of: {', '.join(MODEL_NAMES)}, or an import path "
                "'package.module:function' to a model of your own"
            )
        factory = resolve_callable(name, "model")
    model = _call(name, factory, shape, int(num_classes), args)
    check_model(name, model, shape, int(num_classes), input_dtype)
    return model


def _call(
    name: str, factory: ModelFactory, shape: tuple[int, ...], num_classes: int, args: dict[str, Any]
) -> nn.Module:
    try:
        model = factory(shape, num_classes, **args)
    except ConfigError:
        raise
    except Exception as exc:
        keywords = "".join(f", {key}=..." for key in args)
        raise ConfigError(
            f"model {name!r}: calling it as f(input_shape={shape}, num_classes={num_classes}{keywords}) raised "
            f"{type(exc).__name__}: {exc}; a model factory takes (input_shape, num_classes, **model_args)"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module: return the network itself"
        )
    return model


def check_model(
    name: str, model: nn.Module, input_shape: tuple[int, ...], num_classes: int, input_dtype: torch.dtype
) -> None:
    """One forward pass on two zero samples: the logits must be ``(2, num_classes)``.

    Run in eval mode without gradients, so BatchNorm statistics, dropout and the RNG are left untouched.
    """
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape), dtype=input_dtype))
    except Exception as exc:
        raise ConfigError(
            f"model {name!r} fails on a batch of 2 samples of shape {input_shape} ({input_dtype}): "
            f"{type(exc).__name__}: {exc}; size its first layer from the input_shape it is given"
        ) from None
    finally:
        model.train(training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise ConfigError(
            f"model {name!r} returns {got} for a batch of 2 samples, but must return logits of shape (2, "
            f"{num_classes}) (batch, num_classes): make its last layer output num_classes values per sample"
        )
