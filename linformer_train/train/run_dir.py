"""A run folder belongs to one run.

- ``RunLock``: rank 0 holds ``<run_dir>/run.lock`` (an flock, released by the kernel when the
  process ends, plus the owner's host, pid and start time) for as long as the run lives. A second
  run on the same folder is refused at start; a lock left by a process that is gone is taken over.
- ``claim_run_dir``: a fresh start (no resume) into a folder that already holds a run is refused,
  or, with ``checkpoint.overwrite=true``, the old run is moved aside into ``replaced-<time>/``
  (never deleted). Resuming from a checkpoint older than the newest moves the newer ones, which
  belong to the history being abandoned, into ``checkpoints/superseded-<time>/``.
- ``trim_metrics``: on resume, ``metrics.jsonl`` keeps the records up to the resumed step (the
  steps after it are trained again) and drops a torn last line.

What stays in place: the prepared data and tokenizer (``<run_dir>/data``), which depend only on
their inputs and are checked against them on every start.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK = "run.lock"
METRICS = "metrics.jsonl"
# what one run writes into its folder (besides the reusable prepared data)
RUN_FILES = ("checkpoints", METRICS, "tensorboard", "config.yaml", "summary.json")


class RunDirError(ValueError):
    """The run folder cannot be used by this run; the message says why and what to do."""


class RunFileError(RuntimeError):
    """A file of the run folder could not be written during the run (a full disk, a read-only
    filesystem, a quota): the run stops with one line; its last checkpoint is intact."""


def write_failure(path: str | os.PathLike, exc: OSError) -> RunFileError:
    return RunFileError(f"writing {path} failed ({exc.strerror or exc})")


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _aside(parent: Path, prefix: str) -> Path:
    """A new folder ``<prefix>-<UTC time>`` (with a counter when two land in the same second)."""
    base = parent / f"{prefix}-{_stamp()}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}.{i}"), i + 1
    path.mkdir(parents=True)
    return path


# ------------------------------------------------------------------------------------------ lock


def _process_start(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class RunLock:
    """An exclusive, non-blocking lock on a run folder for the life of a run (rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self.fd: Optional[int] = None
        self.took_over: Optional[dict] = None

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is in use by another run ({_describe(owner)}); wait for "
                              f"it to end or choose another train.run_dir") from None
        owner = _read_owner(fd)
        # a filesystem where flock is a no-op (some network mounts) still sees a live local owner
        if owner and owner.get("host") == socket.gethostname() and owner.get("pid") != os.getpid():
            start = _process_start(int(owner.get("pid", -1)))
            if start is not None and abs(start - float(owner.get("process_start", -1))) < 1.0:
                os.close(fd)
                raise RunDirError(f"{self.path.parent} is in use by another run ({_describe(owner)}); wait "
                                  f"for it to end or choose another train.run_dir")
        self.took_over = owner or None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # before the unlock: a waiting run then makes a fresh file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _read_owner(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode(errors="replace") or "{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _describe(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"


def took_over_note(lock: RunLock) -> Optional[str]:
    """A line for a lock taken over from a process that is gone, else None."""
    if not lock.took_over:
        return None
    return f"note: {lock.path} was left by a run that is gone ({_describe(lock.took_over)}); taking it over"


# ----------------------------------------------------------------------------------- ownership


def previous_run(run_dir: Path) -> Optional[str]:
    """What of an earlier run the folder holds (for the message), or None."""
    ckpts = run_dir / "checkpoints"
    steps = sorted(p.name for p in ckpts.glob("step_*")) if ckpts.is_dir() else []
    if steps:
        return f"checkpoints {steps[0]} .. {steps[-1]}" if len(steps) > 1 else f"checkpoint {steps[0]}"
    if (ckpts / "latest").exists():
        return "a checkpoints/latest pointer"
    metrics = run_dir / METRICS
    if metrics.is_file() and metrics.stat().st_size > 0:
        return f"a training history ({METRICS})"
    events = run_dir / "tensorboard"
    if events.is_dir() and any(events.iterdir()):
        return "TensorBoard events"
    return None


def move_run_aside(run_dir: Path) -> Path:
    """Move what a run wrote (not the prepared data) into ``replaced-<time>/``; returns it."""
    dest = _aside(run_dir, "replaced")
    for name in RUN_FILES:
        src = run_dir / name
        if src.exists() or src.is_symlink():
            os.replace(src, dest / name)
    return dest


def claim_run_dir(run_dir: Path, resume: str, overwrite: bool) -> list[str]:
    """Make ``run_dir`` this run's, before anything is written; returns lines to print.

    ``resume`` is the config's value (none | auto | a path). A fresh start into a folder holding a
    run is refused unless ``overwrite``; ``auto`` with neither a complete checkpoint nor a ``latest``
    pointer moves an earlier attempt's logs aside (it had nothing to resume; a broken pointer is
    reported by the resume itself, never taken for a fresh start)."""
    from linformer_train.train.checkpoint import CheckpointManager

    notes: list[str] = []
    held = previous_run(run_dir)
    if held is None:
        return notes
    ckpts = run_dir / "checkpoints"
    nothing_to_resume = not ((ckpts / "latest").exists() or CheckpointManager(ckpts, 1).complete_checkpoints())
    fresh = resume == "none" or (resume == "auto" and nothing_to_resume)
    outside = resume not in ("none", "auto") and not _inside(Path(resume), run_dir)
    if not (fresh or outside):
        return notes  # resuming this folder's own run
    if resume == "auto" or overwrite:
        dest = move_run_aside(run_dir)
        why = "checkpoint.overwrite=true" if overwrite else "resume=auto found no complete checkpoint"
        notes.append(f"{why}: moved the earlier run in {run_dir} ({held}) aside to {dest}")
        return notes
    how = ("" if resume == "none" else f"checkpoint.resume={resume} starts a new history here, but ")
    raise RunDirError(
        f"{how}train.run_dir={run_dir} already holds a run ({held}); continue it with --resume, start in "
        f"another folder with train.run_dir=..., or pass checkpoint.overwrite=true to move the old run "
        f"aside (it is never deleted)")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def set_aside(root: Path, folders: list[Path]) -> Path:
    """Move checkpoint folders of an abandoned history into ``<root>/superseded-<time>/``."""
    dest = _aside(root, "superseded")
    for p in folders:
        os.replace(p, dest / p.name)
    return dest


def set_aside_newer_checkpoints(root: Path, resumed: Path) -> list[str]:
    """Resuming from ``resumed`` while newer checkpoints of the same folder exist: those belong to a
    history this run replaces; move them out of the way (``latest`` is rewritten at the next save)."""
    from linformer_train.train.checkpoint import tag_step

    step = tag_step(resumed.name)
    if step is None or not _inside(resumed, root):
        return []
    newer = [p for p in sorted(root.glob("step_*"))
             if p.is_dir() and (tag_step(p.name) or -1) > step]
    if not newer:
        return []
    dest = set_aside(root, newer)
    names = ", ".join(p.name for p in newer)
    return [f"resuming from {resumed.name}: the newer checkpoints ({names}) belong to the history this "
            f"run replaces; moved them to {dest}"]


# ------------------------------------------------------------------------------------ metrics


def trim_metrics(run_dir: Path, step: int) -> Optional[str]:
    """Keep the records of steps <= ``step`` (the resumed checkpoint's) and drop a torn line;
    rewrite the file atomically. Returns a line to print when anything was dropped."""
    path = run_dir / METRICS
    if not path.is_file():
        return None
    kept, dropped, torn = [], 0, 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
                ok = isinstance(record, dict) and int(record.get("step", 0)) <= step
            except (ValueError, TypeError):
                torn += 1
                continue
            if ok:
                kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
            else:
                dropped += 1
    if not (dropped or torn):
        return None
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    parts = ([f"{dropped} records after step {step} (those steps run again)"] if dropped else []) + (
        [f"{torn} damaged line(s)"] if torn else [])
    return f"{METRICS}: dropped {' and '.join(parts)}"
