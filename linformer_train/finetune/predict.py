"""Predict with a fine-tuned model directory, without DeepSpeed: one label per input, in order.

Inputs: a text file (one example per line; for a sentence-pair model the two texts are separated by
a tab), or CSV / TSV / JSONL with the model's text (and pair) columns. Empty lines are examples
too, so output line i always belongs to input line i. The output is written to a temporary file and
renamed when complete.

A text longer than max_length is truncated, or, with ``long_inputs="windows"`` (the default for a
model fine-tuned on windows), split into overlapping windows that run as batch rows; its label is
the argmax of the mean (or max) of its windows' logits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from linformer_train.convert import ConversionError
from linformer_train.convert.model_dir import from_pretrained, load_model_info, tokenizer_file
from linformer_train.data import DataError
from linformer_train.finetune.data import Encoded, collate, encode
from linformer_train.finetune.tasks import Examples, ResolvedTask, file_format, read_file


def _read_lines(path: Path, pair: bool) -> Examples:
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]  # the final newline ends the last line; it does not start another
    if not lines:
        raise DataError(f"{path} is empty; give one input per line")
    texts, pairs = [], [] if pair else None
    for i, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if pair:
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(f"{path} line {i} has {len(parts)} text(s) but the model classifies "
                                f"sentence pairs; give two texts separated by one tab on every line")
            texts.append(parts[0])
            pairs.append(parts[1])
        else:
            texts.append(line)
    return Examples(texts, pairs, None, str(path), list(range(1, len(lines) + 1)))


def read_inputs(path: str | os.PathLike, task: ResolvedTask, fmt: str = "auto") -> Examples:
    path = Path(path)
    kind = file_format(path, fmt) if fmt != "auto" or path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json") \
        else "text"
    if kind == "text":
        return _read_lines(path, task.is_pair)
    return read_file(path, task, kind, labelled=False)


@torch.no_grad()
def predict_file(model_dir: str | os.PathLike, input_path: str | os.PathLike,
                 output_path: str | os.PathLike, batch_size: int = 32, device: str = "cpu",
                 fmt: str = "auto", text_column: Optional[str] = None,
                 pair_column: Optional[str] = None, max_length: Optional[int] = None,
                 long_inputs: Optional[str] = None, window_stride: Optional[int] = None,
                 aggregate: str = "mean") -> int:
    """Write one predicted label per input to ``output_path``; returns the number of inputs.
    ``long_inputs`` None: as the model was fine-tuned (truncate unless it trained on windows)."""
    from linformer_train.data.tokenizer import load_tokenizer
    from linformer_train.paths import check_output_apart

    check_output_apart(output_path, {"the input": input_path, "the model": model_dir}, "--output")

    info = load_model_info(model_dir)
    if info["architecture"] != "classification":
        raise ConversionError(f"{model_dir} is a pretrained MLM model, not a fine-tuned classifier; "
                              f"fine-tune it first (tools/finetune.py train)")
    saved = info.get("task") or {}
    task = ResolvedTask(name=saved.get("name", "custom"),
                        text_column=text_column or saved.get("text_column") or "text",
                        pair_column=pair_column or saved.get("pair_column"),
                        label_column=saved.get("label_column") or "label")
    model = from_pretrained(model_dir).to(device)
    n = model.cfg.max_seq_len
    max_length = max_length or saved.get("max_length") or n
    if max_length > n:
        raise DataError(f"max_length={max_length} exceeds the model's n={n}")
    long_inputs, window_stride = _long_inputs(saved, task, long_inputs, window_stride, aggregate, max_length)
    ex = read_inputs(input_path, task, fmt)
    enc = encode(load_tokenizer(tokenizer_file(model_dir)), ex, max_length, long_inputs=long_inputs,
                 stride=window_stride)
    labels = info["labels"]
    preds = predict_logits(model, enc, batch_size, device, aggregate).argmax(-1).numpy()
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("".join(f"{labels[p]}\n" for p in preds), encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if enc.truncated:
        print(f"note: {enc.truncated} of {len(enc)} inputs were cut to {max_length} tokens", flush=True)
    if enc.windowed:
        print(f"note: {enc.windowed} of {enc.num_docs} inputs were longer than {max_length} tokens and ran as "
              f"{len(enc) - enc.num_docs + enc.windowed} windows ({aggregate} of their logits)", flush=True)
    return enc.num_docs


@torch.no_grad()
def predict_logits(model, enc: Encoded, batch_size: int = 32, device: str = "cpu",
                   aggregate: str = "mean") -> torch.Tensor:
    """Logits (inputs, labels) of a classifier for every input of ``enc``: rows batched by length;
    with windows, the mean or max of each input's window logits."""
    logits = torch.zeros(len(enc), model.cfg.num_labels)
    order = np.argsort(enc.lengths, kind="stable")  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        b = collate(enc, idx)
        logits[idx] = model(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu()
    if enc.doc is None:
        return logits
    from linformer_train.data.windows import aggregate as reduce_windows

    return reduce_windows(logits, enc.doc, enc.num_docs, aggregate)


def _long_inputs(saved: dict, task: ResolvedTask, long_inputs: Optional[str], stride: Optional[int],
                 aggregate: str, max_length: int) -> tuple[str, Optional[int]]:
    """The long-input mode and stride: as given, else as the model was fine-tuned; checked."""
    from linformer_train.data.windows import AGGREGATES, LONG_INPUTS

    if long_inputs is None:
        long_inputs = saved.get("long_inputs") or "truncate"
        stride = stride if stride is not None else saved.get("window_stride")
    if long_inputs not in LONG_INPUTS:
        raise DataError(f"long_inputs={long_inputs!r} is unknown; choose one of {', '.join(LONG_INPUTS)}")
    if aggregate not in AGGREGATES:
        raise DataError(f"aggregate={aggregate!r} is unknown; choose one of {', '.join(AGGREGATES)}")
    if long_inputs == "windows" and task.is_pair:
        raise DataError("windows split single texts, but this model classifies sentence pairs (cut "
                        "longest-first); use --long-inputs truncate")
    if stride is not None and long_inputs != "windows":
        raise DataError(f"a window stride ({stride}) applies only with --long-inputs windows")
    if stride is not None and not 1 <= stride <= max_length - 2:
        raise DataError(f"window stride {stride} must lie in [1, {max_length - 2}] (max_length - 2): a larger "
                        f"stride would skip tokens")
    return long_inputs, stride
