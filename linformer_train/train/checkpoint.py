"""Atomic DeepSpeed checkpoints: write under a temporary name, rename when every rank is done,
point ``latest`` at it last (temp file + rename), keep the last K, refuse partial ones on resume.

Layout of ``<run_dir>/checkpoints``::

    step_00000200/            complete: DeepSpeed's files, rank_state_*.pt, complete.json
    step_00000300.tmp/        a save in progress or interrupted: never loaded, removed later
    latest                    "step_00000200" (DeepSpeed's own format, so its tools read it too)

DeepSpeed writes its own ``latest`` before its final barrier and writes files in place; we call it
with ``save_latest=False`` and a temporary tag, so a crash mid-save leaves the previous checkpoint
and the pointer untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

LATEST = "latest"
COMPLETE = "complete.json"
TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and what to do."""


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(name: str) -> Optional[int]:
    """The step of a ``step_XXXXXXXX`` folder name, None for anything else."""
    digits = name[len("step_"):]
    return int(digits) if name.startswith("step_") and digits.isdigit() else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# torch.save (and so DeepSpeed's save) reports a refused or short write as a RuntimeError from its
# zip writer, with the OS error lost: "unexpected pos 704 vs 598", "basic_ios::clear: iostream error"
_SERIALIZER_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "iostream error",
                              "file write failed", "open file failed")


def write_failure_reason(directory: Path, exc: BaseException) -> Optional[str]:
    """Why writing into ``directory`` failed, or None when ``exc`` is not a write failure.

    For torch's RuntimeErrors the OS reason is recovered by writing a 1 MiB probe file in the same
    folder (a full disk, a read-only or immutable folder, a file-size limit all refuse it)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    probe = directory / ".write_probe"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return err.strerror or str(err)
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    text = str(exc)
    if any(s in text for s in _SERIALIZER_WRITE_FAILURES):
        return (text.strip().splitlines() or [type(exc).__name__])[0][:200]
    return None


class CheckpointManager:
    """Saves and finds checkpoints under ``root``. Every rank calls ``save`` (DeepSpeed's save is
    collective); rank 0 alone renames, writes ``latest`` and prunes.

    ``on_stage(name)`` is called at each stage of a save (before, files_written, before_rename,
    before_latest, done): the fault-injection tests kill the process there.
    """

    def __init__(self, root: str | Path, keep_last: int, rank: int = 0,
                 on_stage: Optional[Callable[[str], None]] = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.on_stage = on_stage or (lambda name: None)

    # ---------------------------------------------------------------------------------- saving

    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> Path:
        tag = tag_for_step(step)
        final = self.root / tag
        tmp = self.root / (tag + TMP_SUFFIX)
        self.on_stage("before")
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)  # left by an interrupted save of this same step
            except OSError as exc:
                raise CheckpointError(
                    f"saving checkpoint {tag} in {self.root} failed ({exc.strerror or exc}); the previous "
                    f"checkpoint is intact; free space or fix permissions and resume"
                ) from None
        _barrier()
        state = dict(client_state)
        # lets DeepSpeed's ds_to_universal (tools/convert.py universal) convert ZeRO-1/2 checkpoints too
        state.setdefault("universal_checkpoint_info", {"universal_checkpoint_version": 0.2})
        try:
            engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=state, save_latest=False)
            torch.save(rank_state, tmp / f"rank_state_{self.rank:05d}.pt")
        except (OSError, RuntimeError) as exc:
            reason = write_failure_reason(tmp if tmp.is_dir() else self.root, exc)
            if reason is None:  # not a write failure (e.g. a collective inside DeepSpeed's save)
                raise
            raise CheckpointError(
                f"saving checkpoint {tag} in {self.root} failed ({reason}); the previous "
                f"checkpoint is intact; free space or fix permissions and resume"
            ) from None
        self.on_stage("files_written")
        _barrier()
        if self.rank == 0:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            meta = {"step": step, "files": files, "world_size": dist.get_world_size() if dist.is_initialized() else 1}
            try:
                _write_atomic(tmp / COMPLETE, json.dumps(meta, indent=1))
                self.on_stage("before_rename")
                if final.exists():  # a folder of this step from another history: never kept over ours
                    from linformer_train.train.run_dir import set_aside

                    self._note(f"note: {final} already existed (another history of this step); moved it "
                               f"to {set_aside(self.root, [final])}")
                os.replace(tmp, final)
                _fsync_dir(self.root)
                self.on_stage("before_latest")
                _write_atomic(self.root / LATEST, tag)
            except OSError as exc:
                raise CheckpointError(
                    f"finishing checkpoint {tag} in {self.root} failed ({exc.strerror or exc}); "
                    f"`latest` still names the previous checkpoint"
                ) from None
            self._prune()
        _barrier()
        self.on_stage("done")
        return final

    def _note(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def _prune(self) -> None:
        complete = self.complete_checkpoints()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(f"step_*{TMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)

    # --------------------------------------------------------------------------------- finding

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file())

    def latest(self) -> Optional[Path]:
        """The checkpoint to resume from: the one ``latest`` names, verified, or a newer complete one
        (a save killed between its rename and the pointer); without a pointer, the newest complete
        one. None when there is none at all."""
        named = self._pointer_target()
        newer = [p for p in self.complete_checkpoints()
                 if named is None or (tag_step(p.name) or -1) > (tag_step(named.name) or -1)]
        for candidate in reversed(newer):
            try:
                verify_checkpoint(candidate)
            except CheckpointError as exc:
                self._note(f"note: skipping {candidate.name}: {exc}")
                continue
            if named is not None:
                self._note(f"note: {self.root / LATEST} names {named.name}, but {candidate.name} is complete "
                           f"and newer (its save ended before the pointer was written); using {candidate.name}")
            return candidate
        if named is not None:
            verify_checkpoint(named)
        return named

    def _pointer_target(self) -> Optional[Path]:
        """The folder ``latest`` names (checked to be a plain name beside it), None without one."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        try:
            tag = pointer.read_text(errors="replace").strip()
        except OSError as exc:  # a directory, unreadable
            raise CheckpointError(f"{pointer} cannot be read ({exc.strerror or exc}); name a checkpoint "
                                  f"with checkpoint.resume=<dir> or delete it") from None
        if not tag:
            raise CheckpointError(
                f"{pointer} is empty; name a checkpoint with checkpoint.resume=<dir> or delete the file"
            )
        if "/" in tag or "\\" in tag or tag in (".", "..") or not tag.isprintable():
            raise CheckpointError(
                f"{pointer} holds {tag[:80]!r}, not the name of a checkpoint folder beside it; name a "
                f"checkpoint with checkpoint.resume=<dir> or delete the file"
            )
        return self.root / tag

    def resolve_resume(self, resume: str) -> Optional[Path]:
        """``none`` -> None; ``auto`` -> the latest complete checkpoint or None when the run has
        none yet; a path -> that checkpoint, verified. Never a silent fresh start for a path."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if path.is_dir() and (path / LATEST).is_file():  # a checkpoints root: follow its pointer
            return CheckpointManager(path, self.keep_last).latest()
        verify_checkpoint(path)
        return path


def verify_checkpoint(path: Path) -> dict:
    """Raise CheckpointError unless ``path`` is a complete checkpoint whose files match its record."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; check checkpoint.resume or the run_dir")
    meta_path = path / COMPLETE
    if not meta_path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {COMPLETE}: its save never finished); "
            f"resume from an earlier one"
        )
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        if not (isinstance(files, dict) and all(isinstance(v, int) for v in files.values())):
            raise ValueError(files)
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} has a corrupt {COMPLETE}; resume from an earlier one") from None
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; resume from an earlier one")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {path}: {name} has {f.stat().st_size} bytes, {size} were written; "
                f"the file is corrupt, resume from an earlier one"
            )
    return meta


def check_world_size(path: Path, world_size: int) -> None:
    """Refuse, before any work, a checkpoint whose ZeRO optimizer state is partitioned over another
    number of ranks: DeepSpeed would fail only after the whole engine is built, with a traceback."""
    meta = verify_checkpoint(path)
    saved = meta.get("world_size")
    partitioned = any("zero_pp_rank_" in name for name in meta.get("files", {}))
    if saved is not None and saved != world_size and partitioned:
        raise CheckpointError(
            f"checkpoint {path} holds ZeRO optimizer state partitioned over {saved} ranks but this job "
            f"has {world_size}; resume on {saved} ranks, or convert it with `python tools/convert.py "
            f"universal {path} {path}_universal` and resume with checkpoint.resume={path}_universal "
            f"checkpoint.universal=true"
        )


def unreadable_reason(exc: BaseException) -> Optional[str]:
    """A short reason when ``exc`` says a saved file cannot be read back (a damaged zip archive or
    pickle), else None. torch reports these as RuntimeErrors from its zip reader."""
    import pickle
    import zipfile

    text = str(exc).strip()
    damaged = isinstance(exc, (EOFError, pickle.UnpicklingError, zipfile.BadZipFile)) or (
        isinstance(exc, RuntimeError) and any(s in text for s in ("PytorchStreamReader", "zip archive")))
    if not damaged:
        return None
    return (text.splitlines() or [type(exc).__name__])[0].split(". ")[0][:200]


def read_client_state(path: Path) -> dict:
    """The client state a checkpoint was saved with (step, config...), read before anything is built:
    the model-states file is memory-mapped, so its tensors are not read."""
    from linformer_train import serialization

    files = sorted(path.glob("*mp_rank_00_model_states.pt"))
    if not files:
        return {}
    try:
        state = serialization.load(files[0], mmap=True)
    except serialization.UnsafeFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised
        reason = unreadable_reason(exc)
        if reason is None:
            raise
        raise CheckpointError(f"checkpoint {path}: {files[0].name} cannot be read ({reason}); the file is "
                              f"corrupt, resume from an earlier one") from None
    return state if isinstance(state, dict) else {}


def verify_contents(path: Path, rank: Optional[int]) -> None:
    """Check the CRC-32 that torch's zip format stores for every record of the files a rank will
    load (the shared model states, its own ZeRO shard and rank state; every file when ``rank`` is
    None): a damaged byte inside a tensor keeps the size right and would otherwise load silently.
    Costs one read of those files. Then refuse any file whose pickle names something other than
    tensors and plain data (all files, on every rank: reading a pickle record is cheap, and every
    rank must reach the same verdict before anyone loads)."""
    import zipfile

    from linformer_train.serialization import check_loadable

    own = f"zero_pp_rank_{rank}_"
    for f in sorted(path.rglob("*.pt")):
        if rank is not None and f.name.startswith("rank_state_") and f.name != f"rank_state_{rank:05d}.pt":
            continue
        if rank is not None and "zero_pp_rank_" in f.name and own not in f.name:
            continue
        try:
            with zipfile.ZipFile(f) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            bad = f"the archive itself ({exc})"
        if bad is not None:
            raise CheckpointError(f"checkpoint {path}: {f.relative_to(path)} is corrupt ({bad} fails its CRC "
                                  f"check); resume from an earlier one")
    for f in sorted(path.rglob("*.pt")):
        check_loadable(f)


def verify_universal(path: Path) -> None:
    """A universal checkpoint (``tools/convert.py universal``) has no size record of ours; refuse
    any of its files whose pickle holds more than tensors and plain data."""
    from linformer_train.serialization import check_loadable

    files = sorted(path.rglob("*.pt"))
    if not files:
        raise CheckpointError(f"{path} holds no checkpoint files; convert one with `tools/convert.py universal`")
    for f in files:
        check_loadable(f)


def last_good_checkpoint(root: Path) -> Optional[Path]:
    """The newest checkpoint under ``root`` whose every file (all ranks') is present, of the recorded
    size, passes its CRC and holds only tensors and plain data; None when none does. Reads them all:
    for messages after a failure, not for the start of a run."""
    from linformer_train.serialization import UnsafeFileError

    for candidate in reversed(CheckpointManager(root, keep_last=1).complete_checkpoints()):
        try:
            verify_checkpoint(candidate)
            verify_contents(candidate, rank=None)
        except (CheckpointError, UnsafeFileError):
            continue
        return candidate
    return None
