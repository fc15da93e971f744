"""Process-group setup for every launcher: deepspeed, torchrun, SLURM via either, or plain python."""

from __future__ import annotations

import os
import socket
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join (or, for plain ``python``, create) the process group; returns (rank, world_size).

    The deepspeed launcher and torchrun export RANK/WORLD_SIZE/MASTER_*; a plain run gets a
    one-process group on a free local port. On a CPU node DeepSpeed picks gloo by itself; torch's
    threads are split between the ranks of the node so two ranks do not fight over each core.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return dist.get_rank(), dist.get_world_size()


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class RankLostError(RuntimeError):
    """Another rank of the job is gone (killed, out of memory, crashed): this one cannot go on."""


def rank_table() -> list[tuple[str, int]]:
    """(host, pid) of every rank, gathered once after init: what lets a survivor name a rank that
    died. The launchers cannot: DeepSpeed's prints the command of the last rank it started,
    whichever one died, and a SIGKILLed rank prints nothing."""
    import torch.distributed as dist

    table: list = [None] * dist.get_world_size()
    dist.all_gather_object(table, (socket.gethostname(), os.getpid()))
    return [tuple(entry) for entry in table]


def lost_ranks(table: list[tuple[str, int]], wait: float = 3.0) -> list[int]:
    """Ranks on this host whose process has ended. Polls up to ``wait`` seconds: a collective
    fails as soon as the dead rank's sockets close, a moment before the process is gone."""
    import psutil

    host, me = socket.gethostname(), os.getpid()

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + wait
    while True:
        gone = [r for r, (h, pid) in enumerate(table) if h == host and pid != me and not alive(pid)]
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(0.1)
