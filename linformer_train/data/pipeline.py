"""The data path, in order: source -> tokenizer -> tokenize -> pack -> manifest -> loader.

``ensure_prepared`` makes (or reuses) a prepared set, ``build_training_data`` opens one for the
trainer. Each step is one call into the module that owns it (``corpus``, ``tokenizer``,
``prepare``, ``masking``, ``loader``); corpus, tokenizer and prepare never import each other and the
loader is handed its masker, so what happens to the data can be read here, top to bottom.
Preparing imports no torch: the masking and loader modules are imported by ``build_training_data``
only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np

from linformer_train.data import DataError, prepare
from linformer_train.data.corpus import Source, build_source, lines
from linformer_train.data.tokenizer import (MAX_SENTENCE_CHARS, MODEL_FILE, HFTokenizer, Tokenizer,
                                            load_tokenizer, model_path, read_meta, train_sentencepiece,
                                            training_spec)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from linformer_train.config import DataConfig, ModelConfig, TrainConfig
    from linformer_train.data.loader import MLMLoader
    from linformer_train.data.masking import MLMMasker

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Preparing a set
# --------------------------------------------------------------------------------------------------


def train_tokenizer(cfg: "DataConfig", out_dir: str | os.PathLike, vocab_size: int,
                    source: Optional[Source] = None) -> Path:
    """Train a sentencepiece tokenizer on the lines of ``data``'s source (or ``source``) into
    ``out_dir`` (see :func:`tokenizer.train_sentencepiece`); returns the .model file."""
    source = source or build_source(cfg)
    return train_sentencepiece(lines(source.documents(), MAX_SENTENCE_CHARS), out_dir, vocab_size, cfg,
                               source.description, source.fingerprint())


def ensure_prepared(cfg: "DataConfig", seq_len: int, run_dir: str | os.PathLike, vocab_size: int,
                    overwrite: bool = False, reserved: Sequence[str | os.PathLike] = ()) -> Path:
    """Prepare ``data`` for blocks of ``seq_len`` tokens, or reuse an identical earlier preparation.

    Trains the tokenizer when ``data.tokenizer`` is unset or missing (vocabulary
    ``data.tokenizer_vocab_size`` or ``vocab_size``), tokenizes, packs, splits and writes the manifest.
    Identical inputs (source fingerprint, n, validation fraction, tokenizer sha256) reuse the set; a
    directory prepared from other inputs is refused, naming the first difference, unless
    ``overwrite``. A ``data.paths`` file inside the prepared folder or a ``reserved`` one (the run
    folder of a training run) is refused. Call it on one rank; returns the prepared directory.
    """
    out = prepare.prepared_dir_for(cfg, run_dir)
    # 1. source
    source = build_source(cfg)
    _refuse_own_outputs(source, {"the prepared-data folder": out, **{"the run folder": r for r in reserved}})
    with prepare.locked(out):
        manifest = prepare.read_manifest(out)
        # 2. tokenizer: the configured one, the one trained here before, or a new one
        train_vocab = int(cfg.tokenizer_vocab_size or vocab_size)
        tok_path, retrain = _tokenizer_for(cfg, out, source, train_vocab)
        if manifest is not None and retrain and not overwrite:
            raise DataError(f"{out} was prepared with tokenizer {manifest['tokenizer']['sha256'][:12]} but "
                            f"this config trains a new one ({retrain}); delete {out}, prepare with "
                            f"--overwrite, or set data.prepared_dir to another directory")
        tok_seconds = None
        if retrain:
            log.info("tokenizer: training a %s tokenizer of %s pieces on %s (%s) ...", cfg.tokenizer_type,
                     f"{train_vocab:,}", source.description, retrain)
            t0 = time.perf_counter()
            train_tokenizer(cfg, tok_path, train_vocab, source=source)
            tok_seconds = time.perf_counter() - t0
            log.info("tokenizer: trained in %.1f s -> %s", tok_seconds, tok_path)
        tok = load_tokenizer(tok_path)
        if tok.vocab_size > vocab_size:
            raise DataError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but model.vocab_size="
                            f"{vocab_size}; raise model.vocab_size to at least {tok.vocab_size} or use a "
                            f"smaller tokenizer")
        # reuse what is there when it was made from the same inputs; refuse to replace what was not
        inputs = prepare.manifest_inputs(seq_len, cfg.validation_fraction, tok.sha256, source.fingerprint())
        if manifest is not None:
            if manifest.get("inputs") == inputs:
                prepare.open_prepared(out, seq_len, tok.sha256)  # files intact?
                log.info("data: reusing the set prepared in %s (same source, n and tokenizer)", out)
                return out
            if not overwrite:
                raise DataError(f"{out} holds data prepared from other inputs "
                                f"({_first_difference(manifest.get('inputs', {}), inputs)}); delete it, "
                                f"prepare with --overwrite, or set data.prepared_dir to another directory")
        prepare.clear(out)
        log.info("data: tokenizing and packing %s into blocks of n=%d -> %s ...", source.description, seq_len, out)
        t0 = time.perf_counter()
        dtype = prepare.token_dtype(tok.vocab_size)
        timings: dict[str, float] = {}
        with prepare.scratch_dir(out) as work:
            # 3. tokenize
            key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
            batches = _token_batches(source, tok, cfg, dtype, work, key, timings)
            # 4. pack
            counts = prepare.pack(batches, out, seq_len, dtype, cfg, tok.special_ids, source.description, timings)
        seconds = time.perf_counter() - t0
        # 5. manifest
        prepare.write_manifest(
            out, inputs,
            source={"description": source.description, "stats": source.stats.as_dict()},
            tokenizer={"path": _relative_to(tok.path, out), "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                       "special_ids": tok.special_ids,
                       "trained_seconds": round(tok_seconds, 2) if tok_seconds is not None else None},
            counts=counts, seconds=seconds)
        log.info("data: packed %s tokens into %s train / %s validation blocks in %.1f s",
                 f"{counts['tokens']['documents']:,}", f"{counts['splits']['train']['blocks']:,}",
                 f"{counts['splits']['validation']['blocks']:,}", seconds)
        return out


def _refuse_own_outputs(source: Source, folders: dict[str, str | os.PathLike]) -> None:
    """A ``data.paths`` pattern that reaches into the run's own folders would train on checkpoints,
    logs and packed blocks (and change under itself): refuse it, naming the first such file."""
    from linformer_train.paths import overlap

    for path in getattr(source, "files", ()):
        for name, folder in folders.items():
            if overlap(path, folder) in ("is", "is inside"):
                raise DataError(f"data.paths matches {path}, inside {name} {folder}: the run would read its "
                                f"own output; narrow the pattern or move the corpus out of {folder}")


def _tokenizer_for(cfg: "DataConfig", out: Path, source: Source, vocab_size: int) -> tuple[Path, Optional[str]]:
    """Where the tokenizer lives and, when it has to be (re)trained, why (None when it can be used)."""
    if cfg.tokenizer:
        path = model_path(cfg.tokenizer)
        if path.is_file():
            return path, None
    else:
        path = out / "tokenizer" / MODEL_FILE
    if not path.is_file():
        return path, f"{path} does not exist yet"
    meta = read_meta(path)
    want = {"trained_with": training_spec(cfg, vocab_size), "source_fingerprint": source.fingerprint()}
    have = {k: meta.get(k) for k in want}
    if have != json.loads(json.dumps(want)):
        return path, f"tokenizer settings changed ({_first_difference(have, want)})"
    return path, None


def _token_batches(source: Source, tok, cfg: "DataConfig", dtype: np.dtype, work: Path, key: str,
                   timings: dict[str, float]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The source's documents as (token values, document lengths) batches, by the route that keeps
    memory flat for that kind of source."""
    ds = source.as_dataset()
    if ds is not None:  # an HF dataset already on disk: datasets.map over chunks of its rows
        return prepare.tokenize_chunks(prepare.dataset_chunks(ds), tok, dtype, cfg.num_proc, work, key, timings)
    if source.kind == "hf":  # a streamed HF dataset: never on disk whole; the tokenizer's threads
        return prepare.tokenize_streamed(source.documents(), tok, dtype, cfg.num_proc)
    # local files, builtin: chunks of documents through Arrow files, then datasets.map
    return prepare.tokenize_chunks(prepare.document_chunks(source.documents(), work), tok, dtype,
                                   cfg.num_proc, work, key, timings)


def _relative_to(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (a set moved elsewhere keeps its tokenizer)."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _first_difference(old: dict, new: dict) -> str:
    a, b = _flatten(old), _flatten(new)
    for key in [*b, *(k for k in a if k not in b)]:
        if a.get(key) != b.get(key):
            show = lambda v: (s if len(s := json.dumps(v)) <= 70 else s[:67] + "...")  # noqa: E731
            return f"{key}: {show(a.get(key))} -> {show(b.get(key))}"
    return "nothing"


# --------------------------------------------------------------------------------------------------
# What the trainer builds
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """Everything the trainer reads data through."""

    prepared: prepare.PreparedData
    tokenizer: "Tokenizer | HFTokenizer"
    masker: "MLMMasker"
    train_loader: "MLMLoader"
    micro_batch_size: int
    rank: int
    world_size: int

    def eval_batches(self, num_batches: int) -> Iterator[dict[str, "torch.Tensor"]]:
        """Deterministic validation batches (see :func:`loader.validation_batches`)."""
        from linformer_train.data.loader import validation_batches

        return validation_batches(self.prepared.validation, self.masker, self.micro_batch_size,
                                  num_batches, self.rank, self.world_size)

    def close(self) -> None:
        self.train_loader.close()


def build_training_data(data: "DataConfig", model: "ModelConfig", train: "TrainConfig",
                        run_dir: str | Path, rank: int = 0, world_size: int = 1) -> TrainingData:
    """Prepare (rank 0) or reuse the data, open it, check it against the model, build the loader."""
    import torch

    from linformer_train.data.loader import MLMLoader
    from linformer_train.data.masking import MLMMasker

    root = _prepare_on_rank0(data, model, Path(run_dir), rank, world_size)
    prepared = prepare.open_prepared(root, model.max_seq_len)
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    prepare.open_prepared(root, model.max_seq_len, tokenizer.sha256)  # the tokenizer on disk is the one used
    if tokenizer.vocab_size > model.vocab_size:
        raise DataError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but model.vocab_size="
                        f"{model.vocab_size}; raise model.vocab_size to at least {tokenizer.vocab_size}")
    pad = tokenizer.special_ids["pad"]
    if model.pad_token_id != pad:
        raise DataError(f"model.pad_token_id={model.pad_token_id} but the tokenizer pads with id {pad}; "
                        f"set model.pad_token_id={pad}")
    masker = MLMMasker(data.mask_prob, data.mask_replace_prob, data.mask_random_prob,
                       tokenizer.vocab_size, tokenizer.special_ids,
                       tokenizer.word_start if data.whole_word_masking else None, seed=train.seed)
    loader = MLMLoader(prepared.train, masker, train.micro_batch_size, rank, world_size, train.seed,
                       prefetch=data.prefetch_batches, pin_memory=torch.cuda.is_available())
    return TrainingData(prepared, tokenizer, masker, loader, train.micro_batch_size, rank, world_size)


def _prepare_on_rank0(data: "DataConfig", model: "ModelConfig", run_dir: Path, rank: int,
                      world_size: int) -> Path:
    """Rank 0 prepares, the others wait; a failure on rank 0 reaches every rank as a DataError."""
    result: list[Any] = [None]
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            result[0] = str(ensure_prepared(data, model.max_seq_len, run_dir, model.vocab_size,
                                            reserved=(run_dir,)))
        except BaseException as exc:  # tell the other ranks before raising, or they wait forever
            if isinstance(exc, OSError):  # a full disk or read-only folder: one line, not a trace
                where = f" ({exc.filename})" if exc.filename else ""
                exc = DataError(f"preparing the data failed writing{where}: {exc.strerror or exc}; free space "
                                f"or set data.prepared_dir to a writable folder")
            error = exc
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            result[0] = DataError(f"rank 0 could not prepare the data: {first}")
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(result, src=0)
    if error is not None:
        raise error from None
    if isinstance(result[0], BaseException):
        raise result[0]
    return Path(result[0])
