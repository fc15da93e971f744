"""Process memory probes for the CPU worker: RSS, the kernel's peak-RSS counter, and a watchdog."""

from __future__ import annotations

import os
import threading
from typing import Optional

from linformer_train.profiling.cases import MIB


def _read_status_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident memory of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm = _read_status_kib("VmHWM")
    return hwm is not None and hwm * 1024 <= current_rss() + 16 * MIB


def peak_rss() -> Optional[int]:
    hwm = _read_status_kib("VmHWM")
    return None if hwm is None else hwm * 1024


class RssWatch:
    """Samples RSS every ``interval`` s: keeps the maximum, and ends the process cleanly (exit code
    3, a result line on stdout) when RSS passes ``budget`` bytes. Only used inside a worker."""

    def __init__(self, budget: Optional[int], interval: float = 0.002, on_exceed=None):
        self.budget, self.interval, self.on_exceed = budget, interval, on_exceed
        self.max_rss = current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self.max_rss = current_rss()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = current_rss()
            self.max_rss = max(self.max_rss, rss)
            if self.budget is not None and rss > self.budget and self.on_exceed is not None:
                self.on_exceed(rss)
            self._stop.wait(self.interval)
