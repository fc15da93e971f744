"""A DeepSpeed checkpoint -> a universal checkpoint (to resume on another number of ranks), through
DeepSpeed's own ``ds_to_universal``, with its loads weights-only and its output kept apart.

``python -m deepspeed.checkpoint.ds_to_universal`` unpickles every file it reads with
``weights_only=False``; run from here, the same conversion reads them with torch's weights-only
unpickler (``serialization.forbid_code_in_loads``), after every file was vetted, and refuses an
output folder that overlaps the checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pickle
from pathlib import Path

from linformer_train import serialization
from linformer_train.convert import ConversionError


def to_universal(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, workers: int = 1) -> Path:
    """Convert the checkpoint a step, checkpoints or run folder names; returns ``out_dir``, which
    ``checkpoint.resume=<out_dir> checkpoint.universal=true`` resumes from."""
    from linformer_train.convert.export import resolve_checkpoint
    from linformer_train.convert.model_dir import check_output_dir

    out = Path(out_dir)
    check_output_dir(out, overwrite=False, inputs={"the checkpoint": checkpoint})
    path = resolve_checkpoint(checkpoint)
    check_output_dir(out, overwrite=False, inputs={"the checkpoint": path})
    serialization.vet_for_deepspeed(path)
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(path), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except pickle.UnpicklingError as exc:
        if serialization.is_refusal(exc):
            raise serialization.refusal(f"checkpoint {path}", exc) from None
        raise ConversionError(f"{path} cannot be read ({exc}); convert an earlier checkpoint") from None
    except (AssertionError, KeyError, ValueError, FileNotFoundError, RuntimeError) as exc:
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConversionError(f"DeepSpeed could not convert {path} to a universal checkpoint: {last}") from None
    return out
