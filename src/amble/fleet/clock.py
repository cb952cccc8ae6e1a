"""The virtual clock: how long a device's round takes, from its profile and real step timings.

Compute time for ``tau`` steps at batch ``B`` is ``tau * (slowdown * t_ref(B) + step_overhead_s) *
noise``: ``t_ref(B)`` is the model's per-step time on the reference device, measured once by timing
real training steps of that model on this machine (cached), so larger batches are cheaper per sample
exactly as they are on real hardware; ``noise`` is lognormal, drawn per device and round
(``jitter``) and, with ``shared_jitter``, once per round for the whole fleet (a load every device
feels at once). Communication is ``latency + bytes / bandwidth`` each way.
A device recorded from a real fleet (``amble serve``'s ``fleet_trace.json``) carries its own
absolute step times and link times instead, which replace ``slowdown * t_ref(B)`` and the link model.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amble.fleet.profiles import DeviceProfile
from amble.fleet.steptime import StepTime

CALIBRATION_BATCHES = (8, 16, 32, 64, 128, 256, 512)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "amble"


def calibrate(
    build: Callable[[], nn.Module],
    model_name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    cache_dir: Path | None = None,
    batches: tuple[int, ...] = CALIBRATION_BATCHES,
    repeats: int = 10,
    warmup: int = 3,
    inputs: torch.Tensor | None = None,
) -> StepTime:
    """Time real SGD steps of the model at several batch sizes (fastest of ``repeats``); cached on disk.

    ``inputs`` are real samples to time on (repeated to fill a batch), for data that random normal
    values cannot stand in for (token ids); without them, batches are drawn from N(0, 1).
    """
    cache = (cache_dir or default_cache_dir()) / "calibration.json"
    parts = [model_name, "x".join(map(str, input_shape)), str(num_classes), torch.__version__, platform.machine()]
    if inputs is not None and inputs.dtype != torch.float32:
        parts.append(str(inputs.dtype))
    parts += [f"threads={torch.get_num_threads()}", f"batches={','.join(map(str, batches))}"]
    key = "|".join(parts)
    cached: dict[str, dict[str, float]] = {}
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
        if key in cached:
            return StepTime.from_mapping({int(b): t for b, t in cached[key].items()})

    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    measured: dict[int, float] = {}
    for batch in batches:
        if inputs is not None and len(inputs):
            x = inputs[torch.arange(batch) % len(inputs)]
        else:
            x = torch.randn((batch, *input_shape), generator=generator)
        y = torch.randint(0, num_classes, (batch,), generator=generator)
        times = []
        for rep in range(warmup + repeats):
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
            if rep >= warmup:  # the first steps warm up allocators and kernels for this shape
                times.append(time.perf_counter() - began)
        measured[batch] = min(times)  # other load on the machine only ever adds time
    step_time = StepTime.from_mapping(measured)
    cached[key] = step_time.to_json()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home only costs re-calibration next time
    return step_time


@dataclass(frozen=True)
class RoundTiming:
    download_s: float
    compute_s: float
    upload_s: float
    dropped_at_s: float | None
    """Seconds into the round at which the device dropped out, or None."""

    @property
    def total_s(self) -> float:
        return self.download_s + self.compute_s + self.upload_s


class VirtualClock:
    """Turns (profile, plan) into seconds. Deterministic in ``(seed, round, device)``."""

    def __init__(self, step_time: StepTime, model_bytes: int, seed: int) -> None:
        self.step_time = step_time
        self.model_bytes = model_bytes
        self.seed = seed

    def rng(self, round_index: int, device: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, round_index, device, 0xC10C])

    def is_available(self, profile: DeviceProfile, round_index: int, device: int) -> bool:
        if profile.availability >= 1.0:
            return True
        draw = np.random.default_rng([self.seed, round_index, device, 0xA7A1]).random()
        return bool(draw < profile.availability)

    def step_s(self, profile: DeviceProfile, batch_size: int) -> float:
        """Seconds per step: the device's own recorded step time, else its slowdown times ``t_ref``."""
        if profile.step_s is not None:
            return profile.step_s(batch_size) + profile.step_overhead_s
        return profile.slowdown * self.step_time(batch_size) + profile.step_overhead_s

    def timing(self, profile: DeviceProfile, round_index: int, device: int, batch_size: int, steps: int) -> RoundTiming:
        rng = self.rng(round_index, device)
        noise = float(np.exp(rng.normal(0.0, profile.jitter))) if profile.jitter > 0 else 1.0
        if profile.shared_jitter > 0:  # one draw per round, the same for every device
            shared = np.random.default_rng([self.seed, round_index, 0x5EA7]).standard_normal()
            noise *= float(np.exp(shared * profile.shared_jitter))
        download_s = profile.download_s
        if download_s is None:
            download_s = profile.latency_s + self.model_bytes * 8 / profile.down_bps
        upload_s = profile.upload_s
        if upload_s is None:
            upload_s = profile.latency_s + self.model_bytes * 8 / profile.up_bps
        compute_s = steps * self.step_s(profile, batch_size) * noise
        dropped_at_s = None
        if profile.p_dropout > 0 and rng.random() < profile.p_dropout:
            dropped_at_s = rng.uniform(0.0, download_s + compute_s + upload_s)
        return RoundTiming(download_s, compute_s, upload_s, dropped_at_s)
