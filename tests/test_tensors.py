"""The safetensors encoder and the update checks: what every upload and every fold goes through."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load, save

from amble.errors import UpdateRejected
from amble.server.tensors import (
    all_finite,
    decode,
    encode,
    l2_norm,
    read_metadata,
    template_of,
    update_stats,
    validate_update,
)


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


def _blob(header: dict[str, object], data: bytes, pad: int = 0) -> bytes:
    text = json.dumps(header).encode() + b" " * pad
    return len(text).to_bytes(8, "little") + text + data


def test_an_update_is_read_in_place_from_its_bytes_and_a_misaligned_tensor_is_copied() -> None:
    # Setup: an encoded update, and a hand-made blob whose header puts a float32 at an odd address
    update = {"w": torch.randn(4, 3), "n": torch.arange(3), "e": torch.zeros(0, 2)}
    blob = encode(update)
    header = {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}
    values = torch.tensor([1.5, -2.0, 3.25])
    odd = next(_blob(header, values.numpy().tobytes(), p) for p in range(8) if (16 + len(json.dumps(header)) + p) % 4)

    # Act
    tensors = validate_update(blob, template_of(update), 10**6)
    shifted = validate_update(odd, template_of({"x": values}), 10**6)

    # Assert: the same values, the non-empty ones inside the blob's own bytes; the odd one aligned
    base = torch.frombuffer(blob, dtype=torch.uint8).data_ptr()
    for name, tensor in update.items():
        assert torch.equal(tensors[name], tensor)
        if tensor.numel():
            assert base <= tensors[name].data_ptr() < base + len(blob)
    assert torch.equal(shifted["x"], values) and shifted["x"].data_ptr() % 4 == 0


def test_a_header_the_library_refuses_is_still_refused_as_malformed() -> None:
    # Setup: a gap between tensors, a byte left over, a size that does not match
    x = torch.ones(2).numpy().tobytes()
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    blobs = {
        "gap": _blob({"x": {**entry, "data_offsets": [4, 12]}}, bytes(4) + x),
        "byte left over": _blob({"x": entry}, x + b"\0"),
        "size": _blob({"x": {**entry, "shape": [3]}}, x),
    }

    for what, blob in blobs.items():
        # Act / Assert
        with pytest.raises(UpdateRejected) as caught:
            validate_update(blob, {"x": template_of({"x": torch.ones(2)})["x"]}, 10**6)
        assert caught.value.reason == "malformed", what


def test_update_stats_are_the_norm_and_largest_element_and_refuse_non_finite_values() -> None:
    # Setup: floats, integers (their largest counts), a float64 whose squares overflow but are finite
    update = {"w": torch.randn(50, 7), "n": torch.tensor([-9, 2]), "b": torch.randn(3, dtype=torch.float64)}
    huge = {"h": torch.tensor([1e200, -1e300], dtype=torch.float64)}

    # Act
    stats, big = update_stats(update), update_stats(huge)

    # Assert: the same float as l2_norm; integers in the largest element, not in the norm
    assert stats.norm == l2_norm(update)
    assert stats.largest == max(9.0, float(update["w"].abs().max()), float(update["b"].abs().max()))
    assert math.isinf(big.norm) and big.largest == 1e300
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = {"w": torch.randn(4), "b": torch.tensor([1.0, bad])}
        with pytest.raises(UpdateRejected, match="'b' holds NaN") as caught:
            update_stats(broken)
        assert caught.value.reason == "non_finite"
