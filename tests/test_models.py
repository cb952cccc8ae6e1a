"""The model zoo: exact parameter counts from the papers, output shapes, errors."""

from __future__ import annotations

import pytest
import torch

from amble.errors import ConfigError
from amble.models import MODEL_NAMES, BasicBlock, build_model

MNIST_SHAPE = (1, 28, 28)
CIFAR_SHAPE = (3, 32, 32)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_model_names_are_pinned() -> None:
    # Assert
    assert MODEL_NAMES == ("mlp", "cnn", "lenet", "resnet20", "cifar-cnn", "mlp-small")


@pytest.mark.parametrize(
    ("name", "input_shape", "expected"),
    [
        # 784*200+200 + 200*200+200 + 200*10+10
        ("mlp", MNIST_SHAPE, 199_210),
        ("mlp-small", MNIST_SHAPE, 50_890),
        # (32*1*25+32) + (64*32*25+64) + (64*7*7*512+512) + (512*10+10)
        ("cnn", MNIST_SHAPE, 1_663_370),
        # (6*25+6) + (16*6*25+16) + (16*5*5*120+120) + (120*84+84) + (84*10+10)
        ("lenet", MNIST_SHAPE, 61_706),
        # stem 432+32, stage1 3*2*(2304+32), stage2 51,072, stage3 203,520, fc 650
        ("resnet20", CIFAR_SHAPE, 269_722),
        # (32*3*9+32) + (64*32*9+64) + (64*64*9+64) + (64*4*4*128+128) + (128*10+10)
        ("cifar-cnn", CIFAR_SHAPE, 188_810),
    ],
)
def test_parameter_counts_match_the_papers(name: str, input_shape: tuple[int, int, int], expected: int) -> None:
    # Execute
    model = build_model(name, input_shape, 10)

    # Assert
    assert count_parameters(model) == expected


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("input_shape", [MNIST_SHAPE, CIFAR_SHAPE])
def test_forward_gives_one_logit_per_class(name: str, input_shape: tuple[int, int, int]) -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model(name, input_shape, 7)
    batch = torch.randn(3, *input_shape)

    # Execute
    logits = model(batch)

    # Assert
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()


def test_lenet_sizes_its_classifier_from_the_input() -> None:
    # Prepare: for 32x32 the second pool leaves 16 x 6 x 6 = 576 features
    model = build_model("lenet", CIFAR_SHAPE, 10)

    # Execute
    fc1 = model.get_submodule("fc1")

    # Assert
    assert isinstance(fc1, torch.nn.Linear)
    assert fc1.in_features == 576


def test_resnet_shortcut_widens_channels_without_parameters() -> None:
    # Prepare
    model = build_model("resnet20", CIFAR_SHAPE, 10)
    block = model.get_submodule("stages.1.0")  # first block of stage 2: 16 -> 32 channels, stride 2
    assert isinstance(block, BasicBlock)
    x = torch.ones(1, 16, 8, 8)

    # Execute
    shortcut = block.shortcut(x)

    # Assert: 8 zero channels, the 16 input channels, 8 zero channels; spatial size halved
    assert shortcut.shape == (1, 32, 4, 4)
    assert shortcut[:, :8].abs().sum() == 0
    assert shortcut[:, 8:24].eq(1).all()
    assert shortcut[:, 24:].abs().sum() == 0


def test_unknown_model_lists_allowed_names() -> None:
    # Execute
    with pytest.raises(ConfigError) as caught:
        build_model("vgg16", MNIST_SHAPE, 10)

    # Assert
    assert "'vgg16'" in str(caught.value)
    assert "mlp, cnn, lenet, resnet20, cifar-cnn, mlp-small" in str(caught.value)


def test_input_too_small_for_lenet_is_a_config_error() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="at least 12x12"):
        build_model("lenet", (1, 8, 8), 10)


def test_bad_input_shape_is_a_config_error() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="input_shape"):
        build_model("mlp", (28, 28), 10)  # type: ignore[arg-type]
