"""Split a dataset's samples over devices: IID, label-sorted shards, Dirichlet label skew, quantity skew.

Every partition is a deterministic function of ``(labels, arguments, seed)``, disjoint, and covers
every sample, so each strategy in an experiment sees the identical federation.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from amble.config import DataConfig
from amble.errors import DataError

IndexArray = npt.NDArray[np.int64]

PARTITION_KINDS: tuple[str, ...] = ("iid", "shards", "dirichlet", "quantity", "natural")

# Dirichlet draws are cheap; a thousand failures in a row means the request is (nearly) impossible.
MAX_DIRICHLET_ATTEMPTS = 1000


def partition_indices(
    labels: npt.ArrayLike,
    num_devices: int,
    kind: str,
    *,
    seed: int,
    shards_per_device: int = 2,
    alpha: float = 0.5,
    quantity_sigma: float = 1.0,
    min_samples: int = 1,
    owners: npt.ArrayLike | None = None,
) -> list[IndexArray]:
    """Return one sorted int64 index array per device into ``labels``.

    - ``iid``: shuffle, then split into near-equal parts.
    - ``shards``: McMahan et al. 2017: sort by label, cut into ``num_devices * shards_per_device``
      near-equal shards, deal each device ``shards_per_device`` random shards.
    - ``dirichlet``: per class, split its samples over devices with Dirichlet(``alpha``) proportions
      (Hsu et al. 2019); small ``alpha`` means strong label skew. Redrawn until every device has
      ``min_samples``.
    - ``quantity``: IID labels, device sizes proportional to LogNormal(0, ``quantity_sigma``) draws,
      each at least ``min_samples``.
    - ``natural``: by ``owners`` (one user id per sample): with as many devices as owners, device ``k``
      holds the ``k``-th smallest owner's samples; with fewer, owners are dealt onto devices largest
      first, each to the device with the fewest samples so far (ties in size broken by the seed).
    """
    label_array = np.asarray(labels)
    if label_array.ndim != 1 or label_array.dtype.kind not in "iu":
        raise DataError(f"labels must be a 1-D integer array, got {label_array.dtype} with shape {label_array.shape}")
    num_samples = len(label_array)
    if kind not in PARTITION_KINDS:
        raise DataError(f"unknown partition kind={kind!r}; allowed kinds: {', '.join(PARTITION_KINDS)}")
    if not 1 <= num_devices <= num_samples:
        raise DataError(
            f"num_devices={num_devices} must be between 1 and the number of samples ({num_samples}); "
            "use fewer devices or a larger dataset"
        )
    if min_samples < 1 or num_devices * min_samples > num_samples:
        raise DataError(
            f"min_samples={min_samples} must be >= 1 and num_devices * min_samples "
            f"({num_devices} * {min_samples}) at most the {num_samples} samples; lower min_samples"
        )

    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = _iid(rng, num_samples, num_devices)
    elif kind == "shards":
        parts = _shards(rng, label_array, num_devices, shards_per_device)
    elif kind == "dirichlet":
        parts = _dirichlet(rng, label_array, num_devices, alpha, min_samples)
    elif kind == "natural":
        parts = _natural(rng, owners, num_samples, num_devices)
    else:
        parts = _quantity(rng, num_samples, num_devices, quantity_sigma, min_samples)

    parts = [np.sort(part).astype(np.int64) for part in parts]
    smallest = min(len(part) for part in parts)
    if smallest < min_samples:
        raise DataError(
            f"{kind} partition gives a device only {smallest} samples, below min_samples={min_samples}; "
            "lower min_samples or num_devices"
        )
    return parts


def _iid(rng: np.random.Generator, num_samples: int, num_devices: int) -> list[IndexArray]:
    return list(np.array_split(rng.permutation(num_samples), num_devices))


def _shards(
    rng: np.random.Generator, labels: npt.NDArray[np.integer], num_devices: int, shards_per_device: int
) -> list[IndexArray]:
    num_shards = num_devices * shards_per_device
    if shards_per_device < 1 or num_shards > len(labels):
        raise DataError(
            f"shards_per_device={shards_per_device} must be >= 1 and num_devices * shards_per_device "
            f"({num_shards}) at most the {len(labels)} samples"
        )
    by_label = np.argsort(labels, kind="stable")
    shards = np.array_split(by_label, num_shards)  # sizes differ by at most one, so all samples are used
    deal = rng.permutation(num_shards).reshape(num_devices, shards_per_device)
    return [np.concatenate([shards[shard] for shard in hand]) for hand in deal]


def _dirichlet(
    rng: np.random.Generator,
    labels: npt.NDArray[np.integer],
    num_devices: int,
    alpha: float,
    min_samples: int,
) -> list[IndexArray]:
    if not alpha > 0 or not np.isfinite(alpha):
        raise DataError(f"alpha={alpha} must be a finite number > 0 (e.g. 0.1 strong skew, 100 near IID)")
    by_class = [rng.permutation(np.flatnonzero(labels == value)) for value in np.unique(labels)]
    concentration = np.full(num_devices, alpha)
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        # cuts[c] are the split points of class c's samples over devices: (num_classes, num_devices - 1)
        cuts = [
            (np.cumsum(rng.dirichlet(concentration))[:-1] * len(members)).astype(np.int64).clip(0, len(members))
            for members in by_class
        ]
        sizes = np.zeros(num_devices, dtype=np.int64)
        for cut, members in zip(cuts, by_class, strict=True):
            sizes += np.diff(cut, prepend=0, append=len(members))
        if sizes.min() >= min_samples:
            pieces = [np.split(members, cut) for cut, members in zip(cuts, by_class, strict=True)]
            return [np.concatenate([per_class[device] for per_class in pieces]) for device in range(num_devices)]
    raise DataError(
        f"dirichlet partition: {MAX_DIRICHLET_ATTEMPTS} draws all left some device below "
        f"min_samples={min_samples}; raise alpha (now {alpha}), lower num_devices (now {num_devices}) "
        "or lower min_samples"
    )


def _quantity(
    rng: np.random.Generator, num_samples: int, num_devices: int, sigma: float, min_samples: int
) -> list[IndexArray]:
    if not sigma >= 0 or not np.isfinite(sigma):
        raise DataError(f"quantity_sigma={sigma} must be a finite number >= 0 (0 gives equal sizes)")
    weights = rng.lognormal(mean=0.0, sigma=sigma, size=num_devices)
    spare = num_samples - num_devices * min_samples
    shares = weights / weights.sum() * spare
    extra = np.floor(shares).astype(np.int64)
    # Largest-remainder rounding: the devices with the biggest fractional parts get the leftovers.
    leftover = spare - int(extra.sum())
    extra[np.argsort(-(shares - extra), kind="stable")[:leftover]] += 1
    sizes = min_samples + extra
    return list(np.split(rng.permutation(num_samples), np.cumsum(sizes)[:-1]))


def _natural(
    rng: np.random.Generator, owners: npt.ArrayLike | None, num_samples: int, num_devices: int
) -> list[IndexArray]:
    if owners is None:
        raise DataError(
            "partition.kind 'natural' needs an owner column (which user each training sample came from), and "
            "this dataset has none: add owner_train (or owner) to the arrays, or choose iid, shards, dirichlet "
            "or quantity"
        )
    owner_array = np.asarray(owners)
    if owner_array.shape != (num_samples,) or owner_array.dtype.kind not in "iu":
        raise DataError(
            f"owners must be integers, one per sample ({num_samples}), got {owner_array.dtype} {owner_array.shape}"
        )
    ids, inverse, sizes = np.unique(owner_array, return_inverse=True, return_counts=True)
    if num_devices > len(ids):
        raise DataError(
            f"natural partition: {len(ids)} owners cannot fill data.num_devices={num_devices} devices; set "
            f"data.num_devices to {len(ids)} (one device per owner) or fewer (owners grouped)"
        )
    if num_devices == len(ids):
        return _groups(inverse.ravel(), len(ids))
    shuffled = rng.permutation(len(ids))
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]  # largest first, equal sizes in seeded order
    loads = np.zeros(num_devices, dtype=np.int64)
    device_of_owner = np.empty(len(ids), dtype=np.int64)
    for owner in order:
        device = int(np.argmin(loads))  # the lightest device, the lowest index among equals
        device_of_owner[owner] = device
        loads[device] += sizes[owner]
    return _groups(device_of_owner[inverse.ravel()], num_devices)


def _groups(group_of_sample: npt.NDArray[np.int64], count: int) -> list[IndexArray]:
    """The sample indices of each group ``0 .. count-1``, ascending: one sort, not one scan per group."""
    order = np.argsort(group_of_sample, kind="stable")
    bounds = np.cumsum(np.bincount(group_of_sample, minlength=count))[:-1]
    return [part.astype(np.int64) for part in np.split(order, bounds)]


def split_for(
    data: DataConfig, labels: npt.ArrayLike, seed: int, owners: npt.ArrayLike | None = None
) -> list[IndexArray]:
    """The partition a config describes: what the simulator and every real device compute alike.

    ``owners`` is the dataset's owner column (``Dataset.owner_train``), used by a ``natural`` partition."""
    part = data.partition
    return partition_indices(
        labels,
        data.num_devices,
        part.kind,
        seed=seed,
        shards_per_device=part.shards_per_device,
        alpha=part.alpha,
        quantity_sigma=part.quantity_sigma,
        min_samples=part.min_samples,
        owners=owners,
    )
