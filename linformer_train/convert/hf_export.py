"""Model directory <-> a transformers directory (``tools/convert.py to-hf`` / ``from-hf``).

``to_hf(MODEL_DIR, OUT)`` writes::

    config.json              LinformerConfig (model_type linformer-train): every model field, labels
    model.safetensors        the model directory's tensors, unchanged (same keys, same dtype)
    tokenizer.json           a fast tokenizer with the model's ids (linformer_train.hf.tokenizer)
    tokenizer_config.json    its special tokens, model_max_length = n
    modules.json, sentence_bert_config.json, 1_Pooling/config.json
                             sentence-transformers: the encoder + mean (or first-token) pooling
    linformer/               the model directory's model_info.json and tokenizer files as they were,
                             and the sha256 of the weights written, for from-hf

After ``import linformer_train.hf`` transformers loads it with the Auto classes (no
``trust_remote_code``, no pickle). ``from_hf(HF_DIR, OUT)`` converts back: the same tensors, the
same config.yaml, and, when the weights are still those to-hf wrote, the original model_info.json
and tokenizer files, so a round trip gives the directory it started from. A model fine-tuned with
transformers (``Trainer.save_model``) converts too: its architecture and labels come from
config.json, its tokenizer from ``linformer/`` (or ``--tokenizer``, or the fast tokenizer beside it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from linformer_train.convert import ConversionError
from linformer_train.convert.model_dir import (INFO_FILE, WEIGHTS_FILE, atomic_output_dir, build_model,
                                               check_output_dir, check_state_dict, expected_shapes,
                                               load_model_info, load_state, read_model_config,
                                               save_pretrained, tokenizer_file)
from linformer_train.data.tokenizer import sha256_file
from linformer_train.serialization import read_json_object

ORIGINAL_DIR = "linformer"
EXPORT_RECORD = "export.json"
HF_CLASSES = {"mlm": "LinformerForMaskedLM", "classification": "LinformerForSequenceClassification"}
POOLING = ("mean", "first")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _import_hf():
    try:
        import linformer_train.hf as hf
    except ImportError as exc:  # transformers (or one of its parts) is missing
        raise ConversionError(f"converting to or from transformers needs the hf extra ({exc}); "
                              f"pip install -e '.[hf]'") from None
    return hf


# --------------------------------------------------------------------------------------------------
# to-hf
# --------------------------------------------------------------------------------------------------


def sentence_transformers_files(out: Path, hidden_size: int, max_seq_len: int, pooling: str) -> None:
    """modules.json, sentence_bert_config.json and 1_Pooling/config.json: the encoder, then pooling
    over real tokens (mean) or the first token (first), as tools/embed.py pools."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_seq_len, "do_lower_case": False}, indent=2) + "\n")
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden_size, "pooling_mode_cls_token": pooling == "first",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True}, indent=2) + "\n")


def to_hf(model_dir: str | os.PathLike, out_dir: str | os.PathLike, pooling: str = "mean",
          overwrite: bool = False) -> Path:
    """Write ``model_dir`` as a transformers directory (see the module docstring)."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    check_output_dir(out_dir, overwrite, {"the model directory": model_dir})
    if pooling not in POOLING:
        raise ConversionError(f"pooling={pooling!r} is unknown; choose one of {', '.join(POOLING)}")
    info = load_model_info(model_dir)
    cfg = read_model_config(model_dir)
    tok_file = tokenizer_file(model_dir)
    hf = _import_hf()
    from linformer_train.hf.tokenizer import hf_tokenizer_for

    arch = info["architecture"]
    labels = info.get("labels") if arch == "classification" else None
    extra = {}
    if labels:
        extra = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    tokenizer = hf_tokenizer_for(tok_file, cfg.max_seq_len)
    config = hf.from_model_config(cfg, architectures=[HF_CLASSES[arch]],
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **extra)
    model_cls = getattr(hf, HF_CLASSES[arch])
    with torch.device("meta"):  # the keys transformers will expect, without allocating the model
        expected = expected_shapes(model_cls(config))
    state = load_state(model_dir, expected=expected)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    config.dtype = DTYPE_NAMES.get(dtypes.pop() if len(dtypes) == 1 else torch.float32, "float32")

    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS_FILE, 0o644)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sentence_transformers_files(tmp, cfg.hidden_size, cfg.max_seq_len, pooling)
        keep = tmp / ORIGINAL_DIR
        keep.mkdir()
        shutil.copyfile(model_dir / INFO_FILE, keep / INFO_FILE)
        from linformer_train.data.tokenizer import load_tokenizer

        for f in load_tokenizer(tok_file).files:
            shutil.copyfile(f, keep / f.name)
        (keep / EXPORT_RECORD).write_text(json.dumps(
            {"weights_sha256": sha256_file(tmp / WEIGHTS_FILE), "tokenizer": tok_file.name}, indent=1) + "\n")
    return Path(out_dir)


# --------------------------------------------------------------------------------------------------
# from-hf
# --------------------------------------------------------------------------------------------------


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards a model.safetensors.index.json names (never outside hf_dir);
    pickled weights (pytorch_model.bin) are refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if (hf_dir / WEIGHTS_FILE).is_file():
        files = [hf_dir / WEIGHTS_FILE]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConversionError(f"{index} is not a safetensors index (no weight_map)") from None
        files = [hf_dir / s for s in shards]
        for f in files:
            if f.resolve().parent != hf_dir.resolve():
                raise ConversionError(f"{index} names {f.name}, outside {hf_dir}; refused")
    elif (hf_dir / "pytorch_model.bin").is_file():
        raise ConversionError(f"{hf_dir} holds pickled weights (pytorch_model.bin) only; save it with "
                              f"safe_serialization (model.save_pretrained(DIR) does by default)")
    else:
        raise ConversionError(f"{hf_dir} has no {WEIGHTS_FILE}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            raise ConversionError(f"{f} cannot be read ({str(exc).splitlines()[0]})") from None
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ConversionError(f"{hf_dir}: {key} holds non-finite values (NaN or inf)")
    return state


def _read_hf_config(hf_dir: Path) -> dict:
    from linformer_train.hf.configuration import MODEL_TYPE

    cfg_file = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} does not exist")
    if not cfg_file.is_file():
        raise ConversionError(f"{hf_dir} is not a transformers model directory (no config.json)")
    raw = read_json_object(cfg_file, ConversionError)
    if raw.get("model_type") != MODEL_TYPE:
        kind = raw.get("model_type")
        hint = (f"; a RoBERTa/BERT model converts with `tools/convert.py warm-start {hf_dir} OUT`"
                if kind else "")
        raise ConversionError(f"{cfg_file} describes a {kind!r} model, not a {MODEL_TYPE!r} one{hint}")
    return raw


def _architecture(raw: dict, cfg_file: Path) -> str:
    names = raw.get("architectures") or ["LinformerForMaskedLM"]
    by_class = {cls: arch for arch, cls in HF_CLASSES.items()}
    if len(names) != 1 or names[0] not in by_class:
        raise ConversionError(f"{cfg_file} names architectures {names}; a model directory holds one of "
                              f"{', '.join(by_class)} (an encoder alone has no head to convert)")
    return by_class[names[0]]


def _hf_tokenizer_source(hf_dir: Path, tokenizer: Optional[str | os.PathLike]) -> Path:
    if tokenizer is not None:
        return Path(tokenizer)
    record = hf_dir / ORIGINAL_DIR / EXPORT_RECORD
    if record.is_file():
        try:
            name = json.loads(record.read_text()).get("tokenizer")
        except (ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name and "/" not in name and (hf_dir / ORIGINAL_DIR / name).is_file():
            return hf_dir / ORIGINAL_DIR / name
    if (hf_dir / "tokenizer.json").is_file():
        return hf_dir / "tokenizer.json"
    raise ConversionError(f"{hf_dir} has no tokenizer (neither {ORIGINAL_DIR}/ nor tokenizer.json); pass "
                          f"--tokenizer (the model's tokenizer.model or tokenizer.json)")


def from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike,
            tokenizer: Optional[str | os.PathLike] = None, overwrite: bool = False) -> Path:
    """Convert a transformers directory of a Linformer (to-hf's, or a model fine-tuned and saved by
    transformers) into a model directory."""
    hf_dir = Path(hf_dir)
    check_output_dir(out_dir, overwrite, {"the transformers directory": hf_dir, "the tokenizer": tokenizer})
    raw = _read_hf_config(hf_dir)
    hf = _import_hf()
    from linformer_train.config import ConfigError

    arch = _architecture(raw, hf_dir / "config.json")
    config = hf.LinformerConfig.from_pretrained(hf_dir)
    try:
        cfg = hf.to_model_config(config)
    except ConfigError as exc:
        raise ConversionError(f"{hf_dir / 'config.json'}: {exc}") from None
    labels = None
    if arch == "classification":
        labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    model = build_model(cfg, arch)
    state = _read_hf_weights(hf_dir)
    check_state_dict(expected_shapes(model), state, f"{hf_dir}", "it was not saved from this config")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    dtype = "bf16" if dtypes == {torch.bfloat16} else "fp32"

    tok = _hf_tokenizer_source(hf_dir, tokenizer)
    original, record = hf_dir / ORIGINAL_DIR / INFO_FILE, hf_dir / ORIGINAL_DIR / EXPORT_RECORD
    task, source = None, {"kind": "transformers", "path": str(hf_dir)}
    if original.is_file() and record.is_file():
        try:
            before = json.loads(original.read_text())
            unchanged = json.loads(record.read_text()).get("weights_sha256") == sha256_file(hf_dir / WEIGHTS_FILE)
        except (ValueError, AttributeError, OSError):
            before, unchanged = {}, False
        if not isinstance(before, dict):
            before = {}
        if unchanged and before.get("architecture") == arch:  # the model to-hf wrote: restore its record
            task, source = before.get("task"), before.get("source") or {}
            labels = before.get("labels") if arch == "classification" else None
        else:  # trained on since: say so, and keep where it came from
            source["base"] = before.get("source")
    return save_pretrained(model, out_dir, tokenizer=tok, dtype=dtype, labels=labels, task=task,
                           source=source, overwrite=overwrite)
