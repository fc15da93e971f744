"""Export a DeepSpeed checkpoint (ZeRO stage 0-3, fp32/bf16/fp16, any number of ranks) to a model
directory holding the fp32 master weights.

Where the fp32 weights are:

- ZeRO 1/2/3: in the optimizer partitions of every rank; DeepSpeed's own
  ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` merges them (and refuses a checkpoint
  with a rank's file missing).
- ZeRO 0, fp32: the module states file (``mp_rank_00_model_states.pt``) holds them.
- ZeRO 0, bf16/fp16: the module states are 16-bit; the fp32 masters are the optimizer's
  ``fp32_groups``, one list per parameter group in the trainer's grouping
  (``train.trainer.param_groups``). Each master cast to 16 bits must equal the module's weight, which
  proves the mapping; otherwise the export stops rather than guess.

The checkpoint must be complete (``complete.json``, written last by the trainer's atomic save) and its
client state must carry the resolved config, from which the model is rebuilt: the exported keys are
then checked strictly against it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Optional

import torch

from linformer_train.config import Config, ConfigError, config_from_dict, upgrade_saved
from linformer_train.convert import ConversionError
from linformer_train.convert.model_dir import (build_model, check_output_dir, check_state_dict,
                                               expected_shapes, save_pretrained)

LATEST = "latest"
COMPLETE = "complete.json"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step directory, a checkpoints root (follows ``latest``) or a run directory -> the step
    directory, checked complete. A pointer is followed only to a folder beside it."""
    from linformer_train.train.checkpoint import CheckpointError, CheckpointManager, verify_checkpoint

    path = Path(path)
    if not path.exists():
        raise ConversionError(f"checkpoint {path} does not exist")
    if path.is_dir() and not (path / COMPLETE).exists():
        for root in (path, path / "checkpoints"):
            if (root / LATEST).is_file():
                try:
                    found = CheckpointManager(root, keep_last=1).latest()
                except CheckpointError as exc:
                    raise ConversionError(str(exc)) from None
                if found is not None:
                    path = found
                break
    if not path.is_dir():
        raise ConversionError(f"checkpoint {path} is not a directory; name a step_XXXXXXXX directory")
    has_ds_files = any(path.glob("*model_states.pt"))
    if not (path / COMPLETE).is_file():
        if has_ds_files:
            raise ConversionError(
                f"checkpoint {path} is incomplete (no {COMPLETE}: its save never finished); export an "
                f"earlier checkpoint")
        from linformer_train.convert.model_dir import _hint_for_foreign

        raise ConversionError(f"{path} is not a linformer-train checkpoint (no {COMPLETE}, no DeepSpeed "
                              f"model states); {_hint_for_foreign(path)}")
    verify_checkpoint(path)  # CheckpointError when a file is missing or has the wrong size
    return path


def _quiet():
    """DeepSpeed's zero_to_fp32 prints progress to stdout and tqdm bars to stderr."""
    stack = contextlib.ExitStack()
    buf = io.StringIO()
    stack.enter_context(contextlib.redirect_stdout(buf))
    stack.enter_context(contextlib.redirect_stderr(buf))
    return stack, buf


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_checkpoint(ckpt: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(fp32 state dict, client state without the module, step directory) of a checkpoint."""
    from linformer_train import serialization

    path = resolve_checkpoint(ckpt)
    serialization.vet_for_deepspeed(path)  # every file DeepSpeed's merge may read, before it does
    states = sorted(path.glob("*model_states.pt"))
    # stage 0-2: mp_rank_00_model_states.pt; stage 3: zero_pp_rank_R_mp_rank_00_model_states.pt
    main = path / "mp_rank_00_model_states.pt"
    main = main if main.is_file() else states[0]
    try:
        client = serialization.load(main)
    except serialization.UnsafeFileError:
        raise
    except Exception as exc:  # a damaged pickle: name the file
        raise ConversionError(f"{main} cannot be read ({_first_line(exc)}); export an earlier checkpoint") from None
    ds_config = client.get("ds_config") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        stack, buf = _quiet()
        try:
            with stack:
                state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        except pickle.UnpicklingError as exc:
            if serialization.is_refusal(exc):  # DeepSpeed's own torch.load, weights-only too
                raise serialization.refusal(f"checkpoint {path}", exc) from None
            raise ConversionError(f"{path} cannot be read ({_first_line(exc)}); export an earlier checkpoint") from None
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
            raise ConversionError(f"DeepSpeed could not merge the ZeRO-{stage} partitions of {path}: "
                                  f"{_first_line(exc)}") from None
        state = dict(state)
    else:
        state = _stage0_fp32(client, path)
    client = {k: v for k, v in client.items() if k not in ("module", "optimizer")}
    if isinstance(client.get("config"), dict):  # saved by an earlier version: moved keys moved
        client["config"] = upgrade_saved(client["config"])
    client["zero_stage"] = stage
    return state, client, path


def _stage0_fp32(client: dict, path: Path) -> dict[str, torch.Tensor]:
    module = client.get("module")
    if not isinstance(module, dict):
        raise ConversionError(f"{path} has no module weights in its model states file; it was not "
                              f"written by DeepSpeed's save_checkpoint")
    if all(t.dtype == torch.float32 for t in module.values()):
        return dict(module)
    # 16-bit module: recover the fp32 masters of DeepSpeed's FP16/BF16 optimizer
    optim = client.get("optimizer") or {}
    groups = optim.get("fp32_groups")
    cfg = _config_of(client, path)
    if groups is None:
        raise ConversionError(f"{path} holds {next(iter(module.values())).dtype} weights without fp32 "
                              f"masters; export with --dtype bf16 is not possible from this file either")
    from linformer_train.train.trainer import param_groups

    model = build_model(cfg.model, client.get("architecture", "mlm"))
    names = {id(p): n for n, p in model.named_parameters()}
    order = [[names[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]
    fix = "export with a matching version of linformer-train"
    if [len(g) for g in order] != [len(g) for g in groups]:
        raise ConversionError(f"{path}: the optimizer's fp32 groups ({[len(g) for g in groups]} tensors) "
                              f"do not follow the trainer's parameter groups ({[len(g) for g in order]}); {fix}")
    state = dict(module)  # buffers, if any, come from the module
    for names_g, tensors_g in zip(order, groups):
        for name, master in zip(names_g, tensors_g):
            low = module.get(name)
            if low is None or tuple(low.shape) != tuple(master.shape) or \
                    not torch.equal(master.to(low.dtype), low):
                raise ConversionError(f"{path}: the fp32 master of {name} does not match its "
                                      f"{low.dtype if low is not None else 'missing'} weight; {fix}")
            state[name] = master.float()
    return state


def _config_of(client: dict, path: Path) -> Config:
    raw = client.get("config")
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} carries no linformer-train config in its client state; it was "
                              f"not saved by linformer-train's trainer")
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConversionError(f"{path}: its saved config is not valid here ({exc})") from None


def find_tokenizer(cfg: Config, step_dir: Path) -> Path:
    """The run's tokenizer: data.tokenizer, else the prepared data's manifest (under the run
    directory the checkpoint sits in, or the config's run_dir)."""
    from linformer_train.data.prepare import prepared_dir_for
    from linformer_train.data.tokenizer import model_path

    if cfg.data.tokenizer:
        p = model_path(cfg.data.tokenizer)
        if p.is_file():
            return p
    tried = []
    for run_dir in (step_dir.parent.parent, Path(cfg.train.run_dir)):
        root = prepared_dir_for(cfg.data, run_dir)
        manifest = root / "manifest.json"
        tried.append(str(root))
        if manifest.is_file():
            try:
                tok = Path(json.loads(manifest.read_text())["tokenizer"]["path"])
            except (ValueError, KeyError, TypeError):
                continue
            tok = tok if tok.is_absolute() else root / tok
            if tok.is_file():
                return tok
    raise ConversionError(f"cannot find the run's tokenizer (data.tokenizer unset; no prepared data "
                          f"manifest in {' or '.join(dict.fromkeys(tried))}); pass --tokenizer")


def export_checkpoint(ckpt: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "fp32",
                      tokenizer: Optional[str | os.PathLike] = None, overwrite: bool = False) -> Path:
    """DeepSpeed checkpoint -> model directory (see the module docstring)."""
    from linformer_train.paths import check_output_apart

    check_output_dir(out_dir, overwrite, {"the checkpoint": ckpt, "the tokenizer": tokenizer})
    state, client, path = read_checkpoint(ckpt)
    check_output_apart(out_dir, {"the checkpoint": path}, "output directory")
    cfg = _config_of(client, path)
    architecture = client.get("architecture", "mlm")
    model = build_model(cfg.model, architecture)
    check_state_dict(expected_shapes(model), state, f"checkpoint {path}",
                     "the checkpoint was written by another model; export it with the code that wrote it")
    model.load_state_dict(state, strict=True)
    tok = Path(tokenizer) if tokenizer is not None else find_tokenizer(cfg, path)
    check_output_apart(out_dir, {"the tokenizer": tok}, "output directory")
    source = {"kind": "deepspeed-checkpoint", "checkpoint": str(path.resolve()),
              "step": client.get("step"), "zero_stage": client["zero_stage"],
              "precision": cfg.precision.dtype, "consumed_tokens": client.get("consumed_tokens")}
    return save_pretrained(model, out_dir, tokenizer=tok, dtype=dtype, source=source,
                           labels=client.get("labels"), overwrite=overwrite)


__all__ = ["export_checkpoint", "read_checkpoint", "resolve_checkpoint", "find_tokenizer"]
