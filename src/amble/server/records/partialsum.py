"""A shard of a round's weighted sum, kept so that the sum does not depend on the order of the folds.

Devices' updates reach the functions in an order set by timing (worker processes, Redis, Ray), and
land in whichever instance's shard happens to take them. A float32 running sum rounds differently
for every order, and training amplifies the difference round after round, so the same run on two
backends drifted apart. Here each parameter's sum is a *double-double*: two float64 tensors
``hi + lo``, where every fold adds ``weight * update`` (the product formed in float64) with Knuth's
TwoSum, which puts the rounding error of ``hi + p`` exactly into ``lo``. The pair carries about 106
bits: whatever the order, the sum is the exact sum of the products to within about
``n * 2**-100`` of their magnitude, so once collapsed to float64 (and later to the model's dtype) it
is the same number unless the exact sum sits on a rounding boundary by less than that (one chance
in about 2**40 per weight).

Each shard also records, per device folded into it, the update's L2 norm and the aggregator's
statistics, so that ``finalize`` can sum the statistics exactly (``math.fsum``, in any order) and
take the median norm as the next round's reference without the order of arrival mattering.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from amble.server.tensors import TensorSpec, all_finite, decode, encode, read_metadata

Params = dict[str, torch.Tensor]

_HI, _LO = "hi/", "lo/"
_HEADER_BYTES_PER_TENSOR = 160
"""A safetensors header entry besides the tensor's name: dtype, up to 4 dimensions and 2 offsets, and JSON."""
_HEADER_BYTES = 2048
"""The rest of a shard's header: its length field, the fold records' entries, the magnitude metadata."""
_RECORD_BYTES = 8 * (2 + 14)
"""A fold's record: a device id and a norm, and up to 14 statistics, 8 bytes each."""
_FOLD_DEVICES, _FOLD_NORMS, _FOLD_STAT = "fold/devices", "fold/norms", "fold/stat/"
SAFE_MAGNITUDE = 2.0**1000
"""Below this bound on a sum's elements (float64 reaches 2**1024), no fold can overflow: checked on a
scalar, not on every element."""


@dataclass(frozen=True)
class FoldRecord:
    """What one folded update adds besides its tensors: its L2 norm and the aggregator's statistics."""

    norm: float
    stats: Mapping[str, float]


@dataclass
class PartialSum:
    """``sum_k weight_k * update_k`` per parameter as ``hi + lo`` (float64), and a record per fold."""

    hi: Params
    lo: Params
    folds: dict[int, FoldRecord] = field(default_factory=dict)
    magnitude: float = 0.0
    """``sum_k |weight_k| * norm_k``: no element of the sum can be larger (an element of an update is
    at most its L2 norm), so while it is below :data:`SAFE_MAGNITUDE` nothing can overflow."""
    _spare: Params = field(default_factory=dict, repr=False, compare=False)
    _scratch: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def zeros(cls, template: Mapping[str, TensorSpec]) -> PartialSum:
        hi = {name: torch.zeros(spec.shape, dtype=torch.float64) for name, spec in template.items()}
        return cls(hi, {name: torch.zeros_like(t) for name, t in hi.items()})

    def add(self, device: int, update: Mapping[str, torch.Tensor], weight: float, record: FoldRecord) -> bool:
        """Fold ``weight * update`` in place; False (and this sum must be discarded) if it overflowed.

        In place, so a caller that keeps a copy it may reuse must drop it first. The product is formed
        in float64 (exact when the weight is an integer below 2**29 and the update float32); it is
        rounded the same way whichever shard takes the update, so only the sum needs care. Buffers
        are reused from fold to fold: a fold allocates nothing.
        """
        if not self._scratch:
            largest = max((t.numel() for t in self.hi.values()), default=0)
            self._scratch = [torch.empty(largest, dtype=torch.float64) for _ in range(2)]
        for name, hi in self.hi.items():
            product, taken = (buffer[: hi.numel()].view(hi.shape) for buffer in self._scratch)
            total = self._spare.get(name)
            total = torch.empty_like(hi) if total is None else total
            _two_sum_into(hi, self.lo[name], product.copy_(update[name]).mul_(weight), total, taken)
            self.hi[name], self._spare[name] = total, hi  # the old hi's storage is the next fold's spare
        self.folds[device] = record
        self.magnitude += abs(weight) * record.norm
        return self.magnitude < SAFE_MAGNITUDE or all(all_finite(t) for t in self.hi.values())

    def merged(self, other: PartialSum) -> PartialSum:
        """A new sum of both (neither is changed): ``hi`` pairs with TwoSum, the ``lo`` parts added."""
        hi, lo = {}, {}
        for name, mine in self.hi.items():
            lo[name] = self.lo[name] + other.lo[name]
            hi[name] = torch.empty_like(mine)
            _two_sum_into(mine.clone(), lo[name], other.hi[name].clone(), hi[name], torch.empty_like(mine))
        return PartialSum(hi, lo, {**self.folds, **other.folds}, self.magnitude + other.magnitude)

    def total(self) -> Params:
        """The sum rounded once to float64: ``hi + lo`` (``lo`` is far below ``hi``'s last bit)."""
        return {name: hi + self.lo[name] for name, hi in self.hi.items()}

    def stats(self) -> dict[str, float]:
        """The folds' statistics summed exactly (``math.fsum`` is correctly rounded, so order-free)."""
        names = sorted({stat for record in self.folds.values() for stat in record.stats})
        return {stat: math.fsum(r.stats.get(stat, 0.0) for r in self.folds.values()) for stat in names}

    def norms(self) -> list[float]:
        """The L2 norms of the folded updates, in ascending order."""
        return sorted(record.norm for record in self.folds.values())

    def to_blob(self) -> bytes:
        """The sums and the fold records as one safetensors blob. The records are tensors too (device
        ids, norms, one column per statistic), not JSON: a shard is re-encoded after every fold, and
        the records grow with the round."""
        tensors = {**{_HI + n: t for n, t in self.hi.items()}, **{_LO + n: t for n, t in self.lo.items()}}
        devices = sorted(self.folds)
        names = sorted({stat for record in self.folds.values() for stat in record.stats})
        tensors[_FOLD_DEVICES] = torch.tensor(devices, dtype=torch.int64)
        tensors[_FOLD_NORMS] = torch.tensor([self.folds[d].norm for d in devices], dtype=torch.float64)
        for stat in names:
            column = [self.folds[d].stats.get(stat, 0.0) for d in devices]
            tensors[_FOLD_STAT + stat] = torch.tensor(column, dtype=torch.float64)
        return encode(tensors, metadata={"magnitude": repr(self.magnitude)})

    @classmethod
    def from_blob(cls, blob: bytes) -> PartialSum:
        tensors = decode(blob)
        hi = {name[len(_HI) :]: t for name, t in tensors.items() if name.startswith(_HI)}
        lo = {name[len(_LO) :]: t for name, t in tensors.items() if name.startswith(_LO)}
        devices = tensors[_FOLD_DEVICES].tolist() if _FOLD_DEVICES in tensors else []
        norms = tensors[_FOLD_NORMS].tolist() if _FOLD_NORMS in tensors else []
        columns = {n[len(_FOLD_STAT) :]: t.tolist() for n, t in tensors.items() if n.startswith(_FOLD_STAT)}
        records = {
            int(d): FoldRecord(float(norms[i]), {stat: float(c[i]) for stat, c in columns.items()})
            for i, d in enumerate(devices)
        }
        return cls(hi, lo, records, float(read_metadata(blob).get("magnitude", "inf")))


def shard_size_bound(template: Mapping[str, TensorSpec], folds: int) -> int:
    """An upper bound on the bytes of a shard of a model with this ``template`` holding ``folds``
    updates, from the template's shapes alone (nothing is allocated): two float64 per weight, its
    safetensors header and the fold records."""
    weights = sum(math.prod(spec.shape) for spec in template.values())
    header = _HEADER_BYTES + sum(2 * (len(_HI + name) + _HEADER_BYTES_PER_TENSOR) for name in template)
    return 2 * 8 * weights + header + folds * _RECORD_BYTES


def _two_sum_into(
    hi: torch.Tensor, lo: torch.Tensor, addend: torch.Tensor, total: torch.Tensor, taken: torch.Tensor
) -> None:
    """``total = hi + addend``, and the rounding error of that sum added to ``lo``, exactly.

    Knuth's TwoSum, valid whatever the magnitudes: ``b = s - hi``, ``error = (hi - (s - b)) +
    (addend - b)``. Seven passes, no allocation; ``hi``, ``addend`` and ``taken`` are overwritten.
    """
    torch.add(hi, addend, out=total)
    torch.sub(total, hi, out=taken)  # b: the part of the addend that made it into the total
    addend.sub_(taken)  # what of the addend was lost
    torch.sub(total, taken, out=taken)  # s - b: the part of hi that made it in
    hi.sub_(taken).add_(addend)  # the rounding error of hi + addend
    lo.add_(hi)
