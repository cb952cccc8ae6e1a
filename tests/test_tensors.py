"""The safetensors encoder and the update checks: what every upload and every fold goes through."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from amble.errors import UpdateRejected
from amble.server.tensors import all_finite, decode, encode, read_metadata, template_of, validate_update


def test_encoded_bytes_read_back_with_the_safetensors_library() -> None:
    # Setup: every dtype, a scalar, an empty tensor and a non-contiguous view
    tensors = {
        "f64": torch.randn(3, dtype=torch.float64),
        "f32": torch.randn(4, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(5),
        "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.arange(-2, 3, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 4).t(),
    }

    # Execute
    blob = encode(tensors, {"round": "3"})
    back = load(blob)

    # Assert
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor), name
    assert read_metadata(blob) == {"round": "3"}
    assert load(save({k: v.contiguous() for k, v in tensors.items()})).keys() == back.keys()
    assert decode(encode({})) == {}


def test_all_finite_sees_every_nan_and_infinity_and_survives_an_overflowing_sum() -> None:
    values = torch.randn(1000)
    assert all_finite(values)
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = values.clone()
        broken[617] = bad
        assert not all_finite(broken)
    both = values.clone()
    both[1], both[2] = float("inf"), float("-inf")  # their sum is NaN, still caught
    assert not all_finite(both)
    huge = torch.full((4,), torch.finfo(torch.float64).max, dtype=torch.float64)  # finite, sum overflows
    assert all_finite(huge)


def test_a_non_finite_update_is_rejected_by_name() -> None:
    update = {"w": torch.randn(3, 3), "b": torch.randn(3)}
    update["b"][1] = float("nan")
    with pytest.raises(UpdateRejected, match="'b' holds NaN") as caught:
        validate_update(encode(update), template_of(update), 10**6)
    assert caught.value.reason == "non_finite"
