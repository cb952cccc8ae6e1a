"""Tensors that cross the Store travel as safetensors, never pickle, and are checked on the way in."""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from amble.errors import UpdateRejected

Tensors = dict[str, torch.Tensor]


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_KNOWN_DTYPES = tuple(SAFETENSORS_DTYPES.values())
"""The safetensors dtypes :func:`encode` writes and :func:`decode` reads; any other is refused."""
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
_STATS_CHUNK = 1 << 16
"""Elements per chunk of :func:`update_stats`: a chunk and its float64 copy (768 KiB) stay in cache."""
_MAX_HEADER = 100_000_000
"""The largest header the safetensors library reads: a larger one takes the library's path (and its error)."""

with warnings.catch_warnings():  # once, at import: torch warns only on its first read-only buffer
    warnings.simplefilter("ignore")
    torch.frombuffer(bytes(8), dtype=torch.uint8)


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise tensors (made contiguous, on the CPU) to safetensors bytes.

    Written here rather than by ``safetensors.torch.save``, which spends most of its time on checks
    for shared storage that copies never need (an update is encoded on every upload and every fold):
    the format is a little-endian u64 header length, a JSON header (name -> dtype, shape, byte
    range; padded with spaces to 8 bytes) and the raw little-endian bytes, largest elements first so
    every tensor starts aligned. The safetensors library reads it back (``decode``).
    """
    if sys.byteorder != "little":  # the raw bytes below are native-endian; safetensors is little-endian
        return st_save(
            {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()},
            metadata=dict(metadata) if metadata else None,
        )
    clean = [(name, t.detach().to("cpu").contiguous()) for name, t in tensors.items()]
    clean.sort(key=lambda item: (-item[1].element_size(), item[0]))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    chunks: list[bytes | memoryview] = []
    offset = 0
    for name, tensor in clean:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"cannot encode tensor '{name}' of dtype {tensor.dtype} as safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        if size:
            chunks.append(tensor.reshape(-1).view(torch.uint8).numpy().data)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *chunks])


def decode(blob: bytes) -> Tensors:
    """Parse safetensors bytes; anything unparsable is rejected as ``malformed``, a tensor of a dtype
    :func:`encode` never writes (``F4``, ``F8_E8M0``, ``C64``...) as ``dtype``.

    The dtypes are checked here first: the safetensors library parses some it cannot hand to torch,
    and then raises a ``KeyError``. Whatever else it raises on these bytes is their fault too (they
    come from a device), so every failure is a rejection, never a server fault.
    """
    header = _header(blob)
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) and name != "__metadata__" else None
        if isinstance(dtype, str) and dtype not in _KNOWN_DTYPES:
            raise UpdateRejected(
                "dtype",
                f"tensor '{name[:64]}' has safetensors dtype '{dtype[:16]}', which AMBLE does not read "
                f"({', '.join(_KNOWN_DTYPES)}): send the model's dtypes",
            )
    try:
        return st_load(blob)
    except Exception as exc:  # SafetensorError, or what the torch binding raises on odd bytes
        raise UpdateRejected("malformed", f"update is not a valid safetensors blob: {exc}") from None


def _header(blob: bytes) -> dict[str, object]:
    """The JSON header of a safetensors blob, refused as ``malformed`` when it is not there."""
    if len(blob) < 8:
        raise UpdateRejected("malformed", f"update is {len(blob)} bytes: not a safetensors blob (no header length)")
    header_len = int.from_bytes(blob[:8], "little")
    if header_len > len(blob) - 8:
        raise UpdateRejected(
            "malformed", f"update's safetensors header says {header_len:,} bytes, more than the {len(blob) - 8:,} sent"
        )
    try:
        header = json.loads(blob[8 : 8 + header_len])
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep
        raise UpdateRejected("malformed", "update's safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise UpdateRejected("malformed", "update's safetensors header is not a JSON object")
    return header


def _views(blob: bytes) -> Tensors | None:
    """The tensors of ``blob`` as read-only views of its bytes, when its header is one the safetensors
    library accepts for certain (None otherwise, and :func:`decode` decides, with its errors).

    The library's own rules, checked here: the header starts with ``{``, is at most 100 MB of JSON
    with no key twice, ``__metadata__`` maps strings to strings, every tensor has a known dtype, a
    shape of non-negative integers and a byte range of exactly its size, and the ranges, in order,
    tile the data with no gap, overlap or byte left over. Only ``bytes`` (immutable) are viewed, so
    no tensor can change under the fold; a view that is not aligned for its dtype is copied.
    """
    if type(blob) is not bytes or sys.byteorder != "little" or len(blob) < 8:
        return None
    header_len = int.from_bytes(blob[:8], "little")
    if header_len > min(_MAX_HEADER, len(blob) - 8) or blob[8:9] != b"{":
        return None
    try:
        header = json.loads(blob[8 : 8 + header_len], object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(type(v) is str for v in meta.values())):
        return None
    entries = []
    for name, entry in header.items():
        spec = _entry(entry)
        if spec is None:
            return None
        entries.append((spec[2], spec[3], name, spec[0], spec[1]))
    entries.sort()
    base, end = 8 + header_len, 0
    for start, stop, _, dtype, shape in entries:
        if start != end or stop - start != math.prod(shape) * dtype.itemsize:
            return None
        end = stop
    if base + end != len(blob):
        return None
    return {name: _view(blob, base + start, dtype, shape) for start, _, name, dtype, shape in entries}


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose keys are all distinct (the safetensors library refuses some repeats)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a key repeats")
    return found


def _entry(entry: object) -> tuple[torch.dtype, list[int], int, int] | None:
    """A header entry's dtype, shape and byte range, or None if any is not what the library reads."""
    if not isinstance(entry, dict):
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _TORCH_DTYPES or not isinstance(shape, list):
        return None
    if not all(type(d) is int and 0 <= d < 2**63 for d in shape):
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
        return None
    return _TORCH_DTYPES[dtype], shape, offsets[0], offsets[1]


def _view(blob: bytes, start: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(blob, dtype=dtype, count=count, offset=start)
    if flat.data_ptr() % dtype.itemsize:
        flat = flat.clone()  # not aligned for its dtype: a copy is
    return flat.view(shape)


def read_metadata(blob: bytes) -> dict[str, str]:
    """The string metadata of a safetensors blob (its JSON header's ``__metadata__``)."""
    meta = _header(blob).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str


def template_of(params: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The shape and dtype of every tensor a valid update must carry."""
    return {name: TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in params.items()}


def template_to_json(template: Mapping[str, TensorSpec]) -> str:
    return json.dumps({name: {"shape": list(s.shape), "dtype": s.dtype} for name, s in template.items()})


def template_from_json(text: str | bytes) -> dict[str, TensorSpec]:
    data = json.loads(text)
    return {name: TensorSpec(tuple(spec["shape"]), spec["dtype"]) for name, spec in data.items()}


def validate_update(blob: bytes, template: Mapping[str, TensorSpec], max_bytes: int, *, finite: bool = True) -> Tensors:
    """Decode an update and check it against the model: size, names, shapes, dtypes, finiteness.

    Raises :class:`UpdateRejected` with a reason code (``too_large``, ``malformed``,
    ``missing_tensor``, ``unexpected_tensor``, ``shape``, ``dtype``, ``non_finite``) and a message
    that names the tensor at fault. The tensors are read-only views of ``blob`` (see :func:`_views`):
    never write to them. With ``finite=False`` finiteness is left to the caller, who reads the
    update anyway (:func:`update_stats` checks it in the same reads as the norm and the largest element).
    """
    if len(blob) > max_bytes:
        raise UpdateRejected(
            "too_large",
            f"update is {len(blob):,} bytes, over the limit of {max_bytes:,} (server.max_update_mb)",
        )
    tensors = _views(blob)
    if tensors is None:
        tensors = decode(blob)
    missing = sorted(set(template) - set(tensors))
    if missing:
        raise UpdateRejected("missing_tensor", f"update lacks tensor(s) {missing[:5]} of the model")
    unexpected = sorted(set(tensors) - set(template))
    if unexpected:
        raise UpdateRejected("unexpected_tensor", f"update has tensor(s) {unexpected[:5]} the model does not")
    for name, spec in template.items():
        tensor = tensors[name]
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype != spec.dtype:
            raise UpdateRejected("dtype", f"tensor '{name}' has dtype {dtype}, the model expects {spec.dtype}")
        if tuple(tensor.shape) != spec.shape:
            raise UpdateRejected(
                "shape", f"tensor '{name}' has shape {list(tensor.shape)}, the model expects {list(spec.shape)}"
            )
        if finite and tensor.is_floating_point() and not all_finite(tensor):
            raise _non_finite(name)
    return tensors


def _non_finite(name: str) -> UpdateRejected:
    return UpdateRejected("non_finite", f"tensor '{name}' holds NaN or infinite values")


@dataclass(frozen=True)
class UpdateStats:
    """What a fold needs to know of an update before folding it."""

    norm: float
    """:func:`l2_norm` of the update, the same float."""
    largest: float
    """The largest ``|element|`` of its tensors (0.0 for none)."""


def update_stats(tensors: Mapping[str, torch.Tensor]) -> UpdateStats:
    """The update's L2 norm and largest element, refusing NaN and infinities as ``non_finite``, in one
    read of the update: the norm and ``aminmax`` read each chunk (:func:`_chunks`) while it is in cache.

    A chunk's float64 sum of squares is finite exactly when the chunk is, except when the squares of
    finite float64 values overflow: only then is it checked element by element.
    """
    squares, largest = [], 0.0
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            parts: Iterator[tuple[torch.Tensor, float]] = iter([(tensor, 0.0)] if tensor.numel() else [])
        else:
            parts = _chunks(tensor)
        for chunk, square in parts:
            if not math.isfinite(square) and not bool(torch.isfinite(chunk).all()):
                raise _non_finite(name)
            squares.append(square)
            low, high = torch.aminmax(chunk)
            largest = max(largest, -float(low), float(high))
    return UpdateStats(math.sqrt(math.fsum(squares)), largest)


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all the floating-point tensors together, computed in float64 (so the squares of
    float32 values cannot overflow): the exact sum (``math.fsum``) of the chunks' float64 sums of
    squares (:func:`_chunks`), so the same float for the same tensors whatever their order."""
    squares = [square for t in tensors.values() if t.is_floating_point() for _, square in _chunks(t)]
    return math.sqrt(math.fsum(squares))


def _chunks(tensor: torch.Tensor) -> Iterator[tuple[torch.Tensor, float]]:
    """A floating-point tensor in chunks of :data:`_STATS_CHUNK` elements, each with its sum of squares
    in float64 (as the square of its float64 norm).

    In chunks rather than whole: the norm of a whole float32 tensor in float64 converts it into a
    fresh buffer twice its size, and in the aggregation benchmark (cProfile, CNN, embedded) that norm
    cost as much as the fold itself, the chunks a sixth of it. A chunk is converted into one reused
    buffer that stays in cache while ``aminmax`` reads it too.
    """
    flat = tensor.reshape(-1)
    wide = torch.empty(min(_STATS_CHUNK, flat.numel()), dtype=torch.float64)
    for start in range(0, flat.numel(), _STATS_CHUNK):
        chunk = flat[start : start + _STATS_CHUNK]
        part = chunk if chunk.dtype == torch.float64 else wide[: chunk.numel()].copy_(chunk)
        yield chunk, float(torch.linalg.vector_norm(part)) ** 2


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in ``tensor``. A finite sum proves it (a NaN or an infinity would make the
    sum non-finite) at the cost of one reduction; only a non-finite sum, which may also be an
    overflow of finite values, needs the exact element-wise check."""
    if math.isfinite(float(tensor.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(tensor).all())
