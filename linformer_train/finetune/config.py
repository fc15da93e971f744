"""Typed fine-tuning configuration: YAML files merged over the schema below, then key=value overrides.

Same contract as the pretraining config (``linformer_train.config``): unknown keys and wrong types
fail at load with one line; every cross-field rule lives in :func:`validate`. The ``precision``,
``zero`` and ``logging`` sections are the pretraining ones, so ZeRO, bf16 and offload work the same way,
through the same ``build_ds_config``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from linformer_train.config import (Config, ConfigError, LoggingConfig, OptimConfig, PrecisionConfig,
                                    TrainConfig, ZeroConfig, _one_line, _parse_overrides, _read_yaml,
                                    check_finite, check_moved_keys, check_raw_types, validate_precision,
                                    validate_zero)


@dataclass
class FinetuneModelConfig:
    """Which model to start from and how inputs are cut."""

    pretrained: str = ""
    """A model directory (tools/convert.py export / resize / warm-start), MLM or classifier; or
    none: every weight from a random init (the baseline a pretrained model must beat), with the
    encoder's shape in model.random_init and its tokenizer in model.tokenizer."""
    random_init: dict = field(default_factory=dict)
    """With pretrained=none: the encoder's model section, as in a pretraining YAML (preset or
    sizes, max_seq_len, attention, k, sharing, ...); vocab_size and pad_token_id default to the
    tokenizer's."""
    tokenizer: Optional[str] = None
    """With pretrained=none: the tokenizer (a tokenizer.model or a Hugging Face tokenizer.json, or
    the directory holding it, such as a model directory)."""
    max_length: Optional[int] = None
    """Tokens per input, specials included; defaults to the model's n (max_seq_len)."""
    long_inputs: str = "truncate"
    """A text longer than max_length: truncate (keep its head) | windows (overlapping windows of
    max_length tokens, each a training row with the text's label; evaluation and predict average
    each text's window logits). Single-text tasks only: pairs are always cut longest-first."""
    window_stride: Optional[int] = None
    """With windows: content tokens between window starts (default: half a window, max_length - 2)."""
    padding: str = "longest"
    """longest (pad each batch to its longest input) | max_length (always pad to max_length).
    Outputs do not depend on it: padded keys and values are zeroed and the projections scale by
    the real length, so longest is just faster."""
    dropout: Optional[float] = None
    """Override the model's dropout for fine-tuning (None keeps the pretrained value)."""
    attention_dropout: Optional[float] = None
    activation_checkpointing: bool = False


@dataclass
class TaskConfig:
    """What to classify: a preset (a datasets hub task) or local files."""

    preset: Optional[str] = None
    """sst2 | imdb | qnli | qqp: fills hf_name, splits and columns unless set here."""
    train_file: Optional[str] = None
    """Local CSV, TSV (GLUE layout: header row, tab-separated, no quoting) or JSONL."""
    eval_file: Optional[str] = None
    format: str = "auto"
    """auto (by suffix: .csv .tsv .jsonl/.json) | csv | tsv | jsonl."""
    text_column: Optional[str] = None
    """Column of the (first) text; preset's or 'text' by default."""
    pair_column: Optional[str] = None
    """Column of the second text for sentence-pair tasks; None for single-sentence tasks."""
    label_column: Optional[str] = None
    """Column of the label; preset's or 'label' by default."""
    labels: Optional[list] = None
    """Label names in output order; default: the training labels, sorted (numerically if all are numbers)."""
    hf_name: Optional[str] = None
    """A datasets hub name (nyu-mll/glue) or a local dataset directory, used when no train_file is set."""
    hf_config: Optional[str] = None
    train_split: Optional[str] = None
    """Hub split to train on (preset's, else train)."""
    eval_split: Optional[str] = None
    """Hub split to evaluate on (preset's, else validation; IMDB: test)."""
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    metric: str = "accuracy"
    """accuracy | f1 | mcc: the evaluation metric that picks the best checkpoint."""
    skip_bad_rows: bool = False
    """TSV/CSV rows with the wrong number of fields: skip and count them (True) or stop (False)."""


@dataclass
class FinetuneOptimConfig:
    """AdamW and the schedule: linear warmup over warmup_ratio of the steps, then decay."""

    lr: float = 2e-5
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.1
    warmup_ratio: float = 0.06
    decay: str = "linear"
    """linear | cosine | constant (after warmup)."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class FinetuneTrainConfig:
    """Epochs, batch arithmetic, seeds and where results go."""

    epochs: int = 3
    micro_batch_size: int = 32
    """Examples per rank per forward."""
    grad_accum_steps: int = 1
    eval_batch_size: Optional[int] = None
    """Defaults to micro_batch_size."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (the schedule spans min(max_steps, epochs x steps/epoch))."""
    eval_every: int = 0
    """Also evaluate every this many steps (0: at the end of each epoch only)."""
    seeds: list = field(default_factory=lambda: [1234])
    """One run per seed (in output_dir/seed_<s>); results.json reports each and their mean and std."""
    output_dir: str = "runs/finetune"


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "model.padding": ("longest", "max_length"),
    "model.long_inputs": ("truncate", "windows"),
    "task.format": ("auto", "csv", "tsv", "jsonl"),
    "task.metric": ("accuracy", "f1", "mcc"),
    "optim.decay": ("linear", "cosine", "constant"),
    "precision.dtype": ("fp32", "bf16", "fp16"),
    "zero.stage": (0, 1, 2, 3),
}


def load_finetune_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Merge schema <- YAML files (in order, ``base:`` chains resolved) <- overrides; validate."""
    user = OmegaConf.create({})
    for f in files:
        user = OmegaConf.merge(user, _read_yaml(Path(f)))
    user = OmegaConf.merge(user, _parse_overrides(overrides))
    return finetune_config_from_dict(OmegaConf.to_container(user, resolve=False))


def finetune_config_from_dict(raw: dict) -> FinetuneConfig:
    check_moved_keys(raw or {})
    check_raw_types(FinetuneConfig, raw or {})
    try:
        merged = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), OmegaConf.create(raw or {}))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config: {_one_line(exc)}") from None
    for section in dataclasses.fields(cfg):
        sec = getattr(cfg, section.name)
        for f in dataclasses.fields(sec):
            v = getattr(sec, f.name)
            if OmegaConf.is_config(v):
                setattr(sec, f.name, OmegaConf.to_container(v, resolve=True))
    validate(cfg)
    return cfg


def to_dict(cfg: FinetuneConfig) -> dict:
    return dataclasses.asdict(cfg)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: FinetuneConfig) -> None:
    """Raise ConfigError (one line) on the first broken rule."""
    from linformer_train.finetune.tasks import PRESETS

    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in allowed, f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
    check_finite(cfg)
    m, t, o, tr = cfg.model, cfg.task, cfg.optim, cfg.train
    _check(bool(m.pretrained), "model.pretrained is empty; name a model directory (tools/convert.py export), "
                               "or none for a random init")
    if m.pretrained == RANDOM_INIT:
        _check(bool(m.tokenizer), "model.pretrained=none needs model.tokenizer (a tokenizer.model or its "
                                  "directory) to encode the texts")
        random_init_config(m)
    else:
        _check(not m.random_init, f"model.random_init applies only with model.pretrained=none; the model "
                                  f"at {m.pretrained} has its own shape (drop model.random_init)")
        _check(m.tokenizer is None, f"model.tokenizer applies only with model.pretrained=none; the model "
                                    f"at {m.pretrained} carries its own tokenizer (drop model.tokenizer)")
    if m.max_length is not None:
        _check(m.max_length >= 8, f"model.max_length={m.max_length} must be at least 8")
    if m.window_stride is not None:
        _check(m.long_inputs == "windows", f"model.window_stride={m.window_stride} applies only with "
                                           f"model.long_inputs=windows")
        _check(m.window_stride >= 1 and (m.max_length is None or m.window_stride <= m.max_length - 2),
               f"model.window_stride={m.window_stride} must lie in [1, max_length - 2] (a larger stride "
               f"would skip tokens)")
    for name in ("dropout", "attention_dropout"):
        v = getattr(m, name)
        _check(v is None or 0.0 <= v < 1.0, f"model.{name}={v} must lie in [0, 1)")
    if t.preset is not None:
        _check(t.preset in PRESETS, f"task.preset={t.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    has_files = t.train_file is not None or t.eval_file is not None
    if has_files:
        _check(t.train_file is not None and t.eval_file is not None,
               "task.train_file and task.eval_file go together; set both")
    else:
        _check(t.preset is not None or t.hf_name is not None,
               "no data: set task.preset (sst2, imdb, qnli, qqp), task.hf_name, or task.train_file and task.eval_file")
    if t.labels is not None:
        _check(len(t.labels) >= 2 and len(set(map(str, t.labels))) == len(t.labels),
               f"task.labels={t.labels} must list at least two distinct labels")
    for name in ("max_train_examples", "max_eval_examples"):
        v = getattr(t, name)
        _check(v is None or v > 0, f"task.{name}={v} must be positive (or unset)")
    _check(o.lr > 0, f"optim.lr={o.lr} must be positive")
    _check(len(o.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                      for b in o.betas), f"optim.betas={o.betas} must be two values in [0, 1)")
    _check(o.eps > 0, f"optim.eps={o.eps} must be positive")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _check(0.0 <= o.warmup_ratio < 1.0, f"optim.warmup_ratio={o.warmup_ratio} must lie in [0, 1)")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1]")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables)")
    _check(tr.epochs > 0, f"train.epochs={tr.epochs} must be positive")
    _check(tr.micro_batch_size > 0, f"train.micro_batch_size={tr.micro_batch_size} must be positive")
    _check(tr.grad_accum_steps > 0, f"train.grad_accum_steps={tr.grad_accum_steps} must be positive")
    _check(tr.eval_batch_size is None or tr.eval_batch_size > 0,
           f"train.eval_batch_size={tr.eval_batch_size} must be positive (or unset)")
    _check(tr.max_steps is None or tr.max_steps > 0, f"train.max_steps={tr.max_steps} must be positive (or unset)")
    _check(tr.eval_every >= 0, f"train.eval_every={tr.eval_every} must be >= 0")
    _check(bool(tr.seeds) and all(isinstance(s, int) and not isinstance(s, bool) for s in tr.seeds)
           and len(set(tr.seeds)) == len(tr.seeds),
           f"train.seeds={tr.seeds} must be a non-empty list of distinct ints")
    _check(bool(tr.output_dir), "train.output_dir is empty; name a directory for results")
    validate_precision(cfg.precision)
    validate_zero(cfg.zero)
    _check(cfg.logging.log_every > 0, f"logging.log_every={cfg.logging.log_every} must be positive")


RANDOM_INIT = "none"


def random_init_config(m: FinetuneModelConfig, vocab_size: Optional[int] = None,
                       pad_token_id: Optional[int] = None):
    """The validated ModelConfig of a random-init encoder (model.pretrained=none); ``vocab_size``
    and ``pad_token_id`` (the tokenizer's) fill in when model.random_init does not name them."""
    from linformer_train.config import config_from_dict

    raw = dict(m.random_init)
    if vocab_size is not None:
        raw.setdefault("vocab_size", vocab_size)
    if pad_token_id is not None:
        raw.setdefault("pad_token_id", pad_token_id)
    try:
        return config_from_dict({"model": raw}).model
    except ConfigError as exc:  # name the keys as the user wrote them: model.random_init.k
        message = re.sub(r"\bmodel\.(?=[a-z_])", "model.random_init.", str(exc).removeprefix("config: "))
        raise ConfigError(message) from None


def ds_view(cfg: FinetuneConfig) -> Config:
    """The pretraining Config that ``build_ds_config`` reads (batch, clipping, precision, ZeRO):
    DeepSpeed's JSON is made in one place for both."""
    view = Config()
    view.train = TrainConfig(micro_batch_size=cfg.train.micro_batch_size,
                             grad_accum_steps=cfg.train.grad_accum_steps)
    view.optim = OptimConfig(grad_clip=cfg.optim.grad_clip)
    view.precision = cfg.precision
    view.zero = cfg.zero
    return view
