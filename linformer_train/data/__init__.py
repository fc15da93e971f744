"""Data pipeline: text sources -> sentencepiece tokens -> packed n-token blocks -> masked MLM batches.

Modules, in the order data flows through them:

- ``corpus``    sources: local files (text, JSONL, Parquet), Hugging Face datasets, the built-in sample
- ``tokenizer`` sentencepiece training and loading with fixed special ids (<pad> <s> </s> <unk> <mask>)
- ``prepare``   parallel tokenization, packing into n-token blocks on disk, the manifest, opening a set
- ``masking``   dynamic MLM masking, a pure function of (seed, epoch, sample index)
- ``loader``    rank-aware, resumable loader with background prefetch
- ``pipeline``  the steps in order, and nothing else: ``ensure_prepared`` (source -> tokenizer ->
  tokenize -> pack -> manifest, or reuse) and ``build_training_data`` (-> masker -> loader)

Only ``pipeline`` calls the others: corpus, tokenizer and prepare import nothing from each other,
and the loader is given its masker (it imports only masking's constants).

This package's import is light (no torch, no datasets): the CLIs import :class:`DataError` from here
to recognise a user's mistake.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or a mismatch between data artefacts; the message is one line: what, where,
    and how to fix it."""


def __getattr__(name: str):
    # The trainer's entry point, imported lazily so that `import linformer_train.data` stays cheap.
    if name in ("build_training_data", "TrainingData"):
        from linformer_train.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataError", "build_training_data", "TrainingData"]
