"""Change a model's n (max_seq_len) and per-layer k after training.

Positions (n, D): longer n interpolates the learned table linearly along the position axis
(``positions="interpolate"``, the default) or tiles it (``"copy"``: position i takes row i mod n,
what Longformer did to stretch RoBERTa's 512 positions; local order stays sharp, the ends repeat).
Shorter n keeps the first n' rows, which are exactly the rows inputs of length <= n' used.

Linear projections E, F ((k, n), or (H, k, n) with sharing=none):

- columns (the sequence axis) are interpolated linearly from n to n' and rescaled by
  ``projection_scaling``. ``norm`` (default) rescales each row to its old L2 norm: a slot of E·K
  sums n' terms instead of n, and for tokens whose keys are uncorrelated its variance is
  var(K) x ||row||^2, so keeping each row's norm keeps E·K at its old magnitude exactly. For a
  smooth row that factor is about sqrt(n / n'); for a row still close to its N(0, 1/n) init it is
  larger, because interpolating between independent entries shrinks their spread (by ~sqrt(2/3)),
  and the result then has the per-entry std of a fresh N(0, 1/n') init. ``linear`` multiplies by
  n / n' (keeps E·K for a stretched input, each token repeated n'/n times: the Riemann-sum view);
  ``none`` leaves the interpolated values as they are.
- shrinking n keeps the first n' columns times sqrt(n / n') (for short_input_scaling=sqrt; n / n'
  for length, 1 for none): then every input of length <= n' gives exactly the outputs it gave
  before, since the model already read only those columns, rescaled by the same rule.
- rows (the k slots): the first min(k, k') rows are kept; new rows are drawn like a fresh init,
  N(0, 1/n'). Slots have no order, so nothing is interpolated across them. With layerwise sharing
  the one (k_max, n) matrix is resized the same way and layer l keeps reading its first k_l rows.

Window-initialised projections (``projection_init: window``, the default) are laid out along the
sequence: slot s belongs to the window [floor(s n/k), floor((s+1) n/k)), and a short input keeps the
slots it reaches. Their rows are resampled as a map over (slot, position), so every slot keeps its
place on the sequence:

- growing n stretches the map bilinearly to (k', n') and multiplies by n / n' (an averaging row
  stays averaging, the windows stretch with the positions); ``projection_scaling`` does not apply;
- shrinking n keeps the rows whose windows start below n', cut to n' columns, unscaled: with
  k' = k n' / n this is exact (every input of length <= n' gives the outputs it gave before);
  another k' resamples those rows bilinearly to k'. Without a new k, shrinking keeps the window size
  (k' = ceil(k n' / n)), so it is exact.

Mean pooling has no weights (n' must divide by each k'). A strided convolution (kernel = stride =
n / k) keeps its weights only when n' / k' equals n / k; anything else is refused.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from linformer_train.config import ModelConfig, k_schedule
from linformer_train.convert import ConversionError
from linformer_train.convert.model_dir import (architecture_of, build_model, check_output_dir,
                                               from_pretrained, load_model_info, model_config,
                                               save_pretrained, to_dict_model, tokenizer_file)

POSITION_METHODS = ("interpolate", "copy")
PROJECTION_SCALINGS = ("norm", "linear", "none")


def extend_positions(weight: torch.Tensor, n_new: int, method: str = "interpolate") -> torch.Tensor:
    """(n, D) position table -> (n_new, D) (see the module docstring)."""
    n, _ = weight.shape
    if n_new <= n:
        return weight[:n_new].clone()
    if method == "copy":
        reps = math.ceil(n_new / n)
        return weight.repeat(reps, 1)[:n_new].clone()
    if method == "interpolate":
        x = weight.t().unsqueeze(0).float()                             # (1, D, n)
        y = F.interpolate(x, size=n_new, mode="linear", align_corners=True)  # (1, D, n_new)
        return y.squeeze(0).t().contiguous().to(weight.dtype)           # (n_new, D)
    raise ConversionError(f"positions={method!r} is unknown; choose one of {', '.join(POSITION_METHODS)}")


def resample_windows(weight: torch.Tensor, k_new: int, n_new: int) -> torch.Tensor:
    """A window-laid-out E (.., k, n) -> (.., k', n') (see the module docstring)."""
    n, k = weight.shape[-1], weight.shape[-2]
    lead = weight.shape[:-2]
    w = weight.reshape(-1, 1, k, n).float()                             # (M, 1, k, n)
    if n_new >= n:
        out = F.interpolate(w, size=(k_new, n_new), mode="bilinear", align_corners=False) * (n / n_new)
    else:
        rows = -(-k * n_new // n)                                       # windows starting below n'
        out = w[..., :rows, :n_new]
        if rows != k_new:
            out = F.interpolate(out, size=(k_new, n_new), mode="bilinear", align_corners=False)
    return out.reshape(*lead, k_new, n_new).to(weight.dtype)


def resize_projection(weight: torch.Tensor, fresh: torch.Tensor, scaling: str,
                      short_input_scaling: str) -> torch.Tensor:
    """E (.., k, n) -> the shape of ``fresh`` (.., k', n'); rows beyond k come from ``fresh``."""
    n, n_new = weight.shape[-1], fresh.shape[-1]
    k, k_new = weight.shape[-2], fresh.shape[-2]
    if short_input_scaling == "window":
        return resample_windows(weight, k_new, n_new)
    if n_new >= n:
        x = weight.reshape(-1, 1, n).float()                            # (rows, 1, n)
        y = F.interpolate(x, size=n_new, mode="linear", align_corners=True) if n_new > n else x
        y = y.reshape(*weight.shape[:-1], n_new)                        # (.., k, n_new)
        if scaling == "norm":
            old_norm = weight.float().norm(dim=-1, keepdim=True)        # (.., k, 1)
            y = y * (old_norm / y.norm(dim=-1, keepdim=True).clamp(min=1e-12))
        elif scaling == "linear":
            y = y * (n / n_new)
    else:
        factor = {"sqrt": math.sqrt(n / n_new), "length": n / n_new, "none": 1.0}[short_input_scaling]
        y = weight[..., :n_new].float() * factor
    out = fresh.clone().float()
    keep = min(k, k_new)
    out[..., :keep, :] = y[..., :keep, :]
    return out.to(weight.dtype)


def _windowed(cfg: ModelConfig) -> bool:
    return cfg.attention == "linformer" and cfg.projection == "linear" and cfg.short_input_scaling == "window"


def _is_linear_projection(key: str) -> bool:
    return key.endswith(("proj_k.weight", "proj_v.weight")) or key == "encoder.shared_projection.weight"


def resize_model(model: nn.Module, max_seq_len: int, k: Any = None, positions: str = "interpolate",
                 projection_scaling: str = "norm", seed: int = 0) -> nn.Module:
    """A new model at n=max_seq_len (and k, if given) carrying ``model``'s weights over."""
    if positions not in POSITION_METHODS:
        raise ConversionError(f"positions={positions!r} is unknown; choose one of {', '.join(POSITION_METHODS)}")
    if projection_scaling not in PROJECTION_SCALINGS:
        raise ConversionError(f"projection scaling {projection_scaling!r} is unknown; choose one of "
                              f"{', '.join(PROJECTION_SCALINGS)}")
    old_cfg: ModelConfig = model.cfg
    raw = to_dict_model(old_cfg)
    raw["max_seq_len"] = max_seq_len
    if k is None and max_seq_len < old_cfg.max_seq_len and _windowed(old_cfg):
        # keep each window's size, so that the first k' windows are the ones a short input reached
        ks = [-(-kl * max_seq_len // old_cfg.max_seq_len) for kl in k_schedule(old_cfg)]
        k = ks[0] if len(set(ks)) == 1 else ks
    if k is not None:
        raw["k"] = k
    new_cfg = model_config(raw, "resize")
    if old_cfg.projection == "conv" and old_cfg.attention == "linformer":
        old_w = [old_cfg.max_seq_len // kk for kk in k_schedule(old_cfg)]
        new_w = [new_cfg.max_seq_len // kk for kk in k_schedule(new_cfg)]
        if old_w != new_w:
            raise ConversionError(
                f"projection=conv has kernel = stride = n / k = {old_w}; the new n and k give {new_w}. "
                f"Keep n / k per layer (e.g. k={[max_seq_len // w for w in old_w]}) or the learned "
                f"kernels cannot carry over")
    torch.manual_seed(seed)  # the fresh rows of a larger k
    new = build_model(new_cfg, architecture_of(model))
    old_state = model.state_dict()
    fresh = new.state_dict()
    if set(old_state) != set(fresh):
        diff = sorted(set(old_state) ^ set(fresh))
        raise ConversionError(f"resize changed the model's key set ({diff[:3]}); this is a bug")
    state = {}
    for key, target in fresh.items():
        w = old_state[key]
        if key == "encoder.positions.weight":
            state[key] = extend_positions(w, max_seq_len, positions)
        elif _is_linear_projection(key) and (w.shape != target.shape or max_seq_len != old_cfg.max_seq_len):
            state[key] = resize_projection(w, target, projection_scaling, old_cfg.short_input_scaling)
        else:
            if w.shape != target.shape:
                raise ConversionError(f"resize: {key} changes shape {tuple(w.shape)} -> "
                                      f"{tuple(target.shape)}, which resize does not handle")
            state[key] = w
    new.load_state_dict(state, strict=True)
    return new.train(model.training)


def resize_model_dir(src: str | os.PathLike, out_dir: str | os.PathLike, max_seq_len: int,
                     k: Any = None, positions: str = "interpolate", projection_scaling: str = "norm",
                     dtype: Optional[str] = None, overwrite: bool = False, seed: int = 0):
    check_output_dir(out_dir, overwrite, {"the source model": src})
    info = load_model_info(src)
    model = from_pretrained(src)
    old = model.cfg
    new = resize_model(model, max_seq_len, k, positions, projection_scaling, seed)
    source = {"kind": "resize", "from": str(os.path.abspath(src)), "from_max_seq_len": old.max_seq_len,
              "from_k": old.k, "positions": positions, "projection_scaling": projection_scaling,
              "previous": info.get("source")}
    return save_pretrained(new, out_dir, tokenizer=tokenizer_file(src), dtype=dtype or info["dtype"],
                           labels=info.get("labels"), task=info.get("task"), source=source,
                           overwrite=overwrite)
