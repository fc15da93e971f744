"""The measurement's inputs: a model (model directory or DeepSpeed checkpoint) and n-token samples
from prepared blocks or from text, packed as the data pipeline packs them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from torch import nn

from linformer_train.data.prepare import pack_rows
from linformer_train.spectrum.result import SpectrumError



def evenly_spaced(count: int, available: int) -> np.ndarray:
    """``count`` indices spread evenly over range(available) (all of them if fewer)."""
    if available <= 0:
        return np.zeros(0, dtype=np.int64)
    if count >= available:
        return np.arange(available)
    return np.unique(np.linspace(0, available - 1, count).round().astype(np.int64))


def packed_blocks(token_lists: Iterable[Sequence[int]], seq_len: int, bos: int, eos: int
                  ) -> Iterator[np.ndarray]:
    """Documents packed by the data pipeline's own rule (``data.prepare.pack_rows``): a stream
    ``doc </s> doc </s> ...`` cut into rows of n - 1 tokens, each block ``<s>`` + one row. The tail
    that fills no block is dropped; empty documents are skipped."""
    carry = np.empty(0, dtype=np.int64)
    for ids in token_lists:
        if len(ids) == 0:
            continue
        stream = np.append(np.asarray(ids, dtype=np.int64), np.int64(eos))
        blocks, carry = pack_rows(carry, stream, seq_len, bos)
        yield from blocks


def reservoir(blocks: Iterable[np.ndarray], count: int, seed: int) -> list[np.ndarray]:
    """A uniform sample of ``count`` blocks from a stream (Algorithm R), kept in stream order."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, np.ndarray]] = []
    for i, block in enumerate(blocks):
        if len(kept) < count:
            kept.append((i, block))
        else:
            j = int(rng.integers(0, i + 1))
            if j < count:
                kept[j] = (i, block)
    return [b for _, b in sorted(kept, key=lambda t: t[0])]



@dataclass
class LoadedModel:
    model: nn.Module
    model_cfg: "object"                # linformer_train.config.ModelConfig
    tokenizer_path: Optional[Path]
    description: str


def _is_deepspeed_checkpoint(path: Path) -> bool:
    """A run directory (checkpoints/), a checkpoints directory (latest, step_*) or one step_* tag."""
    return ((path / "checkpoints").is_dir() or (path / "latest").is_file()
            or any(path.glob("step_*")) or any(path.glob("*model_states.pt")))


def load_model(path: str | Path) -> LoadedModel:
    """A model directory (``save_pretrained``: model.safetensors + config.yaml + tokenizer, also a
    RoBERTa warm start) or a run's DeepSpeed checkpoint (a run directory, its checkpoints/ or one
    step directory; read in memory through the conversion library), in eval mode on CPU."""
    from linformer_train.convert import ConversionError

    path = Path(path).expanduser()
    if not path.exists():
        raise SpectrumError(f"model {path} does not exist; pass a model directory (tools/convert.py) "
                            f"or a run's checkpoint directory")
    if not path.is_dir():
        raise SpectrumError(f"model {path} is not a directory; pass a model directory or a run's "
                            f"checkpoint directory")
    try:
        if (path / "model.safetensors").is_file():
            from linformer_train.convert import model_dir

            model = model_dir.from_pretrained(path)
            tok = path / model_dir.TOKENIZER_FILE
            return LoadedModel(model.eval(), model.cfg, tok if tok.is_file() else None,
                               f"model directory {path}")
        if _is_deepspeed_checkpoint(path):
            return _load_deepspeed(path)
    except ConversionError as exc:
        raise SpectrumError(str(exc)) from None
    raise SpectrumError(f"{path} is neither a model directory (no model.safetensors) nor a DeepSpeed "
                        f"checkpoint (no checkpoints/, latest or step_*); convert it with tools/convert.py")


def _load_deepspeed(path: Path) -> LoadedModel:
    """The fp32 weights of a DeepSpeed checkpoint (any ZeRO stage) in a model, without writing a
    model directory; the tokenizer is the run's (its prepared data or data.tokenizer)."""
    from linformer_train.config import config_from_dict
    from linformer_train.convert import ConversionError, export, model_dir

    state, client, step_dir = export.read_checkpoint(path)
    if not isinstance(client.get("config"), dict):
        raise SpectrumError(f"{step_dir} carries no linformer-train config; it was not saved by this "
                            f"project's trainer")
    cfg = config_from_dict(client["config"])
    model = model_dir.build_model(cfg.model, client.get("architecture", "mlm"))
    model_dir.check_state_dict(model_dir.expected_shapes(model), state, f"checkpoint {step_dir}",
                               "export it with the code that wrote it")
    model.load_state_dict(state, strict=True)
    try:
        tok: Optional[Path] = export.find_tokenizer(cfg, step_dir)
    except ConversionError:  # text data then needs --tokenizer; prepared data names its own
        tok = None
    return LoadedModel(model.eval(), cfg.model, tok,
                       f"DeepSpeed checkpoint {step_dir} (step {client.get('step')})")


def load_samples(sources: Sequence[str], seq_len: int, count: int, tokenizer_path: Optional[Path],
                 split: str = "validation", seed: int = 0, max_tokens: int = 5_000_000
                 ) -> tuple[list[np.ndarray], str, Optional[Path]]:
    """``count`` sequences of exactly ``seq_len`` tokens and a description of where they came from.

    ``sources``: one prepared directory (its ``split``, blocks spread evenly; cut to the first n
    tokens when prepared for a longer n), ``builtin`` (the built-in sample corpus), or text files,
    globs and directories (text, JSONL, Parquet). Text is tokenized with ``tokenizer_path`` (the
    model's) and packed like the data pipeline packs it; blocks are drawn uniformly (reservoir) from
    the first ``max_tokens`` tokens. Returns (samples, description, tokenizer used)."""
    from linformer_train.data import DataError

    if count < 1:
        raise SpectrumError(f"--samples {count} must be at least 1")
    try:
        if len(sources) == 1 and Path(sources[0]).is_dir() and _is_prepared(Path(sources[0])):
            return _prepared_samples(Path(sources[0]), seq_len, count, split, tokenizer_path)
        return _text_samples(sources, seq_len, count, tokenizer_path, seed, max_tokens)
    except DataError as exc:
        raise SpectrumError(str(exc)) from None


def _is_prepared(path: Path) -> bool:
    from linformer_train.data.prepare import MANIFEST_FILE

    return (path / MANIFEST_FILE).is_file()


def _prepared_samples(root: Path, seq_len: int, count: int, split: str,
                      tokenizer_path: Optional[Path]):
    from linformer_train.data.prepare import MANIFEST_FILE, open_prepared
    from linformer_train.data.tokenizer import load_tokenizer

    manifest = json.loads((root / MANIFEST_FILE).read_text())
    block_len = int(manifest["seq_len"])
    if seq_len > block_len:
        raise SpectrumError(f"{root} holds blocks of n={block_len} but -n {seq_len} was asked; "
                            f"measure at n <= {block_len} or prepare the data for n={seq_len}")
    prepared = open_prepared(root, block_len)
    if tokenizer_path is not None:
        want = load_tokenizer(tokenizer_path).sha256
        have = manifest["tokenizer"]["sha256"]
        if want != have:
            raise SpectrumError(f"{root} was tokenized with tokenizer {have[:12]} but the model's is "
                                f"{want[:12]} ({tokenizer_path}); prepare the data with the model's "
                                f"tokenizer")
    if split not in ("train", "validation"):
        raise SpectrumError(f"--split {split!r} must be train or validation")
    blocks = prepared.train if split == "train" else prepared.validation
    idx = evenly_spaced(count, len(blocks))
    samples = [np.asarray(blocks[int(i)][:seq_len], dtype=np.int64) for i in idx]
    desc = f"prepared {root} ({split}: {len(samples)} of {len(blocks)} blocks, evenly spaced)"
    return samples, desc, prepared.tokenizer_path


def _text_samples(sources: Sequence[str], seq_len: int, count: int, tokenizer_path: Optional[Path],
                  seed: int, max_tokens: int):
    from linformer_train.config import DataConfig
    from linformer_train.data.corpus import build_source
    from linformer_train.data.tokenizer import load_tokenizer

    if tokenizer_path is None:
        raise SpectrumError("text data needs a tokenizer and the model has none; pass --tokenizer "
                            "(a tokenizer.model or its directory)")
    tok = load_tokenizer(tokenizer_path)
    if list(sources) == ["builtin"]:
        cfg = DataConfig(source="builtin")
    else:
        cfg = DataConfig(source="files", paths=list(sources))
    source = build_source(cfg)

    def token_lists():  # documents tokenized 64 at a time, until max_tokens have been read
        seen, batch = 0, []
        for doc in source.documents():
            batch.append(doc)
            if len(batch) == 64:
                for ids in tok.encode(batch):
                    seen += len(ids) + 1
                    yield ids
                batch = []
                if seen >= max_tokens:
                    return
        yield from tok.encode(batch) if batch else ()

    samples = reservoir(packed_blocks(token_lists(), seq_len, tok.special_ids["bos"], tok.special_ids["eos"]),
                        count, seed)
    if not samples:
        raise SpectrumError(f"{source.description} holds fewer than {seq_len} tokens; give more text "
                            f"or a smaller -n")
    desc = f"{source.description}: {len(samples)} blocks of n={seq_len}, uniform over the first " \
           f"{max_tokens:,} tokens (seed {seed})"
    return samples, desc, tok.path
