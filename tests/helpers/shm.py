"""DeepSpeed's CPU all-reduce leaves a 66 MB shared-memory segment per rank per job in /dev/shm
(deepspeed/ops/csrc/cpu/comm/shm.cpp creates ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
and never unlinks it). /dev/shm is memory: one run of the suite left ~1 GB there, a day of runs the
machine's RAM. The tests remove the segments their jobs leave.

A segment is removed only when no live process maps it, and either it belongs to a job of ours that
has ended (its master port), or it has not been written for a while: a job creating its segment
writes it before it maps it, and another test session's job may be doing that right now."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Optional

SHM = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer_"
QUIET_S = 120.0  # a segment not written for this long is not being created


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


def _port(path: Path) -> Optional[int]:
    parts = path.name[len(PREFIX):].split("_")  # <uid>_<addr>_<port>_<rank>
    try:
        return int(parts[-2])
    except (IndexError, ValueError):
        return None


def remove_leftovers(ports: Iterable[int] = (), since: float = 0.0, quiet_s: float = QUIET_S) -> list[Path]:
    """Unlink the unmapped DeepSpeed segments of the (ended) jobs on ``ports``, and those written
    at or after ``since`` but not in the last ``quiet_s`` seconds."""
    if not SHM.is_dir():
        return []
    ports, now = set(ports), time.time()
    candidates = []
    for p in SHM.glob(PREFIX + "*"):
        try:
            mtime = p.stat().st_mtime
        except FileNotFoundError:
            continue
        if _port(p) in ports or since <= mtime <= now - quiet_s:
            candidates.append(p)
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
