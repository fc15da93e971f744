"""Portable model directories: save and load a Linformer without DeepSpeed.

Layout::

    model.safetensors   every tensor of the model's state dict, each stored once (fp32 or bf16)
    config.yaml         ``model:`` section (loads with load_config; usable as ``base:`` of a run YAML)
    model_info.json     format marker, architecture (mlm | classification), labels, task, provenance
    tokenizer.model     the sentencepiece model (+ tokenizer.json, its special ids and settings), or
    tokenizer.json      a Hugging Face tokenizer (+ tokenizer_config.json, special_tokens_map.json),
                        e.g. the source model's own after a warm start

Sharing is structural in this model, so nothing is stored twice: a layerwise-shared projection is
one parameter (``encoder.shared_projection.weight``) that every layer reads, and the MLM decoder
has no weight of its own (it multiplies by ``encoder.tokens.weight``). Loading rebuilds the model
from ``config.yaml``, so the sharing comes back by construction. ``save_pretrained`` refuses a
state dict in which two keys share storage (safetensors would too) rather than store a copy.

Key sets are checked both ways: a missing or an unexpected key is an error, never ``strict=False``.
The one deliberate difference is listed by name: a classifier built from an MLM directory drops
the MLM head (``MLM_HEAD_KEYS``) and starts its pooler and classifier fresh.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from linformer_train.config import ConfigError, ModelConfig, config_from_dict
from linformer_train.convert import ConversionError
from linformer_train.serialization import read_json_object

FORMAT = "linformer-train-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
INFO_FILE = "model_info.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_META = "tokenizer.json"
ARCHITECTURES = ("mlm", "classification")
MLM_HEAD_KEYS = ("head_dense.weight", "head_dense.bias", "head_norm.weight", "head_norm.bias",
                 "head_bias")
CLASSIFIER_HEAD_KEYS = ("pool_dense.weight", "pool_dense.bias", "classifier.weight",
                        "classifier.bias")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Building and checking
# --------------------------------------------------------------------------------------------------


def build_model(model_cfg: ModelConfig, architecture: str) -> nn.Module:
    from linformer_train.model import LinformerForMLM, LinformerForSequenceClassification

    if architecture == "mlm":
        return LinformerForMLM(model_cfg)
    if architecture == "classification":
        return LinformerForSequenceClassification(model_cfg)
    raise ConversionError(f"architecture {architecture!r} is unknown; choose one of {', '.join(ARCHITECTURES)}")


def architecture_of(model: nn.Module) -> str:
    from linformer_train.model import LinformerForMLM, LinformerForSequenceClassification

    if isinstance(model, LinformerForMLM):
        return "mlm"
    if isinstance(model, LinformerForSequenceClassification):
        return "classification"
    raise TypeError(f"{type(model).__name__} is not a linformer-train model")


def _few(names: Sequence[str], limit: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_dict(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], what: str,
                     fix: str) -> None:
    """Raise ConversionError unless ``got`` has exactly the keys and shapes of ``expected``."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
        raise ConversionError(f"{what} does not match the model its config describes: "
                              f"{'; '.join(parts)}; {fix}")
    for key, shape in expected.items():
        if tuple(got[key].shape) != tuple(shape):
            raise ConversionError(f"{what}: {key} has shape {tuple(got[key].shape)} but the config "
                                  f"gives {tuple(shape)}; {fix}")


def expected_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_no_aliases(state: dict[str, torch.Tensor]) -> None:
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            raise RuntimeError(f"state-dict keys {seen[ident]} and {key} share one tensor; the model "
                               f"must own shared weights under one key so they are stored once")
        seen[ident] = key


# --------------------------------------------------------------------------------------------------
# Atomic output directories
# --------------------------------------------------------------------------------------------------


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool,
                     inputs: Optional[Mapping[str, Optional[str | os.PathLike]]] = None) -> Path:
    """Fail before any work when ``out_dir`` exists (non-empty) and may not be replaced, or when it
    equals, contains or sits inside one of ``inputs`` (``{description: path}``): even with
    ``overwrite``, an output never replaces what is being read."""
    from linformer_train.paths import check_output_apart

    check_output_apart(out_dir, inputs or {}, "output directory")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"output directory {out} already exists and is not empty; choose "
                              f"another or pass --overwrite")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to write into; rename it into place on success,
    delete it on any error. An existing ``out_dir`` is replaced only with ``overwrite``."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _tokenizer_source(tokenizer: str | os.PathLike) -> Path:
    from linformer_train.data.tokenizer import model_path

    return model_path(tokenizer)


def check_tokenizer(tokenizer: str | os.PathLike, vocab_size: int):
    """Load a tokenizer (DataError when it is not one of this project's) and check it fits."""
    from linformer_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(_tokenizer_source(tokenizer))
    if tok.vocab_size > vocab_size:
        raise ConversionError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's "
                              f"vocab_size is {vocab_size}; use the tokenizer the model was trained with")
    return tok


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Optional[str | os.PathLike],
                    dtype: str = "fp32", labels: Optional[Sequence[str]] = None,
                    task: Optional[dict] = None, source: Optional[dict] = None,
                    overwrite: bool = False) -> Path:
    """Write ``model`` as a model directory (atomically). ``tokenizer``: a .model file, a Hugging
    Face tokenizer.json, or a directory holding either (None only for tokenizer-free tests of the
    format)."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; choose fp32 or bf16")
    from safetensors.torch import save_file

    architecture = architecture_of(model)
    cfg: ModelConfig = model.cfg
    if architecture == "classification":
        if labels is None:
            labels = [str(i) for i in range(cfg.num_labels)]
        if len(labels) != cfg.num_labels:
            raise ConversionError(f"{len(labels)} label names for a head with {cfg.num_labels} outputs")
    tok = check_tokenizer(tokenizer, cfg.vocab_size) if tokenizer is not None else None
    state = model.state_dict()
    _check_no_aliases(state)
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "dtype": dtype,
        "labels": list(map(str, labels)) if labels is not None else None,
        "task": task,
        "source": source or {},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_sha256": tok.sha256 if tok is not None else None,
    }
    model_section = {"model": to_dict_model(cfg)}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "linformer": FORMAT,
                                                               "dtype": dtype})
        os.chmod(tmp / WEIGHTS_FILE, 0o644)  # safetensors writes 0600; a model directory is shared
        from omegaconf import OmegaConf

        (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(model_section)))
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        if tok is not None and tok.kind == "sentencepiece":
            shutil.copyfile(tok.path, tmp / TOKENIZER_FILE)
            meta = tok.path.with_suffix(".json")
            if meta.is_file():
                shutil.copyfile(meta, tmp / TOKENIZER_META)
        elif tok is not None:  # Hugging Face: tokenizer.json and the files naming its special tokens
            for f in tok.files:
                shutil.copyfile(f, tmp / (TOKENIZER_META if f == tok.path else f.name))
    return Path(out_dir)


def to_dict_model(cfg: ModelConfig) -> dict:
    """The model section as a plain dict, with ``preset`` cleared (its dimensions are explicit)."""
    import dataclasses

    d = dataclasses.asdict(cfg)
    d["preset"] = None
    return d


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _hint_for_foreign(path: Path) -> str:
    hf = path / "config.json"
    if hf.is_file():
        try:
            kind = json.loads(hf.read_text()).get("model_type")
        except ValueError:
            kind = None
        if kind == "linformer-train":
            return (f"it looks like a transformers export of a Linformer; convert it back with "
                    f"`tools/convert.py from-hf {path} OUT`")
        if kind:
            return (f"it looks like a Hugging Face {kind} model; convert it with "
                    f"`tools/convert.py warm-start {path} OUT --tokenizer TOK`")
    if (path / "latest").is_file() or (path / "complete.json").is_file() or (path / "checkpoints").is_dir():
        return f"it looks like a training checkpoint; export it with `tools/convert.py export {path} OUT`"
    return "export a checkpoint with `tools/convert.py export` or convert a model with `tools/convert.py`"


def load_model_info(path: str | os.PathLike) -> dict:
    """``model_info.json`` of a model directory; ConversionError when ``path`` is not one."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"model directory {path} does not exist")
    info_file = path / INFO_FILE
    if not info_file.is_file():
        raise ConversionError(f"{path} is not a linformer-train model directory (no {INFO_FILE}); "
                              f"{_hint_for_foreign(path)}")
    info = read_json_object(info_file, ConversionError, fix="export the model again")
    if info.get("format") != FORMAT:
        raise ConversionError(f"{info_file} is not a linformer-train model description "
                              f"(format {info.get('format')!r}); {_hint_for_foreign(path)}")
    if info.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{path} has format version {info.get('format_version')}; this code "
                              f"reads version {FORMAT_VERSION}")
    if info.get("architecture") not in ARCHITECTURES:
        raise ConversionError(f"{info_file} names architecture {info.get('architecture')!r}; "
                              f"expected one of {', '.join(ARCHITECTURES)}")
    return info


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The validated model section of a model directory."""
    path = Path(path)
    load_model_info(path)
    from omegaconf import OmegaConf

    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ConversionError(f"{path} has no {CONFIG_FILE}; export the model again")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(cfg_file))
    except Exception as exc:  # yaml's and omegaconf's errors span lines: keep the first
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConversionError(f"{cfg_file} is not valid YAML ({first}); export the model again") from None
    if not isinstance(raw, dict):
        raw = {"": raw}
    unknown = set(raw) - {"model"}
    if unknown or not isinstance(raw.get("model"), dict):
        raise ConversionError(f"{cfg_file} must hold one `model:` section (found {sorted(raw or {})})")
    return model_config(raw["model"], str(cfg_file))


def model_config(raw: dict, where: str) -> ModelConfig:
    """A model section built by a conversion (or read from a model directory), validated; a value
    the schema refuses is a ConversionError that says which conversion (``where``) made it."""
    try:
        return config_from_dict({"model": raw}).model
    except ConfigError as exc:
        raise ConversionError(f"{where}: {exc}") from None


def header_shapes(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Keys and shapes of ``model.safetensors`` from its header alone (no tensor is read), as
    meta tensors: what a shape check needs before a byte of weights is loaded."""
    from safetensors import SafetensorError, safe_open

    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise ConversionError(f"{path} has no {WEIGHTS_FILE}; export the model again")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ConversionError(f"{weights} cannot be read ({str(exc).splitlines()[0]}); the file is "
                              f"damaged, export the model again") from None


def load_state(path: str | os.PathLike, expected: Optional[dict[str, torch.Size]] = None) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, as stored (fp32 or bf16). With ``expected``, keys and
    shapes are checked from the header first, so a file with an unexpected (or huge) tensor is
    refused before anything is read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(path) / WEIGHTS_FILE
    if expected is not None:
        check_state_dict(expected, header_shapes(path), str(weights),
                         "the directory is inconsistent; export it again")
    if not weights.is_file():
        raise ConversionError(f"{path} has no {WEIGHTS_FILE}; export the model again")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ConversionError(f"{weights} cannot be read ({str(exc).splitlines()[0]}); the file is "
                              f"damaged, export the model again") from None
    for key, tensor in state.items():  # safetensors has no checksum: damaged bytes often read as NaN
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConversionError(f"{weights}: {key} holds non-finite values (NaN or inf); the file is "
                                  f"damaged or the model diverged; export it again from a good checkpoint")
    return state


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The tokenizer of a model directory: tokenizer.model, or a Hugging Face tokenizer.json."""
    from linformer_train.data.tokenizer import is_hf_tokenizer_file, sha256_file

    tok = Path(path) / TOKENIZER_FILE
    if not tok.is_file() and is_hf_tokenizer_file(Path(path) / TOKENIZER_META):
        tok = Path(path) / TOKENIZER_META
    if not tok.is_file():
        raise ConversionError(f"model directory {path} has no {TOKENIZER_FILE} (nor a Hugging Face "
                              f"{TOKENIZER_META}); export it again with --tokenizer")

    want = load_model_info(path).get("tokenizer_sha256")
    if want and sha256_file(tok) != want:  # another run's tokenizer: every id would mean another piece
        raise ConversionError(f"{tok} has sha256 {sha256_file(tok)[:12]} but the model was saved with "
                              f"tokenizer {want[:12]} (model_info.json); put the model's own tokenizer back "
                              f"or export it again with --tokenizer")
    return tok


def from_pretrained(path: str | os.PathLike, architecture: Optional[str] = None,
                    num_labels: Optional[int] = None, model_overrides: Optional[dict] = None) -> nn.Module:
    """Build the model a directory describes and load its weights (fp32, eval mode), no DeepSpeed.

    ``architecture=None`` loads what was saved. ``"classification"`` from an MLM directory keeps the
    encoder, drops the MLM head and starts a fresh pooler and classifier with ``num_labels``
    outputs (initialised from torch's global RNG: seed it first). ``model_overrides`` sets
    training-only fields (dropout, attention_dropout) without touching the weights.
    """
    path = Path(path)
    info = load_model_info(path)
    saved = info["architecture"]
    want = architecture or saved
    if want not in ARCHITECTURES:
        raise ConversionError(f"architecture {want!r} is unknown; choose one of {', '.join(ARCHITECTURES)}")
    cfg = read_model_config(path)
    if model_overrides:
        allowed = {"dropout", "attention_dropout", "num_labels"}
        bad = set(model_overrides) - allowed
        if bad:
            raise ConversionError(f"model fields {sorted(bad)} cannot change when loading weights; "
                                  f"only {sorted(allowed)} can (resize n or k with tools/convert.py resize)")
        cfg = config_from_dict({"model": {**to_dict_model(cfg), **model_overrides}}).model
    saved_cfg = cfg
    if saved == "classification":
        saved_cfg = config_from_dict({"model": {**to_dict_model(cfg), "num_labels": len(info.get("labels") or [0, 1])}}).model
    with torch.device("meta"):  # the saved model's keys and shapes, without allocating it
        stored = expected_shapes(build_model(saved_cfg, saved))
    state = load_state(path, expected=stored)
    fix = "the directory is inconsistent; export it again"
    if saved == "classification" and want == "mlm":
        raise ConversionError(f"{path} holds a fine-tuned classifier: it has no MLM head to load")
    if want == "classification":
        labels = info.get("labels")
        if saved == "classification":
            if num_labels is not None and num_labels != len(labels):
                raise ConversionError(f"{path} is a classifier with {len(labels)} labels, not "
                                      f"{num_labels}; fine-tune from the pretrained (MLM) directory")
            num_labels = len(labels)
        elif num_labels is None:
            raise ConversionError(f"{path} holds an MLM model: give num_labels for the new classifier")
        cfg = config_from_dict({"model": {**to_dict_model(cfg), "num_labels": num_labels}}).model
    model = build_model(cfg, want)
    if saved == "mlm" and want == "classification":
        head = {k: state.pop(k) for k in MLM_HEAD_KEYS if k in state}
        if len(head) != len(MLM_HEAD_KEYS):
            raise ConversionError(f"{path}: the MLM head is incomplete ({len(head)} of "
                                  f"{len(MLM_HEAD_KEYS)} keys); {fix}")
        expected = {k: s for k, s in expected_shapes(model).items() if k not in CLASSIFIER_HEAD_KEYS}
        check_state_dict(expected, state, f"{path / WEIGHTS_FILE}", fix)
        fresh = model.state_dict()
        state.update({k: fresh[k] for k in CLASSIFIER_HEAD_KEYS})
    else:
        check_state_dict(expected_shapes(model), state, f"{path / WEIGHTS_FILE}", fix)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()
