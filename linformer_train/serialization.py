"""Reading saved files without running code from them: torch files weights-only, JSON records checked.

A ``.pt`` file is a pickle: loaded with ``weights_only=False`` it can call any Python function (a
checkpoint from a stranger, or one someone edited on a shared disk, runs their code as you). Every
load in this project, and every load DeepSpeed does on its behalf, uses torch's weights-only
unpickler, which builds tensors, numbers, strings and containers, and nothing else except the few
DeepSpeed record types listed in ``DEEPSPEED_SAFE_GLOBALS`` (plain data classes and enums).

- ``load(path)`` is our ``torch.load``: weights only, and a refused or damaged file is one line.
- ``check_loadable(path)`` reads only a file's pickle (not its tensors) and refuses one that names
  anything outside the allow-list, so a whole checkpoint can be vetted before any rank loads a byte.
- ``forbid_code_in_loads()`` makes it hold for code we do not control: it sets torch's own
  ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` (which overrides ``weights_only=False`` at every call site, in
  this process and the processes it starts: DeepSpeed's checkpoint engine, ``zero_to_fp32``,
  ``ds_to_universal``). Every entry point calls it first (``cli.run_main``), the Trainer again.
- ``allow_deepspeed_records()`` allow-lists DeepSpeed's record types; called wherever DeepSpeed is
  about to read its own files (it imports DeepSpeed, so not at start-up). ``vet_for_deepspeed(dir)``
  does both and checks every file of a checkpoint folder, before DeepSpeed reads it by itself.
- ``read_json_object(path, error, ...)`` reads what needs more than tensors (manifests, model and
  tokenizer records): a file that is not a JSON object is one line of the caller's error type.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"

# (module, name) of the non-tensor types DeepSpeed (0.15-0.19) pickles into checkpoints: a loss
# scaler's settings, a ZeRO stage enum and a parameter's (start, numel) in a flat buffer. None has
# a custom __setstate__ or __reduce__: unpickling one fills in plain attributes.
DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class UnsafeFileError(ValueError):
    """A torch file holds something other than tensors and plain data (a pickled callable: code)."""


def forbid_code_in_loads() -> None:
    """Force weights-only loading for this process and its children, DeepSpeed included. Cheap: it
    imports nothing (a config mistake is still reported before torch loads)."""
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # torch refuses both set at once


_allowed: list[Any] = []


def allow_deepspeed_records() -> None:
    """Let the weights-only unpickler build DeepSpeed's record types (and nothing else new)."""
    if _allowed:
        return
    import importlib

    import torch

    for module, name in DEEPSPEED_SAFE_GLOBALS:
        try:
            _allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed release: it pickles what it has
            continue
    torch.serialization.add_safe_globals(_allowed)


def allowed_names() -> set[str]:
    return {f"{m}.{n}" for m, n in DEEPSPEED_SAFE_GLOBALS}


def _refusal(path: Path, names: list[str]) -> UnsafeFileError:
    shown = ", ".join(sorted(names)[:3]) + (" ..." if len(names) > 3 else "")
    return UnsafeFileError(
        f"{path} holds pickled Python objects ({shown}) where only tensors and plain data belong; it "
        f"was refused unread because loading it could run code: use a file you made or trust")


def check_loadable(path: str | os.PathLike) -> None:
    """Refuse ``path`` unless its pickle names only allow-listed types. Reads the pickle record,
    not the tensors; a file that is not a torch zip archive is refused as damaged."""
    import torch

    path = Path(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UnsafeFileError(f"{path} is not a readable torch file ({reason}); it is damaged or was "
                              f"not written by torch.save") from None
    bad = [n for n in names if n not in allowed_names()]
    if bad:
        raise _refusal(path, bad)


def vet_for_deepspeed(folder: str | os.PathLike) -> None:
    """Before DeepSpeed reads a checkpoint folder itself (merging ZeRO shards, ds_to_universal): its
    loads weights-only, its record types allowed, and every ``*.pt`` file's pickle checked first."""
    forbid_code_in_loads()
    allow_deepspeed_records()
    for f in sorted(Path(folder).glob("*.pt")):
        check_loadable(f)


def is_refusal(exc: BaseException) -> bool:
    """True when ``exc`` is torch's weights-only unpickler refusing a global (or our own refusal)."""
    return isinstance(exc, UnsafeFileError) or (
        isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc))


def refused_global(exc: BaseException) -> str:
    """The global torch's weights-only unpickler refused, from its message ('?' when not found)."""
    for line in str(exc).splitlines():
        for marker in ("Unsupported global: GLOBAL ", "Trying to call reduce for ", "Unsupported operand "):
            if marker in line:
                return line.split(marker, 1)[1].split()[0].rstrip(".,")
    return "?"


def refusal(where: str | os.PathLike, exc: BaseException) -> UnsafeFileError:
    """Our one line for torch's weights-only refusal met inside someone else's load (DeepSpeed's)."""
    return UnsafeFileError(f"a file of {where} holds pickled Python objects ({refused_global(exc)}) where only "
                           f"tensors and plain data belong; it was refused because loading it could run "
                           f"code: use a checkpoint you made or trust")


def load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` with the weights-only unpickler; a file holding anything else is refused with
    one line (UnsafeFileError)."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if is_refusal(exc):
            raise _refusal(path, [refused_global(exc)]) from None
        raise


def read_json_object(path: str | os.PathLike, error: Callable[[str], Exception],
                     what: str = "valid JSON (an object)", fix: str = "") -> dict:
    """The JSON object in ``path``. A file that does not parse, or holds a list, a string or a
    number instead of an object, raises ``error("<path> is not <what>; <fix>")``: one line, in the
    error type of the layer that reads it (DataError, ConversionError ...)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError:  # UnicodeDecodeError included
        data = None
    if not isinstance(data, dict):
        raise error(f"{path} is not {what}" + (f"; {fix}" if fix else ""))
    return data
