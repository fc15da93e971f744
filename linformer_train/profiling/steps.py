"""Where the time of a real training step goes: forward, backward, optimizer, data and the rest.

The trainer marks its phases with ``torch.profiler.record_function`` ranges (``train.step`` around
each step, ``train.data``, ``train.forward``, ``train.backward``, ``train.optimizer`` inside it;
free when no profiler runs). :func:`profile_training` trains under the torch profiler and
:func:`step_breakdown` reads the ranges back:

* a step is the time from one ``train.step`` range's start to the next one's, so the logging, the
  per-step flag sync and whatever else runs between two steps is inside it;
* on a CPU, a phase is the host time of its ranges (the host does the work);
* on CUDA, a phase is the device time of the kernels launched inside its ranges, from any thread
  (autograd launches the backward's kernels from its own device thread): host ranges there only
  time the launches;
* ``other`` is the step minus the four phases: the flag all-reduce and its sync, the LR update,
  logging, Python between the phases and, on CUDA, the time the device sat idle.

The profiler adds a few microseconds per op, so a profiled step is slower than an unprofiled one:
read the shares, and take tokens/s from the unprofiled run.
"""

from __future__ import annotations

import bisect
from typing import Any, Iterable

PHASES = ("forward", "backward", "optimizer", "data")


def _intervals(events: list, name: str) -> list[tuple[float, float]]:
    return sorted((e.time_range.start, e.time_range.end) for e in events if e.name == name)


def _overlap(ranges: list[tuple[float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(end, hi) - max(start, lo)) for start, end in ranges)


def _containing(ranges: list[tuple[float, float]], starts: list[float], t: float) -> bool:
    i = bisect.bisect_right(starts, t) - 1
    return i >= 0 and ranges[i][0] <= t <= ranges[i][1]


def step_breakdown(events: Iterable[Any], skip: int = 0, device: str = "cpu") -> dict:
    """Mean milliseconds per step of each phase, ``other`` and the whole step, over the steps after
    the first ``skip`` (the last step is left out: its end is the next step's start). ``events``:
    the profiler's events (``prof.events()``: name, time_range in microseconds, and on CUDA the
    device time of the kernels each op launched)."""
    events = list(events)
    starts = [s for s, _ in _intervals(events, "train.step")]
    bounds = list(zip(starts[skip:-1], starts[skip + 1:]))
    if not bounds:
        raise ValueError(f"the profile holds {len(starts)} train.step ranges: too few to time a step "
                         f"after skipping {skip}")
    ranges = {p: _intervals(events, f"train.{p}") for p in PHASES}
    per_step = []
    if device == "cuda":
        range_starts = {p: [s for s, _ in r] for p, r in ranges.items()}
        launched = sorted((e.time_range.start, e.self_device_time_total) for e in events
                          if getattr(e, "self_device_time_total", 0) > 0 and e.name not in
                          {f"train.{p}" for p in (*PHASES, "step")})
        times = [t for t, _ in launched]
        for lo, hi in bounds:
            parts = dict.fromkeys(PHASES, 0.0)
            for t, us in launched[bisect.bisect_left(times, lo):bisect.bisect_left(times, hi)]:
                for p in PHASES:
                    if _containing(ranges[p], range_starts[p], t):
                        parts[p] += us
                        break
            per_step.append((hi - lo, parts))
    else:
        for lo, hi in bounds:
            per_step.append((hi - lo, {p: _overlap(ranges[p], lo, hi) for p in PHASES}))
    n = len(per_step)
    step_us = sum(s for s, _ in per_step) / n
    out = {"steps": n, "device": device,
           "clock": ("device time of the kernels launched in each phase" if device == "cuda"
                     else "host time of each phase's ranges"),
           "step_ms": step_us / 1e3}
    for p in PHASES:
        out[f"{p}_ms"] = sum(parts[p] for _, parts in per_step) / n / 1e3
    out["other_ms"] = out["step_ms"] - sum(out[f"{p}_ms"] for p in PHASES)
    out["shares"] = {p: out[f"{p}_ms"] / out["step_ms"] for p in (*PHASES, "other")}
    return out


def profile_training(cfg, skip: int) -> dict:
    """Train ``cfg`` in this process (one rank) under the torch profiler, as launch/pretrain.py
    would, and return :func:`step_breakdown` of its steps after the first ``skip``."""
    from torch.profiler import ProfilerActivity, profile

    from linformer_train.train.distributed import destroy_distributed, init_distributed
    from linformer_train.train.trainer import Trainer

    init_distributed(cfg.logging.verbose)
    try:
        trainer = Trainer(cfg)
        activities = [ProfilerActivity.CPU]
        if trainer.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            trainer.train()
    finally:
        destroy_distributed()
    return step_breakdown(prof.events(), skip=skip, device=trainer.device.type)
