"""Typed run configuration: dataclass sections, YAML files merged over them, one validate().

A run is described by YAML files merged, in order, over the schema below, then by CLI overrides in
omegaconf dotlist form (``optim.lr=3e-4``). A YAML may name ``base: other.yaml`` (a path relative to
itself) to build on another file; ``model.preset`` fills the model's dimensions before the YAML's own
model keys apply. Every user mistake surfaces as :class:`ConfigError` with a one-line message that
names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user's configuration is wrong; the message is one line that says what and how to fix it."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The encoder's shape and the Linformer options."""

    preset: Optional[str] = None
    """tiny | small | base | large: fills the dimensions below unless the YAML sets them."""
    vocab_size: int = 8192
    """Rows of the token embedding; must match the tokenizer (checked at training time)."""
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    max_seq_len: int = 512
    """n: the longest input; the learned positions and the projections E, F have n columns."""
    attention: str = "linformer"
    """linformer | full (softmax attention over all n keys through SDPA: today's baseline) |
    naive (softmax(QK^T)V written out, the paper's O(n^2) baseline; for profiling)."""
    k: Any = 128
    """Projected length. An int; a list with one value per layer; or a linear rule
    {first: 256, last: 64, multiple_of: 16} interpolated from the first layer to the last."""
    projection: str = "linear"
    """linear (learned E, F of shape k x n) | mean (mean pooling) | conv (kernel = stride = n / k)."""
    sharing: str = "headwise"
    """none (E, F per head) | headwise (per layer) | kv (E = F per layer) | layerwise (one matrix).
    conv takes headwise or kv; mean (no weights, nothing to share) only headwise."""
    projection_init: Optional[str] = None
    """How learned E, F start (projection=linear). window: mean pooling, slot s averaging the s-th
    of k equal windows of the n positions, then trained | mixed: those window means plus the dense
    N(0, 1/n) draw | normal: N(0, 1/n), the paper's dense random projection (every slot mixes every
    position). Unset: window, unless short_input_scaling names a
    dense-row rule (sqrt, length, none), which belongs to normal (so models saved before this option
    existed load as they were trained), or sharing is layerwise with per-layer k (a layer reading the
    first k_l of k_max shared windows would see only the start of the input). Short texts fine-tune
    far better from window (docs/QUALITY.md)."""
    short_input_scaling: Optional[str] = None
    """Linear projections on inputs with L < n real tokens use the first L columns of E and F.
    window: keep only the ceil(L k / n) slots whose windows the input reaches and mask the rest, no
    rescaling (a short input reads as the prefix of a long one; needs projection_init=window) |
    sqrt multiplies every slot by sqrt(n / L) (keeps its variance when weights and tokens are
    uncorrelated, exact at a normal init) | length multiplies by n / L (keeps an averaging row at its
    scale) | none (plain slice, as fairseq does). Unset: window with projection_init=window, sqrt with
    normal."""
    norm: str = "post"
    """post (RoBERTa/BERT) | pre (LayerNorm before each sublayer, steadier at depth)."""
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 0
    init_std: float = 0.02
    """Std of the normal init of every dense weight except E/F (which use 1/sqrt(n))."""
    num_labels: int = 2
    """Classes of the sequence-classification head (fine-tuning only)."""


SPECIAL_TOKENS = 5
"""<pad> <s> </s> <unk> <mask>: the fixed ids 0-4 of every tokenizer (data/tokenizer.py names them)."""
MIN_VOCAB_SIZE = SPECIAL_TOKENS + 256 + 1
"""The smallest vocabulary a tokenizer may have: the specials, 256 byte pieces (byte fallback is
always on), and at least one piece more."""


@dataclass
class DataConfig:
    """Where text comes from, how it is tokenized, packed and masked."""

    source: str = "builtin"
    """builtin (sample corpus made from Python's own docs) | files | hf (a datasets hub name)."""
    paths: list = field(default_factory=list)
    """With source=files: files, globs or directories. With source=hf: the builder's data_files
    (e.g. hf_name=json with paths=[corpus/*.jsonl])."""
    format: str = "auto"
    """auto (by suffix) | text | jsonl | parquet."""
    text_column: str = "text"
    """Column holding text in JSONL, Parquet and HF datasets."""
    text_split: str = "blank_line"
    """Plain text documents: blank_line (blocks separated by blank lines) | line (one per line)."""
    hf_name: Optional[str] = None
    """A datasets hub name (wikitext), a local dataset directory, or a builder (json | parquet |
    text) reading data.paths."""
    hf_config: Optional[str] = None
    """The dataset's configuration (wikitext-103-raw-v1)."""
    hf_split: str = "train"
    streaming: bool = False
    """Stream an HF dataset instead of downloading it whole."""
    max_documents: Optional[int] = None
    """Stop after this many documents (quick experiments on big sources)."""
    tokenizer: Optional[str] = None
    """A sentencepiece .model file or a directory holding tokenizer.model (trained on the source if
    unset or missing), or a Hugging Face tokenizer.json or a directory holding one (a model
    directory warm-started from RoBERTa/BERT keeps its own; never trained here)."""
    tokenizer_type: str = "unigram"
    """unigram | bpe (when training one)."""
    tokenizer_vocab_size: Optional[int] = None
    """Vocabulary of a tokenizer trained here; defaults to model.vocab_size."""
    tokenizer_character_coverage: float = 0.9995
    """Share of characters the trained tokenizer covers with pieces; rarer ones fall back to bytes."""
    tokenizer_sample_sentences: int = 2_000_000
    """Most lines the tokenizer trains on; a bigger source is sampled uniformly down to this."""
    prepared_dir: Optional[str] = None
    """Where packed blocks live; defaults to <run_dir>/data."""
    validation_fraction: float = 0.01
    """Share of blocks held out for evaluation (at least one block)."""
    allow_uneven_split: bool = False
    """Accept a split by document that lands far from validation_fraction (a corpus of a few huge
    documents); without it such a preparation is refused."""
    max_bad_char_fraction: float = 0.01
    """Share of a file's characters that may be undecodable bytes or NUL before the file is refused
    as not UTF-8 text (UTF-16, Latin-1, binary); 1 reads anything, replacing bad bytes."""
    num_proc: int = 2
    """Processes for tokenization."""
    mask_prob: float = 0.15
    mask_replace_prob: float = 0.8
    """Of the masked tokens: share replaced by <mask>."""
    mask_random_prob: float = 0.1
    """Of the masked tokens: share replaced by a random token (the rest stay as they are)."""
    whole_word_masking: bool = False
    prefetch_batches: int = 2
    """Batches prepared ahead by a background thread."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 5e-4
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 100
    decay: str = "linear"
    """linear | cosine | constant (after warmup)."""
    min_lr_ratio: float = 0.0
    """Final LR as a share of lr."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""


@dataclass
class TrainConfig:
    """Steps, batch arithmetic and the loop's policies."""

    max_steps: int = 1000
    """Optimizer steps of the whole run (the LR schedule spans them)."""
    stop_after: Optional[int] = None
    """Stop this invocation at this step, saving a checkpoint, without changing the schedule
    (time-sliced jobs; resume with --resume)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward."""
    grad_accum_steps: int = 1
    global_batch_size: Optional[int] = None
    """If set, must equal micro_batch_size x grad_accum_steps x data-parallel ranks."""
    seed: int = 1234
    eval_every: int = 200
    """Steps between evaluations on the validation split; 0 disables."""
    eval_batches: int = 20
    activation_checkpointing: bool = False
    """Recompute each block in backward (non-reentrant torch.utils.checkpoint)."""
    compile: Any = "auto"
    """torch.compile each encoder block (fuses LayerNorm, GELU, dropout and residuals): true | false |
    auto (on for CUDA, where it was measured faster; off on CPU)."""
    nonfinite_policy: str = "skip"
    """What a non-finite loss or grad norm does: skip (drop the step, count it) | stop."""
    max_consecutive_skips: int = 10
    """Stop with a clear message after this many skipped steps in a row."""
    run_dir: str = "runs/default"
    """Everything a run writes: resolved config, checkpoints, TensorBoard events, prepared data."""
    init_from: Optional[str] = None
    """Start from the weights of a model directory (tools/convert.py export / resize / warm-start);
    its model section must match this config's. Ignored when resuming a checkpoint."""
    peak_tflops: Optional[float] = None
    """Device peak (TFLOP/s) for MFU; unset: the GPU's dense datasheet peak for the dtype
    (linformer_train/train/mfu.py), else a matmul measured at start (CPUs, unlisted GPUs)."""


@dataclass
class PrecisionConfig:
    """Numeric format: the dtype and fp16's loss scaling (the single source of truth for both)."""

    dtype: str = "bf16"
    """fp32 | bf16 | fp16 (GPU; dynamic loss scaling)."""
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    deepspeed: dict = field(default_factory=dict)
    """Passthrough for rare DeepSpeed keys; a key that a derived one already sets is an error."""


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO: what is sharded over the data-parallel ranks and what is kept on the CPU."""

    stage: int = 0
    """0 (plain data parallel) | 1 (optimizer states sharded) | 2 (and gradients) | 3 (and parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states on CPU (stage >= 1)."""
    offload_params: bool = False
    """Keep parameters on CPU (stage 3)."""


@dataclass
class LoggingConfig:
    """Console and TensorBoard."""

    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    """A live progress line on the console (rank 0)."""
    verbose: bool = False
    """Show DeepSpeed's own INFO/WARNING lines at start-up (hidden otherwise; its errors always show)."""
    fill_mask_examples: int = 0
    """At the end of the run, show the model's top guesses for this many masked words of held-out
    text (a quick look at what it learned; the quickstart shows 3)."""


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    save_every: int = 500
    """Steps between checkpoints; 0 saves only at the end and on SIGTERM/SIGINT."""
    keep_last: int = 3
    resume: str = "none"
    """none | auto (latest complete checkpoint in run_dir, if any) | a checkpoint directory."""
    universal: bool = False
    """Load a universal checkpoint (after ds_to_universal), to resume on another number of ranks."""
    overwrite: bool = False
    """A fresh start into a run_dir that holds another run moves that run aside into
    ``<run_dir>/replaced-<time>/`` (never deletes it); without this, such a start is refused."""


@dataclass
class StageModel:
    max_seq_len: Optional[int] = None
    k: Any = None


@dataclass
class StageTrain:
    micro_batch_size: Optional[int] = None
    grad_accum_steps: Optional[int] = None
    global_batch_size: Optional[int] = None
    """With global_batch_size set and grad_accum_steps not named by the stage, the accumulation is
    derived: global / (micro_batch_size x ranks)."""


@dataclass
class StageOptim:
    lr: Optional[float] = None


@dataclass
class StageConfig:
    """One phase of a staged run (``stages:``): the values that change, over the sections above.
    A stage runs from the step after the previous stage's ``until_step`` to its own (the last one
    has none: it runs to train.max_steps)."""

    until_step: Optional[int] = None
    model: StageModel = field(default_factory=StageModel)
    train: StageTrain = field(default_factory=StageTrain)
    optim: StageOptim = field(default_factory=StageOptim)


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stages: List[StageConfig] = field(default_factory=list)
    """Sequence length (and k, batch, lr) as a schedule: train short first, then longer, in one run
    (see docs/TRAINING.md, "Stages"). Empty: one stage, the sections as they are."""


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, ffn_size=128),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, ffn_size=2048),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096),
}

CHOICES: dict[str, tuple] = {
    "model.attention": ("linformer", "full", "naive"),
    "model.projection": ("linear", "mean", "conv"),
    "model.sharing": ("none", "headwise", "kv", "layerwise"),
    "model.projection_init": ("window", "mixed", "normal"),
    "model.short_input_scaling": ("window", "sqrt", "length", "none"),
    "model.norm": ("post", "pre"),
    "data.source": ("builtin", "files", "hf"),
    "data.format": ("auto", "text", "jsonl", "parquet"),
    "data.text_split": ("blank_line", "line"),
    "data.tokenizer_type": ("unigram", "bpe"),
    "optim.decay": ("linear", "cosine", "constant"),
    "train.nonfinite_policy": ("skip", "stop"),
    "precision.dtype": ("fp32", "bf16", "fp16"),
    "zero.stage": (0, 1, 2, 3),
}

MOVED_KEYS: dict[str, str] = {
    "precision.zero_stage": "zero.stage",
    "precision.offload_optimizer": "zero.offload_optimizer",
    "precision.offload_params": "zero.offload_params",
}
"""Keys of earlier versions -> where they live now: a config naming one is refused with the new
name; a checkpoint's saved config is moved over (:func:`upgrade_saved`)."""


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _one_line(exc: OmegaConfBaseException) -> str:
    """omegaconf's messages span lines (full_key, object_type); keep the first and the key."""
    msg = str(getattr(exc, "msg", None) or exc).strip().splitlines()[0]
    key = getattr(exc, "full_key", None)
    obj = getattr(exc, "object_type", None)
    if "not in" in msg and dataclasses.is_dataclass(obj):  # an unknown key: say what is allowed
        msg = f"unknown key; {obj.__name__} takes {', '.join(f.name for f in dataclasses.fields(obj))}"
    return f"{key}: {msg}" if key else msg


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file with its `base:` chain resolved (the base first, this file over it)."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config: `base:` loop {chain}; remove one of the references")
    if not path.is_file():
        raise ConfigError(f"config: file {path} does not exist; pass an existing YAML to --config")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: keep the first line, name the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config: {path} is not valid YAML ({first}); fix the syntax") from None
    if node is None:
        node = OmegaConf.create({})
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config: {path} must hold a mapping of sections, not a {type(node).__name__}")
    base = node.pop("base", None)
    if base is None:
        return node
    bases = [base] if isinstance(base, str) else list(base) if isinstance(base, ListConfig) else None
    if bases is None or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config: {path} has base: {base!r}; name a YAML file (or a list of them)")
    merged = OmegaConf.create({})
    for b in bases:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(b), (*seen, path)))
    return OmegaConf.merge(merged, node)


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. optim.lr=3e-4)")
    bad = [o for o in overrides if not all(o.partition("=")[0].split("."))]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: the key {bad[0].partition('=')[0]!r} has an empty part "
                          f"(e.g. optim.lr=3e-4)")
    import yaml

    for item in overrides:  # omegaconf lets the YAML parser's multi-line errors through
        key, _, value = item.partition("=")
        try:
            yaml.safe_load(value)
        except yaml.YAMLError as exc:
            first = " ".join(str(exc).split())[:120]
            raise ConfigError(f"override {item!r}: {key} is not valid YAML ({first})") from None
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override: {_one_line(exc)}") from None


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Merge schema <- preset <- YAML files (in order) <- dotlist overrides, then validate.

    Returns a plain :class:`Config` of dataclasses (no omegaconf nodes leak into the code).
    """
    user = OmegaConf.create({})
    for f in files:
        user = OmegaConf.merge(user, _read_yaml(Path(f)))
    staged = [o for o in overrides if o.startswith("stages.")]
    user = OmegaConf.merge(user, _parse_overrides([o for o in overrides if o not in staged]))
    for item in staged:  # stages.<i>.<key>=value: an element of the list, which a dotlist cannot merge
        key, _, value = item.partition("=")
        index = key.split(".")[1]
        count = len(user.get("stages") or [])
        if not index.isdigit() or int(index) >= count:
            raise ConfigError(f"override {item!r}: the config has {count} stages (stages.0 to stages.{count - 1})")
        try:
            OmegaConf.update(user, key, _parse_overrides([f"v={value}"]).v, merge=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r}: {_one_line(exc)}") from None
    return config_from_dict(OmegaConf.to_container(user, resolve=False))


@functools.lru_cache(maxsize=None)
def _schema() -> DictConfig:
    """The structured schema, built once: 3/4 of a load's time (merge copies it, never changes it)."""
    return OmegaConf.structured(Config)


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from a plain nested dict (a resolved YAML, a checkpoint's copy)."""
    schema = _schema()
    check_moved_keys(raw or {})
    check_raw_types(Config, raw or {})
    try:
        user = OmegaConf.create(raw or {})
        preset = OmegaConf.select(user, "model.preset", default=None)
        layers = [schema]
        if preset is not None:
            if not isinstance(preset, str) or preset not in PRESETS:
                raise ConfigError(
                    f"model.preset={preset!r} is unknown; choose one of {', '.join(PRESETS)}"
                )
            layers.append(OmegaConf.create({"model": PRESETS[preset]}))
        merged = OmegaConf.merge(*layers, user)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config: {_one_line(exc)}") from None
    cfg = _normalise(obj)
    validate(cfg)
    return cfg


def _moved(raw: Any) -> list[tuple[str, str, Any]]:
    """(old key, new key, value) for each key of ``raw`` that has moved."""
    out = []
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        values = raw.get(section) if isinstance(raw, dict) else None
        if isinstance(values, dict) and key in values:
            out.append((old, new, values[key]))
    return out


def check_moved_keys(raw: Any) -> None:
    """A key that has moved is refused with the place it went to (omegaconf would only list the
    section's keys)."""
    for old, new, value in _moved(raw):
        shown = str(value).lower() if isinstance(value, bool) else value
        section, key = new.split(".")
        raise ConfigError(f"config: {old} has moved to {new} (ZeRO has its own section); write "
                          f"{new}={shown}, or in YAML {section}: {{{key}: {shown}}}")


def upgrade_saved(raw: dict) -> dict:
    """A config saved by an earlier version (a checkpoint's copy) with its moved keys moved."""
    moved = _moved(raw)
    if not moved:
        return raw
    raw = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for old, new, value in moved:
        section, key = old.split(".")
        del raw[section][key]
        new_section, new_key = new.split(".")
        raw.setdefault(new_section, {})[new_key] = value
    return raw


def check_raw_types(schema: type, raw: Any) -> None:
    """What omegaconf lets through or reports without a key: a list where the schema has a mapping
    (a TypeError, no key named), or an int for a bool (2 silently becomes True)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    hints = _section_hints(schema)
    for section, values in raw.items():
        if section in hints and values is not None and not isinstance(values, dict):
            raise ConfigError(f"config: {section}={values!r} must be a mapping of {section}.* keys")
        if section not in hints or not isinstance(values, dict):
            continue  # omegaconf names unknown sections itself
        for key, value in values.items():
            kind = hints[section].get(key)
            full = f"{section}.{key}"
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(f"config: {full}={value!r} must be true or false")
            if kind in (list, dict) and value is not None and not isinstance(value, kind):
                want = "a list" if kind is list else "a mapping"
                raise ConfigError(f"config: {full}={value!r} must be {want}, not {type(value).__name__}")


def sections(schema: Any) -> list[dataclasses.Field]:
    """The sections of a config (class or instance) that are sections (model, data, ...): every
    top-level field but the ``stages`` list."""
    return [f for f in dataclasses.fields(schema) if dataclasses.is_dataclass(f.default_factory)]


def _section_hints(schema: type) -> dict[str, dict[str, Any]]:
    """{section: {field: bool | list | dict | Any | other}} of a config dataclass (Optional unwrapped)."""
    import typing

    out = {}
    for section in sections(schema):
        cls = section.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        kinds = {}
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            args = [a for a in typing.get_args(t) if a is not type(None)]
            if typing.get_origin(t) is typing.Union and len(args) == 1:
                t = args[0]
            kinds[f.name] = t if t in (bool, list, dict, Any) else object
        out[section.name] = kinds
    return out


def _normalise(cfg: Config) -> Config:
    """Turn omegaconf containers left inside Any/list/dict fields into plain Python; give an unset
    model.projection_init and short_input_scaling the values that belong together."""
    for sec in [getattr(cfg, s.name) for s in sections(cfg)] + [st.model for st in cfg.stages]:
        for f in dataclasses.fields(sec):
            v = getattr(sec, f.name)
            if isinstance(v, (DictConfig, ListConfig)):
                setattr(sec, f.name, OmegaConf.to_container(v, resolve=True))
    cfg.stages = list(cfg.stages)
    m = cfg.model
    if m.projection_init is None:
        windows = m.short_input_scaling in (None, "window") and not _nested_layerwise(m)
        m.projection_init = "window" if windows else "normal"
    if m.short_input_scaling is None:
        m.short_input_scaling = "window" if m.projection_init in ("window", "mixed") else "sqrt"
    return cfg


def _nested_layerwise(m: ModelConfig) -> bool:
    """Layerwise sharing with per-layer k: layers read different numbers of the shared rows, which
    windows cannot serve (each row has one window)."""
    if m.sharing != "layerwise" or isinstance(m.k, int):
        return False
    try:
        return len(set(resolve_k_schedule(m.k, m.num_layers))) > 1
    except ConfigError:
        return False  # validate() reports the bad k


def to_dict(cfg: Config) -> dict:
    """A plain nested dict of the config (for YAML dumps, checkpoints, TensorBoard hparams)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# The k schedule
# --------------------------------------------------------------------------------------------------


def resolve_k_schedule(k: Any, num_layers: int) -> list[int]:
    """Expand model.k into one projected length per layer (see ModelConfig.k for the forms)."""
    if isinstance(k, bool):
        raise ConfigError(f"model.k={k!r} must be an int, a list of ints or {{first, last}}")
    if isinstance(k, int):
        return [k] * num_layers
    if isinstance(k, (list, tuple)):
        if len(k) != num_layers:
            raise ConfigError(
                f"model.k has {len(k)} values but model.num_layers={num_layers}; "
                f"give one k per layer"
            )
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in k):
            raise ConfigError(f"model.k={list(k)} must hold only ints")
        return [int(v) for v in k]
    if isinstance(k, dict):
        allowed = {"first", "last", "multiple_of"}
        unknown = set(k) - allowed
        if unknown or not {"first", "last"} <= set(k):
            raise ConfigError(
                f"model.k={k} as a rule takes keys first, last and optional multiple_of "
                f"(e.g. {{first: 256, last: 64, multiple_of: 16}})"
            )
        first, last, mult = k["first"], k["last"], k.get("multiple_of", 1)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (first, last, mult)):
            raise ConfigError(f"model.k={k}: first, last and multiple_of must be positive ints")
        if num_layers == 1:
            vals = [first]
        else:
            vals = [first + (last - first) * i / (num_layers - 1) for i in range(num_layers)]
        return [max(mult, int(round(v / mult)) * mult) for v in vals]
    raise ConfigError(
        f"model.k={k!r} must be an int, a list of one int per layer, or {{first: A, last: B}}"
    )


# --------------------------------------------------------------------------------------------------
# Validation: every cross-field rule in one place
# --------------------------------------------------------------------------------------------------


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Raise ConfigError (one line, with the numbers) on the first broken rule."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(
            value in allowed,
            f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}",
        )

    check_finite(cfg)
    m = cfg.model
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_seq_len"):
        v = getattr(m, name)
        _check(v > 0, f"model.{name}={v} must be positive")
    _check(
        m.hidden_size % m.num_heads == 0,
        f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}",
    )
    _check(0 <= m.pad_token_id < m.vocab_size,
           f"model.pad_token_id={m.pad_token_id} must lie in [0, vocab_size={m.vocab_size})")
    for name in ("dropout", "attention_dropout"):
        v = getattr(m, name)
        _check(0.0 <= v < 1.0, f"model.{name}={v} must lie in [0, 1)")
    _check(m.init_std > 0, f"model.init_std={m.init_std} must be positive")
    _check(m.layer_norm_eps > 0, f"model.layer_norm_eps={m.layer_norm_eps} must be positive")
    _check(m.num_labels >= 2, f"model.num_labels={m.num_labels} must be at least 2")
    if m.attention == "linformer":
        ks = resolve_k_schedule(m.k, m.num_layers)
        for i, kl in enumerate(ks):
            _check(kl > 0, f"model.k for layer {i} is {kl}; every k must be positive")
            _check(
                kl <= m.max_seq_len,
                f"model.k for layer {i} is {kl} > model.max_seq_len={m.max_seq_len}; "
                f"k must not exceed n",
            )
            if m.projection in ("mean", "conv"):
                _check(
                    m.max_seq_len % kl == 0,
                    f"model.projection={m.projection} needs n divisible by k, but "
                    f"max_seq_len={m.max_seq_len} and k={kl} (layer {i})",
                )
        if m.projection == "linear":
            _check(m.short_input_scaling != "window" or m.projection_init in ("window", "mixed"),
                   "model.short_input_scaling=window masks the slots past a short input by their windows, "
                   "which only projection_init=window gives; with projection_init=normal choose "
                   "short_input_scaling sqrt, length or none")
            _check(not (m.projection_init in ("window", "mixed") and m.sharing == "layerwise" and len(set(ks)) > 1),
                   f"model.projection_init=window with sharing=layerwise and per-layer k {ks} would give a "
                   f"layer that reads the first {min(ks)} of the {max(ks)} shared windows only the start "
                   f"of the input; use one k for every layer, or short_input_scaling=sqrt (dense "
                   f"projections, projection_init=normal)")
        if m.projection == "mean":
            _check(m.sharing == "headwise",
                   f"model.sharing={m.sharing} means nothing with projection=mean (mean pooling has no "
                   f"weights to share); leave model.sharing at its default, headwise")
        if m.projection == "conv":
            _check(m.sharing in ("headwise", "kv"),
                   f"model.sharing={m.sharing} applies to learned projections; "
                   f"with projection={m.projection} use sharing=headwise or kv")

    d = cfg.data
    _check(all(isinstance(p, str) and p for p in d.paths),
           f"data.paths={d.paths} must list paths (non-empty strings)")
    if d.source == "files":
        _check(bool(d.paths), "data.paths is empty but data.source=files; list files, globs or directories")
    if d.source == "hf":
        _check(bool(d.hf_name), "data.hf_name is unset but data.source=hf; name a dataset (e.g. wikitext)")
    _check(0.0 < d.validation_fraction < 0.5,
           f"data.validation_fraction={d.validation_fraction} must lie in (0, 0.5)")
    _check(isinstance(cfg.train.compile, bool) or cfg.train.compile == "auto",
           f"train.compile={cfg.train.compile!r} is not allowed; choose true, false or auto")
    _check(0 <= cfg.logging.fill_mask_examples <= 20,
           f"logging.fill_mask_examples={cfg.logging.fill_mask_examples} must lie in [0, 20]")
    _check(0.0 <= d.max_bad_char_fraction <= 1.0,
           f"data.max_bad_char_fraction={d.max_bad_char_fraction} must lie in [0, 1]")
    _check(0.0 < d.mask_prob < 1.0, f"data.mask_prob={d.mask_prob} must lie in (0, 1)")
    _check(
        d.mask_replace_prob >= 0 and d.mask_random_prob >= 0
        and d.mask_replace_prob + d.mask_random_prob <= 1.0,
        f"data.mask_replace_prob={d.mask_replace_prob} + data.mask_random_prob={d.mask_random_prob} "
        f"must be non-negative and sum to at most 1",
    )
    _check(d.num_proc >= 1, f"data.num_proc={d.num_proc} must be at least 1")
    _check(d.prefetch_batches >= 0, f"data.prefetch_batches={d.prefetch_batches} must be >= 0")
    if d.max_documents is not None:
        _check(d.max_documents > 0, f"data.max_documents={d.max_documents} must be positive (or unset)")
    _check(0.0 < d.tokenizer_character_coverage <= 1.0,
           f"data.tokenizer_character_coverage={d.tokenizer_character_coverage} must lie in (0, 1]")
    _check(d.tokenizer_sample_sentences > 0,
           f"data.tokenizer_sample_sentences={d.tokenizer_sample_sentences} must be positive")
    for name in ("text_column", "hf_split"):
        _check(bool(getattr(d, name)), f"data.{name} is empty; name a column / split")
    if d.tokenizer_vocab_size is not None:
        _check(d.tokenizer_vocab_size >= MIN_VOCAB_SIZE,
               f"data.tokenizer_vocab_size={d.tokenizer_vocab_size} is too small: {SPECIAL_TOKENS} special pieces and 256 "
               f"byte pieces need at least {MIN_VOCAB_SIZE}")
        _check(d.tokenizer_vocab_size <= m.vocab_size,
               f"data.tokenizer_vocab_size={d.tokenizer_vocab_size} exceeds model.vocab_size={m.vocab_size}")

    o = cfg.optim
    _check(o.lr > 0, f"optim.lr={o.lr} must be positive")
    _check(len(o.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                      and 0 <= b < 1 for b in o.betas),
           f"optim.betas={o.betas} must be two values in [0, 1)")
    _check(o.eps > 0, f"optim.eps={o.eps} must be positive")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1]")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables)")

    t = cfg.train
    _check(t.max_steps > 0, f"train.max_steps={t.max_steps} must be positive")
    if t.stop_after is not None:
        _check(0 < t.stop_after <= t.max_steps,
               f"train.stop_after={t.stop_after} must lie in [1, train.max_steps={t.max_steps}]")
    _check(t.micro_batch_size > 0, f"train.micro_batch_size={t.micro_batch_size} must be positive")
    if t.global_batch_size is not None:
        _check(t.global_batch_size > 0, f"train.global_batch_size={t.global_batch_size} must be positive (or unset)")
    _check(0 <= t.seed < 2**32, f"train.seed={t.seed} must lie in [0, 2**32)")
    _check(t.grad_accum_steps > 0, f"train.grad_accum_steps={t.grad_accum_steps} must be positive")
    _check(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0 disables)")
    _check(t.eval_batches > 0, f"train.eval_batches={t.eval_batches} must be positive")
    _check(t.max_consecutive_skips > 0,
           f"train.max_consecutive_skips={t.max_consecutive_skips} must be positive")
    _check(bool(t.run_dir), "train.run_dir is empty; name a directory for the run's outputs")
    if t.peak_tflops is not None:
        _check(t.peak_tflops > 0, f"train.peak_tflops={t.peak_tflops} must be positive")

    validate_precision(cfg.precision)
    validate_zero(cfg.zero)

    lg = cfg.logging
    _check(lg.log_every > 0, f"logging.log_every={lg.log_every} must be positive")

    c = cfg.checkpoint
    _check(c.save_every >= 0, f"checkpoint.save_every={c.save_every} must be >= 0")
    _check(c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last} must be at least 1")
    _check(bool(c.resume), "checkpoint.resume is empty; use none, auto or a checkpoint directory")
    if cfg.stages:
        validate_stages(cfg)


def validate_stages(cfg: Config) -> None:
    """Every stage is a valid plain config, the boundaries rise inside train.max_steps, and the
    model can be resized from each stage to the next."""
    bounds = [st.until_step for st in cfg.stages]
    for i, b in enumerate(bounds[:-1]):
        _check(b is not None, f"stages[{i}].until_step is unset; every stage but the last names the step it ends at")
    _check(bounds[-1] is None, f"stages[{len(bounds) - 1}].until_step={bounds[-1]}: the last stage runs to "
                               f"train.max_steps={cfg.train.max_steps}; remove its until_step (or add a stage after it)")
    previous = 0
    for i, b in enumerate(bounds[:-1]):
        _check(previous < b < cfg.train.max_steps,
               f"stages[{i}].until_step={b} must lie after the previous stage's end ({previous}) and before "
               f"train.max_steps={cfg.train.max_steps}")
        previous = b
    resolved = []
    for i in range(len(cfg.stages)):
        try:
            one = stage_config(cfg, i)
            validate(one)
        except ConfigError as exc:
            raise ConfigError(f"stages[{i}]: {exc}") from None
        resolved.append(one.model)
    for i, (a, b) in enumerate(zip(resolved, resolved[1:])):
        if a.attention == "linformer" and a.projection == "conv":
            wa, wb = ([m.max_seq_len // kk for kk in k_schedule(m)] for m in (a, b))
            wa, wb = (w[0] if len(set(w)) == 1 else w for w in (wa, wb))
            _check(wa == wb, f"stages[{i + 1}]: projection=conv keeps its kernel (n / k = {wa}) only when n / k "
                             f"stays the same; stage {i + 1} gives {wb}: scale k with n")


def stage_config(cfg: Config, index: int, world_size: Optional[int] = None) -> Config:
    """The plain config (no stages) of stage ``index``: its values over the sections. Each n gets
    its own prepared-data folder (``<data.prepared_dir or run_dir/data>/n<N>``) and every stage
    tokenizes with the first stage's tokenizer. Given ``world_size``, a stage that sets
    train.global_batch_size without grad_accum_steps gets the accumulation that makes it up."""
    import copy

    out = copy.deepcopy(cfg)
    out.stages = []
    stage = cfg.stages[index]
    for name in ("model", "train", "optim"):
        values, target = getattr(stage, name), getattr(out, name)
        for f in dataclasses.fields(values):
            if getattr(values, f.name) is not None:
                setattr(target, f.name, copy.deepcopy(getattr(values, f.name)))
    base = Path(cfg.data.prepared_dir) if cfg.data.prepared_dir else Path(cfg.train.run_dir) / "data"
    out.data.prepared_dir = str(base / f"n{out.model.max_seq_len}")
    if not cfg.data.tokenizer and index > 0:
        first = stage_config(cfg, 0)
        out.data.tokenizer = str(Path(first.data.prepared_dir) / "tokenizer")
    t = out.train
    if world_size and t.global_batch_size and stage.train.grad_accum_steps is None:
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step == 0:
            t.grad_accum_steps = max(1, t.global_batch_size // per_step)
    return out


def stage_index(cfg: Config, step: int) -> int:
    """The stage that trains the step after ``step`` (a checkpoint at a boundary holds the next stage)."""
    return sum(1 for st in cfg.stages[:-1] if st.until_step <= step)


def check_finite(cfg) -> None:
    """inf and nan pass every < and > of a validate(): refuse them first, in any section."""
    for section in sections(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            v = getattr(getattr(cfg, section.name), f.name)
            if isinstance(v, float):
                _check(math.isfinite(v), f"{section.name}.{f.name}={v} must be a finite number")


def validate_zero(z: ZeroConfig) -> None:
    """The zero section's rules (shared with fine-tuning)."""
    _check(not (z.offload_params and z.stage != 3),
           f"zero.offload_params needs zero.stage=3 (got {z.stage})")
    _check(not (z.offload_optimizer and z.stage == 0),
           "zero.offload_optimizer needs zero.stage >= 1")


def validate_precision(p: PrecisionConfig) -> None:
    """The precision section's rules (shared with fine-tuning)."""
    _check(p.min_loss_scale > 0, f"precision.min_loss_scale={p.min_loss_scale} must be positive")
    _check(0 <= p.initial_scale_power <= 64,
           f"precision.initial_scale_power={p.initial_scale_power} must lie in [0, 64] (the scale is 2**power)")
    _check(p.loss_scale_window >= 1, f"precision.loss_scale_window={p.loss_scale_window} must be at least 1")
    _check(p.hysteresis >= 1, f"precision.hysteresis={p.hysteresis} must be at least 1")


def check_batch_arithmetic(train: TrainConfig, world_size: int) -> int:
    """The global batch in sequences; raises when train.global_batch_size disagrees with the ranks."""
    derived = train.micro_batch_size * train.grad_accum_steps * world_size
    if train.global_batch_size is not None and train.global_batch_size != derived:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} but micro_batch_size="
            f"{train.micro_batch_size} x grad_accum_steps={train.grad_accum_steps} x "
            f"{world_size} ranks = {derived}; change one of them"
        )
    return derived


def k_schedule(model: ModelConfig) -> list[int]:
    """Per-layer k of a validated model section (k is meaningless for full attention: n is used)."""
    if model.attention == "full":
        return [model.max_seq_len] * model.num_layers
    return resolve_k_schedule(model.k, model.num_layers)

