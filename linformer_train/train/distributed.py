"""Process-group setup for every launcher: deepspeed, torchrun, SLURM via either, or plain python."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import time
import warnings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_deepspeed(verbose: bool = False):
    """DeepSpeed's start-up chatter (its INFO/WARNING log lines, e.g. "Setting accelerator to CPU",
    and its prints, e.g. "... built successfully") hidden unless ``verbose``; its errors still show.
    Our own lines are printed outside such blocks."""
    if verbose:
        yield
        return
    logger = logging.getLogger("DeepSpeed")  # DeepSpeed configures this same logger when imported
    quiet = _BelowError()
    logger.addFilter(quiet)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
            yield
    finally:
        logger.removeFilter(quiet)


def init_distributed(verbose: bool = False) -> tuple[int, int]:
    """Join (or, for plain ``python``, create) the process group; returns (rank, world_size).

    The deepspeed launcher and torchrun export RANK/WORLD_SIZE/MASTER_*; a plain run gets a
    one-process group on a free local port. On a CPU node DeepSpeed picks gloo by itself; torch's
    threads are split between the ranks of the node so two ranks do not fight over each core.
    DeepSpeed's own start-up lines are hidden unless ``verbose`` (``logging.verbose``).
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank0 = os.environ.get("RANK", "0") == "0"
    with quiet_deepspeed(verbose):
        import deepspeed
        import torch
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    if get_accelerator().device_name() == "cpu" and not dist.is_initialized():
        ensure_cpu_comm_op(say=print if rank0 else (lambda *a, **k: None))
    if not dist.is_initialized():
        with quiet_deepspeed(verbose):
            deepspeed.init_distributed(verbose=False)
    return dist.get_rank(), dist.get_world_size()


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


SHM_OP = "deepspeed_shm_comm"
STALE_AFTER_S = 10.0
"""A build lock with no build process in its folder for this long was left by a killed build."""


def _builders_in(folder: str) -> list[int]:
    """Pids of live processes working in ``folder`` (the compiler and ninja run there)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["cwd"]):
        try:
            if p.info["cwd"] == folder and p.pid != os.getpid():
                pids.append(p.pid)
        except (psutil.Error, KeyError):
            continue
    return pids


def ensure_cpu_comm_op(say=print) -> None:
    """Build (once per environment) or load DeepSpeed's CPU communication op before DeepSpeed's
    process-group init asks for it, so that start-up can say what it is doing and never hangs.

    torch builds JIT extensions under a ``lock`` file in the build folder and *waits forever* while
    that file exists; a build killed by a signal leaves it behind, and every later start sleeps
    with no output. Our processes take an flock (released by the kernel when a process dies) around
    the build; holding it, a ``lock`` with no process building in its folder is stale: removed,
    with a line saying so."""
    import fcntl

    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    folder = _get_build_directory(SHM_OP, verbose=False)
    baton = os.path.join(folder, "lock")
    with open(folder + ".linformer.lock", "w") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process to finish building DeepSpeed's CPU communication op in {folder}",
                flush=True)
            fcntl.flock(guard, fcntl.LOCK_EX)
        quiet_since, told = time.monotonic(), False
        while os.path.exists(baton):
            if _builders_in(folder):  # a build (perhaps an orphaned compiler) is still running
                quiet_since = time.monotonic()
                if not told:
                    say(f"waiting for a running build of DeepSpeed's CPU communication op in {folder}", flush=True)
                    told = True
            elif time.monotonic() - quiet_since >= (STALE_AFTER_S if told else 0.0):
                try:
                    os.unlink(baton)
                    say(f"note: removed {baton}, a lock left by an interrupted build of DeepSpeed's CPU "
                        f"communication op", flush=True)
                except FileNotFoundError:
                    pass
                break
            time.sleep(0.5)
        built = any(f.endswith(".so") for f in os.listdir(folder))
        if not built:
            say(f"building DeepSpeed's CPU communication op, once per environment (~15-60 s), in {folder}",
                flush=True)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # ninja's and DeepSpeed's own build chatter
            builder.load(verbose=False)
        if not built:
            say(f"built DeepSpeed's CPU communication op in {time.perf_counter() - t0:.1f} s", flush=True)


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
