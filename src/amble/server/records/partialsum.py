"""A shard of a round's weighted sum, kept so that the sum does not depend on the order of the folds.

Devices' updates reach the functions in an order set by timing (worker processes, Redis, Ray), and
land in whichever instance's shard happens to take them. A float running sum rounds differently for
every order, and training amplifies the difference round after round, so the same run on two
backends drifted apart. Here the sum is kept in *fixed point*: ``int64`` per parameter, in one block
(rarely a few) each with a binary exponent ``e``, a block's sum being ``values * 2**e``. Integer addition is
associative, so the bits do not depend on the order of the folds or on how they were split into
shards; only each fold's rounding matters, and it depends on that fold alone:

- fold ``k`` (weight ``w``, largest element ``m`` of its update) gets its own exponent
  ``e_k = ceil_log2(|w| * m) - PRECISION_BITS``, so ``q_k = trunc(w * u / 2**e_k)`` has at most
  :data:`PRECISION_BITS` bits. The product ``w * u`` is formed in float64 as before (rounded the same
  way whichever shard takes the update), scaled by the power of two exactly, and truncated toward
  zero: ``|w * u - q_k * 2**e_k| < 2**e_k * (1 + 2**-11)``;
- folds are summed in *blocks* by exponent class ``e_k // BLOCK_BITS``; a block holds
  ``sum_k q_k * 2**(e_k - e)`` at ``e = min e_k`` of its folds: a fold at a finer exponent shifts the
  block left (multiplies it by a power of two, exact), a coarser one is shifted left into it. Which
  block a fold lands in depends on the fold alone, so whatever the order and the split into shards,
  the blocks are the same integers at the same exponents. Merging shards is the same addition;
- overflow cannot happen unnoticed: each block keeps, as a Python integer, ``bound = sum_k (ceil(|w_k|
  m_k / 2**e_k) + 1) * 2**(e_k - e)``, an upper bound of every ``|value|``, and a fold that would take
  it to ``2**62``, or need more than :data:`MAX_BLOCKS` blocks in one shard, is refused (``add``
  returns False: the caller rejects the update as ``overflow``). A merge of shards whose blocks
  together would overflow gives a total of NaN, which ``finalize`` refuses to publish;
- ``total`` converts one block to float64 with one rounding; several are added as double-doubles in
  the order of their exponents, a deterministic function of the blocks' integers.

Error, per element: ``|S - total| < (1 + 2**-11) * sum_k 2**e_k + 2**-52 |S| <= 2**(1 - PRECISION_BITS)
* (1 + 2**-11) * M + 2**-52 |S|`` with ``M = sum_k |w_k| m_k <= sum_k |w_k| norm_k`` (the latter is
:attr:`PartialSum.magnitude`), i.e. about ``2**-41 * M``. The double-double this replaced had about
``2**-53 |S| + n 2**-100 M``: the fixed-point sum is coarser for elements far below ``M`` (where the
updates cancel), but it is *always* the same bits whatever the order (the double-double could differ,
once in about ``2**40``, when the exact sum sat on a rounding boundary) and it costs 8 bytes per
parameter and block instead of 16.

Each shard also records, per device folded into it, the update's L2 norm and the aggregator's
statistics, so that ``finalize`` can sum the statistics exactly (``math.fsum``, in any order) and
take the median norm as the next round's reference without the order of arrival mattering.

A shard is written to the store as a :class:`ShardValue`, which the embedded store keeps as tensors
(``to_value``/``from_value``): a fold in-process never serialises the shard. Every fold and merge
writes new tensors (it never changes the ones a stored value holds), so a value once committed never
changes, and a fold that is not committed leaves nothing behind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from amble.server.store.base import Encodable, Value, as_bytes
from amble.server.tensors import TensorSpec, decode, encode, read_metadata

Params = dict[str, torch.Tensor]

PRECISION_BITS = 42
"""Bits of a fold's quantised product, relative to its scale ``|w| * norm``."""
BLOCK_BITS = 16
"""Folds whose exponents share ``e // BLOCK_BITS`` are summed in one block (one int64 per parameter);
within a block exponents differ by less than 16, so its ``2**62`` holds at least ``2**(62 - 42 - 16 + 1)
= 32`` folds at the widest spread, and about ``2**20`` of one scale."""
MAX_BLOCKS = 4
"""A shard holds at most this many blocks (folds whose scales span up to ``2**48``): a fold needing a
fifth is refused as an overflow. So a shard is at most ``8 * MAX_BLOCKS`` bytes per parameter."""
BYTES_PER_WEIGHT = 8 * MAX_BLOCKS
"""The most a shard can take per weight (the bound a store's largest value is checked against)."""
TINY_SCALE = 2.0**-900
"""A fold whose ``|w| * norm`` is below this adds less than ``2**-900`` to any element: it is counted
and contributes zero (its exponent would leave float64's range)."""
_LIMIT = 2**62
"""A block's bound stays below this, so its int64 values (and their float64 roundings) fit int64."""
_CHUNK = 1 << 16
"""Elements per pass of the fold: its float64 and int64 scratch buffers (1 MiB together) stay in cache."""
_SUM = "sum/"
_HEADER_BYTES_PER_TENSOR = 160
"""A safetensors header entry besides the tensor's name: dtype, up to 4 dimensions and 2 offsets, and JSON."""
_HEADER_BYTES = 2048
"""The rest of a shard's header: its length field, the fold records' entries, the blocks' metadata."""
_RECORD_BYTES = 8 * (2 + 14)
"""A fold's record: a device id and a norm, and up to 14 statistics, 8 bytes each."""
_FOLD_DEVICES, _FOLD_NORMS, _FOLD_STAT = "fold/devices", "fold/norms", "fold/stat/"


@dataclass(frozen=True)
class FoldRecord:
    """What one folded update adds besides its tensors: its L2 norm and the aggregator's statistics."""

    norm: float
    stats: Mapping[str, float]


@dataclass(frozen=True)
class Block:
    """The folds of one exponent class: ``sums * 2**exponent`` exactly, ``|sums| <= bound < 2**62``.

    Never changed once made (a fold makes a new block), so a stored shard may share it."""

    exponent: int
    bound: int
    sums: Params

    def plus(self, other: Block) -> Block | None:
        """Both summed at the finer exponent (the other shifted left, exactly); None if it would overflow."""
        base = min(self.exponent, other.exponent)
        mine, theirs = self.exponent - base, other.exponent - base
        bound = (self.bound << mine) + (other.bound << theirs)
        if bound >= _LIMIT:
            return None
        low, high, shift = (self, other, theirs) if mine == 0 else (other, self, mine)
        sums = {name: torch.add(t, high.sums[name], alpha=1 << shift) for name, t in low.sums.items()}
        return Block(base, bound, sums)


@dataclass
class PartialSum:
    """``sum_k weight_k * update_k`` per parameter as blocks of int64 fixed point, and a record per fold."""

    template: dict[str, tuple[int, ...]]
    blocks: dict[int, Block] = field(default_factory=dict)
    """By exponent class ``exponent // BLOCK_BITS``."""
    folds: dict[int, FoldRecord] = field(default_factory=dict)
    magnitude: float = 0.0
    """``sum_k |weight_k| * norm_k``: no element of the sum can be larger (an element of an update is
    at most its L2 norm)."""
    overflowed: bool = False
    """Set by :meth:`merged` when two shards' blocks together do not fit: :meth:`total` is then NaN."""

    @classmethod
    def zeros(cls, template: Mapping[str, TensorSpec]) -> PartialSum:
        return cls({name: tuple(spec.shape) for name, spec in template.items()})

    def add(
        self,
        device: int,
        update: Mapping[str, torch.Tensor],
        weight: float,
        record: FoldRecord,
        largest: float | None = None,
    ) -> bool:
        """Fold ``weight * update``; False (and this sum must be discarded) if it would overflow.

        The fold's scale is ``|weight|`` times the update's largest element: ``largest`` when the
        caller has it (:func:`~amble.server.tensors.update_stats`, which refuses NaN), else one read of
        the update (a NaN makes the scale infinite: refused). ``record`` is kept for the statistics
        and the norms. The blocks are replaced by new ones, never changed in place (see the module's
        docstring).
        """
        if largest is None:
            largest = max((_max_abs(update[name]) for name in self.template), default=0.0)
        scale = abs(weight) * largest
        if not math.isfinite(scale):
            return False
        self.folds[device] = record
        self.magnitude += abs(weight) * record.norm
        if scale < TINY_SCALE:
            return True
        own = math.frexp(scale)[1] - PRECISION_BITS  # scale < 2**(own + PRECISION_BITS)
        term = math.ceil(math.ldexp(scale, -own) * (1 + 2.0**-40)) + 1
        key = own // BLOCK_BITS
        block = self.blocks.get(key)
        if block is None and len(self.blocks) >= MAX_BLOCKS:
            return False
        base = own if block is None else min(block.exponent, own)
        widen = 0 if block is None else block.exponent - base
        bound = (term << (own - base)) + (0 if block is None else block.bound << widen)
        if bound >= _LIMIT:
            return False
        factor = math.ldexp(weight, -own)
        sums = {
            name: _fold_into(None if block is None else block.sums[name], widen, update[name], factor, own - base)
            for name in self.template
        }
        self.blocks = {**self.blocks, key: Block(base, bound, sums)}
        return True

    def merged(self, other: PartialSum) -> PartialSum:
        """A new sum of both (neither is changed): the same integers whatever the split."""
        blocks, overflowed = dict(self.blocks), self.overflowed or other.overflowed
        for key, block in other.blocks.items():
            mine = blocks.get(key)
            both = block if mine is None else mine.plus(block)
            overflowed = overflowed or both is None
            if both is not None:
                blocks[key] = both
        folds = {**self.folds, **other.folds}
        return PartialSum(self.template, blocks, folds, self.magnitude + other.magnitude, overflowed)

    def total(self) -> Params:
        """The sum rounded to float64: one block converts exactly to the nearest float64; several are
        added as double-doubles (each block's int64 split exactly into two float64) in the order of
        their exponents, a deterministic function of the blocks' integers."""
        if self.overflowed:
            return {name: torch.full(shape, math.nan, dtype=torch.float64) for name, shape in self.template.items()}
        ordered = [self.blocks[key] for key in sorted(self.blocks)]
        if len(ordered) == 1:  # the common case: int64 to float64 rounds to nearest, the power of two is exact
            unit = math.ldexp(1.0, ordered[0].exponent)
            return {name: t.to(torch.float64).mul_(unit) for name, t in ordered[0].sums.items()}
        totals = {}
        for name, shape in self.template.items():
            if not ordered:
                totals[name] = torch.zeros(shape, dtype=torch.float64)
                continue
            hi, lo = _split(ordered[0], name)
            for block in ordered[1:]:
                more_hi, more_lo = _split(block, name)
                lo.add_(more_lo)
                sum_hi = torch.empty_like(hi)
                _two_sum_into(hi, lo, more_hi, sum_hi, torch.empty_like(hi))
                hi = sum_hi
            totals[name] = hi.add_(lo)
        return totals

    def stats(self) -> dict[str, float]:
        """The folds' statistics summed exactly (``math.fsum`` is correctly rounded, so order-free)."""
        names = sorted({stat for record in self.folds.values() for stat in record.stats})
        return {stat: math.fsum(r.stats.get(stat, 0.0) for r in self.folds.values()) for stat in names}

    def norms(self) -> list[float]:
        """The L2 norms of the folded updates, in ascending order."""
        return sorted(record.norm for record in self.folds.values())

    def to_value(self) -> ShardValue:
        """This sum as a store value: kept as it is by the embedded store, encoded for any other."""
        return ShardValue(self.template, dict(self.blocks), dict(self.folds), self.magnitude, self.overflowed)

    def to_blob(self) -> bytes:
        """The blocks and the fold records as one safetensors blob. The records are tensors too
        (device ids, norms, one column per statistic), not JSON: they grow with the round."""
        tensors = {f"{_SUM}{key}/{n}": t for key, block in self.blocks.items() for n, t in block.sums.items()}
        devices = sorted(self.folds)
        names = sorted({stat for record in self.folds.values() for stat in record.stats})
        tensors[_FOLD_DEVICES] = torch.tensor(devices, dtype=torch.int64)
        tensors[_FOLD_NORMS] = torch.tensor([self.folds[d].norm for d in devices], dtype=torch.float64)
        for stat in names:
            column = [self.folds[d].stats.get(stat, 0.0) for d in devices]
            tensors[_FOLD_STAT + stat] = torch.tensor(column, dtype=torch.float64)
        metadata = {
            "template": json.dumps({name: list(shape) for name, shape in self.template.items()}),
            "blocks": json.dumps({str(k): [b.exponent, str(b.bound)] for k, b in self.blocks.items()}),
            "magnitude": repr(self.magnitude),
            "overflowed": "1" if self.overflowed else "0",
        }
        return encode(tensors, metadata=metadata)

    @classmethod
    def from_value(cls, value: Value) -> PartialSum:
        """The sum a store value holds: the blocks themselves when the store kept the object."""
        if isinstance(value, ShardValue):
            return value.sums()
        return cls.from_blob(as_bytes(value))

    @classmethod
    def from_blob(cls, blob: bytes) -> PartialSum:
        tensors = decode(blob)
        meta = read_metadata(blob)
        template = {name: tuple(shape) for name, shape in json.loads(meta["template"]).items()}
        blocks = {
            int(key): Block(int(exponent), int(bound), {n: tensors[f"{_SUM}{key}/{n}"] for n in template})
            for key, (exponent, bound) in json.loads(meta["blocks"]).items()
        }
        devices = tensors[_FOLD_DEVICES].tolist() if _FOLD_DEVICES in tensors else []
        norms = tensors[_FOLD_NORMS].tolist() if _FOLD_NORMS in tensors else []
        columns = {n[len(_FOLD_STAT) :]: t.tolist() for n, t in tensors.items() if n.startswith(_FOLD_STAT)}
        records = {
            int(d): FoldRecord(float(norms[i]), {stat: float(c[i]) for stat, c in columns.items()})
            for i, d in enumerate(devices)
        }
        return cls(template, blocks, records, float(meta.get("magnitude", "inf")), meta.get("overflowed") == "1")


@dataclass(frozen=True)
class ShardValue(Encodable):
    """A committed shard as the embedded store keeps it: blocks no fold changes any more (a fold
    makes new ones), encoded only when bytes are asked for."""

    template: dict[str, tuple[int, ...]]
    blocks: dict[int, Block]
    folds: dict[int, FoldRecord]
    magnitude: float
    overflowed: bool

    def sums(self) -> PartialSum:
        """A sum on these blocks (shared, safely: they are never changed)."""
        return PartialSum(self.template, dict(self.blocks), dict(self.folds), self.magnitude, self.overflowed)

    def __bytes__(self) -> bytes:
        return self.sums().to_blob()


def shard_size_bound(template: Mapping[str, TensorSpec], folds: int) -> int:
    """An upper bound on the bytes of a shard of a model with this ``template`` holding ``folds``
    updates, from the template's shapes alone (nothing is allocated): up to :data:`MAX_BLOCKS` int64
    per weight, their safetensors headers and the fold records."""
    weights = sum(math.prod(spec.shape) for spec in template.values())
    names = sum(len(name) for name in template)
    header = _HEADER_BYTES + MAX_BLOCKS * (names + len(template) * (_HEADER_BYTES_PER_TENSOR + len(_SUM) + 8))
    return BYTES_PER_WEIGHT * weights + header + folds * _RECORD_BYTES


def _max_abs(tensor: torch.Tensor) -> float:
    if tensor.numel() == 0:
        return 0.0
    low, high = (float(v) for v in torch.aminmax(tensor))
    return math.inf if math.isnan(low) or math.isnan(high) else max(-low, high)  # inf: the fold is refused


def _split(block: Block, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's tensor as ``hi + lo`` in float64, exactly: ``hi`` its nearest float64, ``lo`` the rest
    (below 2**10 in units of the block's exponent, so exact too), both scaled by ``2**exponent``."""
    whole = block.sums[name]
    unit = math.ldexp(1.0, block.exponent)
    hi = whole.to(torch.float64)
    lo = torch.sub(whole, hi.to(torch.int64)).to(torch.float64)
    return hi.mul_(unit), lo.mul_(unit)


def _two_sum_into(
    hi: torch.Tensor, lo: torch.Tensor, addend: torch.Tensor, total: torch.Tensor, taken: torch.Tensor
) -> None:
    """``total = hi + addend``, and the rounding error of that sum added to ``lo``, exactly.

    Knuth's TwoSum, valid whatever the magnitudes: ``b = s - hi``, ``error = (hi - (s - b)) +
    (addend - b)``. ``hi``, ``addend`` and ``taken`` are overwritten.
    """
    torch.add(hi, addend, out=total)
    torch.sub(total, hi, out=taken)  # b: the part of the addend that made it into the total
    addend.sub_(taken)  # what of the addend was lost
    torch.sub(total, taken, out=taken)  # s - b: the part of hi that made it in
    hi.sub_(taken).add_(addend)  # the rounding error of hi + addend
    lo.add_(hi)


def _fold_into(acc: torch.Tensor | None, widen: int, update: torch.Tensor, factor: float, shift: int) -> torch.Tensor:
    """``acc * 2**widen + trunc(update * factor) * 2**shift`` as a new int64 tensor, in cache-sized passes.

    ``update * factor`` is formed in float64 (the update converted exactly) and truncated toward zero
    when converted to int64; then scaled by ``2**shift`` as an integer (exact: the bound keeps it
    below ``2**62``), so the integer a fold adds never depends on the block it lands in. Per element:
    one conversion and one product in float64, one conversion to int64 and one integer
    multiply-add. At most one of ``widen`` and ``shift`` is nonzero (the finer of the block and
    the fold sets the exponent).
    """
    if widen and shift:
        raise ValueError(f"a fold widens its block ({widen}) or is shifted into it ({shift}), not both")
    out = torch.empty(update.shape, dtype=torch.int64)
    flat_out, flat_update = out.view(-1), update.reshape(-1)
    flat_acc = None if acc is None else acc.view(-1)
    count = flat_out.numel()
    size = min(_CHUNK, count)
    real, whole = torch.empty(size, dtype=torch.float64), torch.empty(size, dtype=torch.int64)
    for start in range(0, count, _CHUNK):
        end = min(start + _CHUNK, count)
        r = real[: end - start]
        r.copy_(flat_update[start:end]).mul_(factor)
        if flat_acc is None:
            flat_out[start:end].copy_(r)
            if shift:
                flat_out[start:end].mul_(1 << shift)
            continue
        w = whole[: end - start]
        w.copy_(r)
        if widen:
            torch.add(w, flat_acc[start:end], alpha=1 << widen, out=flat_out[start:end])
        else:
            torch.add(flat_acc[start:end], w, alpha=1 << shift, out=flat_out[start:end])
    return out
