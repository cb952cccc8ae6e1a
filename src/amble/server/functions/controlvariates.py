"""SCAFFOLD's control variates (Karimireddy et al. 2020, option II), kept by the parameter server.

A device trains with ``w -= lr_s * (grad + c - c_k)``: ``c`` is the server's control variate for the
round's base model version, ``c_k`` the device's own (both zero until a round changes them). The
device uploads only its usual delta; the server derives the rest, for device ``k`` that ran ``K_k``
steps from ``x`` to ``y_k = x + delta_k``:

- ``c_k+ = c_k - c - delta_k / eta_k`` with ``eta_k`` the sum of the learning rates of its ``K_k`` steps
  (``K_k * lr_k`` without a warm-up), so devices with their own steps and learning rates (AMBLE's
  plans) each estimate their mean corrected gradient; ``K_k`` is the reported steps as the server
  holds them (``amble.server.records.reports.hold_steps``), so one report under-stating them moves ``c_k+``
  at most 2x;
- ``c+ = c + (1/N) * sum_k (c_k+ - c_k)`` over the round's counted devices, ``N`` all devices of the run.

Exactly once, under reruns and crashes (see :mod:`amble.server.functions`):

- ``aggregate`` writes the candidate ``c_k+`` under the round *and upload* it came from
  (:func:`amble.server.keys.device_variate`) before the fold's commit, and the commit records which
  upload it counted for the device; a rerun writes the same bytes, a rejected upload's candidate is
  never pointed at;
- ``finalize`` writes ``c+`` for the next version before the round's decisive compare-and-set (like the
  model blob: the same bytes on a rerun, since the device pointers only move after that CAS);
- after the CAS, each counted device's pointer moves to its counted candidate (only forward), then
  the round's other candidates and the devices' previous ones are deleted. A rejected or uncounted
  upload, or a failed round, leaves ``c`` and every ``c_k`` unchanged.

State: one float32 copy of the model per device that was ever counted (``N`` x model size at most),
plus ``c`` for the latest two versions and, during a round, one candidate per upload.
All sums are float64 over devices in sorted order, rounded to float32 once, so every runtime
(embedded, worker processes, Ray) stores the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from amble.errors import UpdateRejected
from amble.server import keys
from amble.server.functions.common import update_json
from amble.server.store.base import Store, read_json
from amble.server.tensors import TensorSpec, all_finite, decode, encode, template_from_json
from amble.strategies.base import Params, Plan, step_lr


def _dtype(spec: TensorSpec) -> torch.dtype:
    dtype: torch.dtype = getattr(torch, spec.dtype)
    return dtype


def zeros(template: Mapping[str, TensorSpec]) -> Params:
    return {name: torch.zeros(spec.shape, dtype=_dtype(spec)) for name, spec in template.items()}


def _read(store: Store, key: str, template: Mapping[str, TensorSpec]) -> Params | None:
    blob = store.get(key)
    if blob is None:
        return None
    tensors = decode(blob)
    missing = sorted(set(template) - set(tensors))
    if missing:
        raise LookupError(f"control variate {key} lacks tensors {missing[:5]}: the store holds another model's state")
    return {name: tensors[name] for name in template}


def server_variate(store: Store, version: int, template: Mapping[str, TensorSpec]) -> Params:
    """``c`` for rounds that train from ``version`` (zeros before any round published one)."""
    return _read(store, keys.server_variate(version), template) or zeros(template)


def device_variate_key(store: Store, device: int) -> str | None:
    """The key of the device's current ``c_k`` (None: zeros, it was never counted)."""
    pointer = read_json(store, keys.device_variate_pointer(device))
    if pointer is None:
        return None
    return keys.device_variate(device, int(pointer["round"]), str(pointer["upload"]))


def device_variate(store: Store, device: int, template: Mapping[str, TensorSpec]) -> Params:
    """The device's current ``c_k`` (zeros before a published round counted it)."""
    key = device_variate_key(store, device)
    if key is None:
        return zeros(template)
    found = _read(store, key, template)
    if found is None:
        raise LookupError(f"device {device}'s control variate {key} is missing from the store")
    return found


def corrections(store: Store, devices: Iterable[int], version: int) -> dict[int, Params] | None:
    """``c - c_k`` (float32) for each device training from ``version``: what its trainer adds to every
    gradient. None when no round has published a control variate yet (then every correction is zero,
    and a strategy without control variates costs one read per round)."""
    blob = store.get(keys.TEMPLATE)
    if blob is None or store.get(keys.server_variate(version)) is None:
        return None
    template = template_from_json(blob)
    c = server_variate(store, version, template)
    result = {}
    for device in devices:
        c_k = device_variate(store, device, template)
        result[device] = {n: (c[n].double() - c_k[n].double()).to(c[n].dtype) for n in template}
    return result


def lr_sum(plan: Plan, steps: int) -> float:
    """``eta_k``: the sum of the learning rates of the first ``steps`` steps of ``plan`` (its warm-up
    included), the scale of option II's ``(x - y_k) / (K_k lr_k)``."""
    if not plan.lr_warmup_steps:
        return steps * plan.lr
    return math.fsum(step_lr(plan, step) for step in range(steps))


def candidate(c_k: Params, c: Params, delta: Mapping[str, torch.Tensor], eta: float) -> Params:
    """``c_k+ = c_k - c - delta / eta`` in float64, rounded to each tensor's dtype once."""
    return {
        name: (value.double() - c[name].double() - delta[name].double() / eta).to(value.dtype)
        for name, value in c_k.items()
    }


def write_candidate(
    store: Store,
    template: Mapping[str, TensorSpec],
    round_index: int,
    device: int,
    upload: str,
    base_version: int,
    delta: Mapping[str, torch.Tensor],
    eta: float,
) -> None:
    """``aggregate``'s part: the candidate ``c_k+`` for this upload (the same bytes on a rerun).

    Refuses the update (reason ``overflow``, before it is folded) if the candidate is not finite in the
    model's dtype: an update far larger than its learning rates explain would poison ``c``."""
    c_k = device_variate(store, device, template)
    c = server_variate(store, base_version, template)
    new = candidate(c_k, c, delta, eta)
    broken = sorted(name for name, t in new.items() if not all_finite(t))
    if broken:
        raise UpdateRejected(
            "overflow",
            f"the update divided by the sum of its steps' learning rates ({eta:g}) is not finite in {broken[:5]}, "
            "so its control variate cannot be kept: it was not counted; train with the round's plan, or lower "
            "server.max_update_norm to refuse such updates",
        )
    store.put(keys.device_variate(device, round_index, upload), encode(new))


def counted_uploads(meta: Mapping[str, Any]) -> dict[int, str]:
    """Which upload the round counted for each counted device (recorded by the fold's commit)."""
    uploads = meta.get("uploads", {})
    return {int(d): str(uploads[str(d)]) for d in meta["counted"]}


def publish_server_variate(
    store: Store,
    template: Mapping[str, TensorSpec],
    round_index: int,
    base_version: int,
    uploads: Mapping[int, str],
    weights: Mapping[int, float],
) -> None:
    """``finalize``'s part, before the round's CAS: ``c+ = c + sum_k p_k (c_k+ - c_k)`` for the next
    version, ``p_k = n_k / n`` the device's share of all the run's samples (the paper's ``1/N`` when
    shares are equal; with unequal shares ``1/N`` would steer the model to the unweighted optimum, not
    the sample-weighted one FedAvg's aggregate aims at). Reads each counted device's candidate and
    current ``c_k`` (whose pointers have not moved yet), in sorted device order, and writes ``c+`` only
    if it is not there yet: a rerun computes the same bytes, and a late duplicate ``finalize`` that runs
    after the winner moved the pointers (and so would compute a wrong ``c+``) cannot overwrite it."""
    c = server_variate(store, base_version, template)
    total = {name: torch.zeros(spec.shape, dtype=torch.float64) for name, spec in template.items()}
    for device in sorted(uploads):
        key = keys.device_variate(device, round_index, uploads[device])
        new = _read(store, key, template)
        if new is None:
            raise LookupError(f"device {device}'s control variate candidate {key} of a counted upload is missing")
        old = device_variate(store, device, template)
        for name in template:
            total[name] += (new[name].double() - old[name].double()) * weights[device]
    c_next = {name: (c[name].double() + total[name]).to(c[name].dtype) for name in template}
    store.compare_and_set(keys.server_variate(base_version + 1), encode(c_next), 0)


def settle_round(store: Store, round_index: int, uploads: Mapping[int, str], devices: Iterable[int]) -> None:
    """After the round is decided (idempotent): point each counted device at its counted candidate
    (``uploads`` is empty for a failed round), then delete the candidates of ``devices`` from this
    round or earlier that no pointer names (rejected uploads', and the devices' previous ``c_k``)."""

    for device, upload in sorted(uploads.items()):

        def advance(pointer: Any, upload: str = upload) -> Any:
            if pointer is not None and int(pointer["round"]) >= round_index:
                return None
            return {"round": round_index, "upload": upload}

        update_json(store, keys.device_variate_pointer(device), advance, f"device {device}'s control variate")
    for device in sorted(set(devices)):
        current = device_variate_key(store, device)
        prefix = keys.device_variate_prefix(device)
        for key in store.keys(prefix):
            written_in = int(key[len(prefix) :].split("/", 1)[0])
            if key != current and written_in <= round_index:
                store.delete(key)


def drop_server_variate(store: Store, version: int) -> None:
    """Compaction: ``c`` of a version nobody trains from again."""
    store.delete(keys.server_variate(version))


def state_bytes(template: Mapping[str, TensorSpec], num_devices: int) -> int:
    """The control variates' memory at most: ``N`` device copies plus two server copies of the model."""
    per_copy = sum(
        math.prod(spec.shape) * torch.empty((), dtype=_dtype(spec)).element_size() for spec in template.values()
    )
    return (num_devices + 2) * per_copy
