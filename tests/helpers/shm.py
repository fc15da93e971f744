"""DeepSpeed's CPU all-reduce leaves a 66 MB shared-memory segment per rank per job in /dev/shm
(deepspeed/ops/csrc/cpu/comm/shm.cpp creates ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
and never unlinks it). /dev/shm is memory: one run of the suite left ~1 GB there, a day of runs the
machine's RAM. The tests remove the segments their jobs leave."""

from __future__ import annotations

import os
from pathlib import Path

SHM = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer_"


def mapped_segments() -> set[str]:
    """Paths of DeepSpeed segments some live process has mapped (a running job's)."""
    mapped = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped.update(line.split()[-1] for line in f if PREFIX in line)
        except OSError:  # gone, or not ours to read
            continue
    return mapped


def remove_leftovers(since: float = 0.0) -> list[Path]:
    """Unlink the DeepSpeed segments made at or after ``since`` (a time.time()) that no live
    process maps: a finished job's, which nothing will open again."""
    if not SHM.is_dir():
        return []
    candidates = []
    for p in SHM.glob(PREFIX + "*"):
        try:
            if p.stat().st_mtime >= since:
                candidates.append(p)
        except FileNotFoundError:
            continue
    if not candidates:
        return []
    in_use = mapped_segments()
    removed = []
    for p in candidates:
        if str(p) not in in_use:
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                continue
    return removed
