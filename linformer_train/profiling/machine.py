"""The machine a profile ran on: its description, the default memory budget, and waiting for it to be idle."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time

import torch

from linformer_train.profiling.cases import GIB


def machine_info(device: str = "cpu") -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        ram = psutil.virtual_memory().total / GIB
    except ImportError:
        ram = None
    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": ram, "python": platform.python_version(), "torch": torch.__version__,
            "host": platform.node(), "command": " ".join(sys.argv)}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_mem_gib=props.total_memory / GIB, cuda=torch.version.cuda)
    return info


def default_budget_bytes(device: str) -> int:
    """CPU: 90% of the memory available now; CUDA: the device's total memory."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    import psutil

    return int(psutil.virtual_memory().available * 0.9)


def wait_for_idle_cpu(max_busy: float, timeout: float, window: float = 1.0) -> float:
    """Wait (at most ``timeout`` s) until the machine's CPU use over ``window`` s is below
    ``max_busy`` (0-1), so a CPU timing does not share cores with other jobs. Returns the last use."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        busy = psutil.cpu_percent(interval=window) / 100
        if busy <= max_busy or time.monotonic() >= deadline:
            return busy
