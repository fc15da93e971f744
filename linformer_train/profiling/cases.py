"""What one profiled case is: its configuration, the sweep of cases, validation, and its FLOPs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from linformer_train.config import ConfigError, ModelConfig, config_from_dict, k_schedule, load_config
from linformer_train.model.flops import encoder_flops, mlm_head_flops
from linformer_train.train.mfu import DTYPES, mlm_step_flops

MODES = ("forward", "backward", "train")
"""forward: eval + no_grad (inference) | backward: forward + backward, grads zeroed |
train: forward + backward + AdamW step (what one training step costs)."""
TARGETS = ("encoder", "mlm", "layer")
"""encoder: LinformerEncoder, backward from a fixed output gradient | mlm: LinformerForMLM on its
loss | layer: one self-attention layer (B, L, D) -> (B, L, D)."""
IMPLS = ("project", "pypi")
"""project: this repo's model | pypi: lucidrains' ``linformer`` package (layer target only)."""
BASELINES = {"naive": "naive", "sdpa": "full"}
"""Ratio suffix -> attention kind of the baseline."""

MIB = 2**20
GIB = 2**30


@dataclass
class Case:
    """One configuration to measure. ``model`` holds ModelConfig fields (max_seq_len is n)."""

    model: dict
    seq_len: int
    batch_size: int = 1
    mode: str = "backward"
    target: str = "encoder"
    impl: str = "project"
    dtype: str = "fp32"
    device: str = "cpu"
    warmup: int = 1
    repeats: int = 3
    mask_prob: float = 0.15
    budget_bytes: Optional[int] = None
    """Peak total memory allowed (CPU: process RSS; CUDA: allocated); None = no check."""
    threads: Optional[int] = None
    """CPU threads for torch (None: torch's default, one per core)."""
    clock: str = "wall"
    """wall (what a user waits; synchronised with the device) | cpu (the process's CPU time: on a
    shared CPU with threads=1 it is robust to other jobs taking cores, where wall time is not)."""
    malloc: str = "tensor"
    """CPU workers: tensor (a fixed glibc mmap threshold, so RSS follows live tensors; each large
    block is mapped afresh, which can add page-fault time) | default (glibc as users run it: the
    timing users see, RSS that depends on allocation history)."""

    def model_config(self) -> ModelConfig:
        return config_from_dict({"model": dict(self.model)}).model

    @property
    def label(self) -> str:
        return case_label(self.model, self.impl)


def case_label(model: dict, impl: str = "project") -> str:
    """Short, unique-per-variant name: 'linformer k=128', 'full (sdpa)', 'naive', 'pypi k=128 kv'."""
    kind = model.get("attention", "linformer")
    if kind == "full":
        return "full (sdpa)"
    if kind == "naive":
        return "naive"
    name = "pypi linformer" if impl == "pypi" else "linformer"
    label = f"{name} k={format_k(model.get('k', 128))}"
    if model.get("projection", "linear") != "linear":
        label += f" {model['projection']}"
    if model.get("sharing", "headwise") != "headwise":
        label += f" {model['sharing']}"
    return label


def format_k(k: Any) -> str:
    if isinstance(k, dict):
        return f"{k.get('first')}->{k.get('last')}"
    if isinstance(k, (list, tuple)):
        return f"{k[0]}..{k[-1]}" if len(set(k)) > 1 else str(k[0])
    return str(k)


def parse_k(text: str) -> Any:
    """A CLI k: '128', '[256, 256, 128, 128]' or '{first: 256, last: 64, multiple_of: 16}'."""
    import yaml

    text = str(text).strip()
    if text.isdigit():
        return int(text)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if isinstance(value, (int, list, dict)) and not isinstance(value, bool):
        return value
    raise ConfigError(
        f"--k {text!r} is not an int, a list [a, b, ...] or a rule {{first: A, last: B}}"
    )


def model_section(preset: Optional[str], config_files: Sequence[str] = (),
                  overrides: Sequence[str] = ()) -> dict:
    """The model section (as a dict) of a preset and/or config files plus dotlist overrides."""
    extra = [f"model.preset={preset}"] if preset else []
    cfg = load_config(list(config_files), [*extra, *overrides])
    return dataclasses.asdict(cfg.model)


def build_cases(base_model: dict, *, seq_lens: Sequence[int], attentions: Sequence[str],
                ks: Sequence[Any] = (128,), projections: Sequence[str] = ("linear",),
                sharings: Sequence[str] = ("headwise",), batch_sizes: Sequence[int] = (1,),
                modes: Sequence[str] = ("backward",), target: str = "auto",
                impls: Sequence[str] = ("project",), num_layers: Optional[int] = None,
                **common) -> list[Case]:
    """The cartesian sweep, validated up front: the first impossible case raises ConfigError.

    k, projection and sharing vary only the Linformer cases; each baseline appears once per
    (n, batch, mode). ``target='auto'`` is mlm for train and encoder otherwise.
    """
    for name, values, allowed in (("mode", modes, MODES), ("impl", impls, IMPLS),
                                  ("target", [target], (*TARGETS, "auto"))):
        for v in values:
            if v not in allowed:
                raise ConfigError(f"--{name} {v!r} is not allowed; choose one of {', '.join(allowed)}")
    variants: list[tuple[dict, str]] = []
    for att in attentions:
        if att != "linformer":  # baselines: always the project's own modules
            variants.append(({"attention": att}, "project"))
            continue
        for impl in impls:
            for k in ks:
                for proj in projections:
                    for sharing in sharings:
                        variants.append(({"attention": att, "k": k, "projection": proj,
                                          "sharing": sharing}, impl))
    cases = []
    for mode in modes:
        tgt = target if target != "auto" else ("mlm" if mode == "train" else "encoder")
        for n in seq_lens:
            for b in batch_sizes:
                for change, impl in variants:
                    model = {**base_model, **change, "max_seq_len": int(n)}
                    if num_layers is not None:
                        model["num_layers"] = int(num_layers)
                    model["preset"] = None
                    case = Case(model=model, seq_len=int(n), batch_size=int(b), mode=mode,
                                target=tgt, impl=impl, **common)
                    check_case(case)
                    cases.append(case)
    return cases


def check_case(case: Case) -> ModelConfig:
    """Validate a case; ConfigError (one line) for what cannot run at all."""
    if case.mode not in MODES:
        raise ConfigError(f"mode {case.mode!r} is not allowed; choose one of {', '.join(MODES)}")
    if case.target not in TARGETS:
        raise ConfigError(f"target {case.target!r} is not allowed; choose one of {', '.join(TARGETS)}")
    if case.dtype not in DTYPES:
        raise ConfigError(f"dtype {case.dtype!r} is not allowed; choose one of {', '.join(DTYPES)}")
    if case.batch_size < 1 or case.seq_len < 1:
        raise ConfigError(f"batch size {case.batch_size} and n {case.seq_len} must be positive")
    if case.clock not in ("wall", "cpu") or (case.clock == "cpu" and case.device != "cpu"):
        raise ConfigError(f"clock {case.clock!r}: use wall, or cpu with --device cpu")
    if case.malloc not in ("tensor", "default"):
        raise ConfigError(f"malloc {case.malloc!r}: use tensor or default")
    if case.threads is not None and case.threads < 1:
        raise ConfigError(f"threads={case.threads} must be at least 1")
    if case.warmup < 0 or case.repeats < 1:
        raise ConfigError(f"warmup={case.warmup} must be >= 0 and repeats={case.repeats} >= 1")
    if case.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {case.device!r} asked for but torch sees no CUDA device")
    cfg = case.model_config()  # k > n, unknown choices, dims: ConfigError from validate()
    if case.impl == "pypi":
        if case.target != "layer":
            raise ConfigError("--impl pypi compares one attention layer; use --target layer")
        if cfg.attention != "linformer" or cfg.projection != "linear" or cfg.sharing not in ("headwise", "kv"):
            raise ConfigError(
                f"the linformer package has linear projections with headwise or kv sharing only "
                f"(got projection={cfg.projection}, sharing={cfg.sharing})")
        if len(set(k_schedule(cfg))) != 1:
            raise ConfigError("the linformer package takes one k for all layers")
    return cfg


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


def predicted_per_sequence(case: Case) -> int:
    """Masked positions per sequence of an MLM training case (the labels build_step makes)."""
    return max(1, round(case.mask_prob * case.seq_len))


def attention_layer_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of one self-attention layer (qkv, projections, attention, out) of layer 0."""
    k0 = k_schedule(cfg)[0]
    one = dataclasses.replace(cfg, num_layers=1, ffn_size=0, k=k0)
    return encoder_flops(one, seq_len)


def case_flops(case: Case, cfg: Optional[ModelConfig] = None) -> float:
    """Analytic matmul FLOPs of one step of the case (model/flops.py; backward = 2 forwards; the MLM
    head at the positions the case predicts, as the trainer's MFU counts them)."""
    cfg = cfg or case.model_config()
    n, b = case.seq_len, case.batch_size
    grad = case.mode != "forward"
    if case.target == "mlm":
        if grad:
            return mlm_step_flops(cfg, n, b, b * predicted_per_sequence(case))
        return b * (encoder_flops(cfg, n) + mlm_head_flops(cfg, n))  # logits at every position
    per_seq = encoder_flops(cfg, n) if case.target == "encoder" else attention_layer_flops(cfg, n)
    return b * per_seq * (3 if grad else 1)
