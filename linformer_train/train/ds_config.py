"""build_ds_config(cfg): the only place DeepSpeed's JSON is made, derived from the run's config."""

from __future__ import annotations

import copy

from linformer_train.config import Config, ConfigError, check_batch_arithmetic


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed config for ``world_size`` data-parallel ranks.

    Batch: DeepSpeed checks train_batch_size = micro x accumulation x ranks itself; we check it
    first (with our keys' names in the message). The optimizer is built by the trainer (param
    groups without weight decay on biases and norms) and its LR is set on every step from
    ``lr_at(step)``, a pure function of the step, so neither is here. ``precision.deepspeed`` passes
    other keys through; one that collides with a derived key is an error, so the YAML stays the
    single source of truth for batch, precision and ZeRO.
    """
    t, p, z, o = cfg.train, cfg.precision, cfg.zero, cfg.optim
    global_batch = check_batch_arithmetic(t, world_size)
    ds: dict = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": o.grad_clip,
        "steps_per_print": 2**31 - 1,  # we log; silence DeepSpeed's own step prints
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": z.stage},
        # universal_checkpoint_info lets ds_to_universal convert any stage (see checkpoint.py)
        "checkpoint": {"load_universal": cfg.checkpoint.universal},
    }
    if p.dtype == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif p.dtype == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": p.initial_scale_power,
            "loss_scale_window": p.loss_scale_window,
            "hysteresis": p.hysteresis,
            "min_loss_scale": p.min_loss_scale,
        }
    zero = ds["zero_optimization"]
    if z.stage >= 2:
        zero.update({"overlap_comm": True, "contiguous_gradients": True})
    if z.stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False})
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    if p.deepspeed:
        derived = _flatten(ds)
        for key in _flatten(copy.deepcopy(p.deepspeed)):
            clash = [d for d in derived if d == key or d.startswith(key + ".") or key.startswith(d + ".")]
            if clash:
                raise ConfigError(
                    f"precision.deepspeed.{key} collides with {clash[0]!r}, which is derived from "
                    f"the config; set it through its own key instead"
                )
        ds = _deep_merge(ds, p.deepspeed)
    return ds


def _deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
