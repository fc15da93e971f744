"""One vector per document from a model directory's encoder (``tools/embed.py``).

Input: a text file (one document per line; empty lines are documents too), JSONL or Parquet (a
text column). Output: ``.npy`` (float32, (documents, hidden_size)) or ``.parquet`` (an
``embedding`` column of fixed-size float32 lists, plus the input's ``--id-column`` when named), in
input order, written under a temporary name and renamed when complete.

Pooling: ``mean`` over the real tokens (the attention mask: ``<s>`` and ``</s>`` included, as
sentence-transformers' mean pooling counts them) or ``first`` (the ``<s>`` state). A document
longer than the model's n runs as overlapping windows of n tokens (linformer_train.data.windows;
``long_inputs=truncate`` keeps its head instead), and its vector is the mean of its windows'
vectors. Rows (windows) are sorted by length and batched, so a batch carries little padding; the
model's outputs at real positions do not depend on padding. On a GPU the forward runs under bf16
autocast by default. A progress bar counts documents; the summary line gives documents/s and
tokens/s.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from linformer_train.data import DataError
from linformer_train.data.corpus import json_records

POOLING = ("mean", "first")
FORMATS = ("auto", "text", "jsonl", "parquet")


# --------------------------------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------------------------------


def input_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


def read_documents(path: str | os.PathLike, fmt: str = "auto", text_column: str = "text",
                   id_column: Optional[str] = None) -> tuple[list[str], Optional[list]]:
    """(texts, ids): every document of ``path`` in order; ids from ``id_column`` when named."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    kind = input_format(path, fmt)
    if kind not in FORMATS[1:]:
        raise DataError(f"input format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if id_column is not None and kind == "text":
        raise DataError("--id-column needs JSONL or Parquet input (a text file has no columns)")
    if kind == "parquet":
        return _read_parquet(path, text_column, id_column)
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); convert it first") from None
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]  # the final newline ends the last line; it does not start another
    if kind == "text":
        if not lines:
            raise DataError(f"{path} is empty; give one document per line")
        return [line.rstrip("\r") for line in lines], None
    texts, ids = [], [] if id_column else None
    for i, row in json_records(path, lines):
        if not isinstance(row.get(text_column), str):
            raise DataError(f"{path} line {i} has no text in column {text_column!r} (--text-column)")
        texts.append(row[text_column])
        if ids is not None:
            if id_column not in row:
                raise DataError(f"{path} line {i} has no column {id_column!r} (--id-column)")
            ids.append(row[id_column])
    if not texts:
        raise DataError(f"{path} holds no documents")
    return texts, ids


def _read_parquet(path: Path, text_column: str, id_column: Optional[str]):
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow's ArrowInvalid and friends
        raise DataError(f"{path} is not a Parquet file ({str(exc).splitlines()[0][:120]})") from None
    for col, flag in ((text_column, "--text-column"), (id_column, "--id-column")):
        if col is not None and col not in names:
            raise DataError(f"{path} has no column {col!r} ({flag}); it has {', '.join(names)}")
    table = pq.read_table(path, columns=[c for c in (text_column, id_column) if c is not None])
    texts = table.column(text_column).to_pylist()
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(f"{path} row {bad} has no text in column {text_column!r} (null or not a string)")
    if not texts:
        raise DataError(f"{path} holds no documents")
    return texts, table.column(id_column).to_pylist() if id_column else None


# --------------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, D) states -> (B, D): the mean over real tokens, or the first token's state."""
    if pooling == "first":
        return hidden[:, 0]
    m = mask.to(hidden.dtype).unsqueeze(-1)                          # (B, L, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 autocast on a GPU that has it, fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class Embedder:
    """A model directory's encoder with its tokenizer, ready to embed texts."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", dtype: Optional[str] = None):
        from linformer_train.convert.model_dir import from_pretrained, tokenizer_file
        from linformer_train.data.tokenizer import load_tokenizer

        self.device = torch.device(device)
        self.encoder = from_pretrained(model_dir).encoder.to(self.device).eval()
        self.tokenizer = load_tokenizer(tokenizer_file(model_dir))
        self.n = self.encoder.cfg.max_seq_len
        self.hidden_size = self.encoder.cfg.hidden_size
        dtypes = {None: default_dtype(self.device), "fp32": torch.float32, "bf16": torch.bfloat16}
        if dtype not in dtypes:
            raise DataError(f"dtype {dtype!r} is unknown; choose fp32 or bf16")
        self.dtype = dtypes[dtype]

    @torch.no_grad()
    def embed(self, texts: Sequence[str], pooling: str = "mean", long_inputs: str = "windows",
              stride: Optional[int] = None, batch_size: int = 32, max_length: Optional[int] = None,
              progress: bool = False) -> tuple[np.ndarray, dict]:
        """(vectors (N, D) float32, stats) for ``texts``, in order."""
        from linformer_train.data.windows import LONG_INPUTS, aggregate
        from linformer_train.finetune.data import collate, encode
        from linformer_train.finetune.tasks import Examples

        if pooling not in POOLING:
            raise DataError(f"pooling {pooling!r} is unknown; choose one of {', '.join(POOLING)}")
        if long_inputs not in LONG_INPUTS:
            raise DataError(f"long_inputs {long_inputs!r} is unknown; choose one of {', '.join(LONG_INPUTS)}")
        max_length = max_length or self.n
        if not 3 <= max_length <= self.n:
            raise DataError(f"max_length={max_length} must lie in [3, n={self.n}]")
        if stride is not None and not 1 <= stride <= max_length - 2:
            raise DataError(f"window stride {stride} must lie in [1, {max_length - 2}] (max_length - 2): a "
                            f"larger stride would skip tokens")
        if batch_size < 1:
            raise DataError(f"batch size {batch_size} must be positive")
        t0 = time.perf_counter()
        ex = Examples(list(texts), None, None, "input", list(range(1, len(texts) + 1)))
        enc = encode(self.tokenizer, ex, max_length, long_inputs=long_inputs, stride=stride)
        doc = enc.doc if enc.doc is not None else np.arange(len(enc))
        rows = torch.zeros(len(enc), self.hidden_size)
        order = np.argsort(enc.lengths, kind="stable")  # similar lengths together: little padding
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        bar = _Progress(len(texts), progress)
        left = np.bincount(doc, minlength=len(texts))  # rows still to run, per document
        done_docs = int((left == 0).sum())
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                b = collate(enc, idx)
                ids, mask = b["input_ids"].to(self.device), b["attention_mask"].to(self.device)
                with autocast:
                    hidden = self.encoder(ids, mask)                 # (B, L, D)
                rows[idx] = pool(hidden.float(), mask, pooling).cpu()
                np.subtract.at(left, doc[idx], 1)
                done_docs += int((left[np.unique(doc[idx])] == 0).sum())
                bar.update(done_docs, int(enc.lengths[order[:start + len(idx)]].sum()))
        finally:
            bar.close()
        vectors = aggregate(rows, doc, len(texts)) if enc.doc is not None else rows
        seconds = time.perf_counter() - t0
        tokens = int(enc.lengths.sum())
        stats = {"documents": len(texts), "rows": len(enc), "windowed": enc.windowed, "truncated": enc.truncated,
                 "tokens": tokens, "seconds": round(seconds, 3),
                 "documents_per_s": round(len(texts) / max(seconds, 1e-9), 1),
                 "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
                 "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}
        return vectors.numpy().astype(np.float32), stats


class _Progress:
    """Documents done and tokens/s on stderr (rich), or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.progress = None
        self.t0 = time.perf_counter()
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                 console=Console(file=sys.stderr), transient=False)
        self.task = self.progress.add_task("embed", total=total, rate="")
        self.progress.start()

    def update(self, docs: int, tokens: int) -> None:
        if self.progress is not None:
            rate = tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.progress.update(self.task, completed=docs, rate=f"{rate:,.0f} tokens/s")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def write_vectors(path: Path, vectors: np.ndarray, ids: Optional[list] = None, id_column: str = "id") -> None:
    """``vectors`` to .npy or .parquet, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix.lower() == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, vectors)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            flat = pa.array(vectors.reshape(-1), type=pa.float32())
            columns = {"embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])}
            if ids is not None:
                columns = {id_column: pa.array(ids), **columns}
            pq.write_table(pa.table(columns), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def embed_file(model_dir: str | os.PathLike, input_path: str | os.PathLike, output_path: str | os.PathLike,
               pooling: str = "mean", long_inputs: str = "windows", stride: Optional[int] = None,
               batch_size: int = 32, device: str = "cpu", dtype: Optional[str] = None, fmt: str = "auto",
               text_column: str = "text", id_column: Optional[str] = None, max_length: Optional[int] = None,
               progress: bool = True) -> dict:
    """Embed every document of ``input_path`` into ``output_path``; returns the run's stats."""
    from linformer_train.paths import check_output_apart

    out = Path(output_path)
    if out.suffix.lower() not in (".npy", ".parquet"):
        raise DataError(f"output {out} must end in .npy or .parquet")
    check_output_apart(out, {"the input": input_path, "the model": model_dir}, "--output")
    if out.is_dir():
        raise DataError(f"output {out} is a directory; name the file to write")
    texts, ids = read_documents(input_path, fmt, text_column, id_column)
    embedder = Embedder(model_dir, device, dtype)
    vectors, stats = embedder.embed(texts, pooling, long_inputs, stride, batch_size, max_length, progress)
    write_vectors(out, vectors, ids, id_column or "id")
    return stats


# --------------------------------------------------------------------------------------------------
# Command line (tools/embed.py)
# --------------------------------------------------------------------------------------------------


def embed_main(argv: Sequence[str]) -> int:
    from linformer_train.cli import make_parser

    parser = make_parser("embed", "One vector per document from a model directory's encoder.")
    parser.add_argument("--model", required=True, help="a model directory (MLM or fine-tuned classifier)")
    parser.add_argument("--input", required=True, help=".txt (one document per line), .jsonl or .parquet")
    parser.add_argument("--output", required=True, help=".npy (float32 matrix) or .parquet (embedding column)")
    parser.add_argument("--pooling", choices=POOLING, default="mean",
                        help="mean over real tokens or the first (<s>) token (default: mean)")
    parser.add_argument("--long-inputs", choices=("windows", "truncate"), default="windows",
                        help="a document longer than n: overlapping windows whose vectors are averaged, or "
                             "its first n tokens (default: windows)")
    parser.add_argument("--window-stride", type=int, help="tokens between window starts (default: half a window)")
    parser.add_argument("--max-length", type=int, help="tokens per row, specials included (default: the model's n)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward, sorted by length (default: 32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="default: bf16 autocast on a GPU, fp32 on CPU")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="input format (default: by suffix)")
    parser.add_argument("--text-column", default="text", help="JSONL/Parquet column holding the text (default: text)")
    parser.add_argument("--id-column", help="JSONL/Parquet column copied next to each vector (Parquet output)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.id_column and not args.output.lower().endswith(".parquet"):
        raise DataError("--id-column needs a .parquet output (a .npy file holds the vectors only)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    stats = embed_file(args.model, args.input, args.output, args.pooling, args.long_inputs, args.window_stride,
                       args.batch_size, args.device, args.dtype, args.format, args.text_column, args.id_column,
                       args.max_length, progress=not args.no_progress)
    windows = f", {stats['rows']} rows ({stats['windowed']} documents as windows)" if stats["windowed"] else ""
    print(f"wrote {stats['documents']} vectors to {args.output}{windows}: {stats['tokens']:,} tokens in "
          f"{stats['seconds']:.2f} s, {stats['documents_per_s']:,.1f} documents/s, "
          f"{stats['tokens_per_s']:,.0f} tokens/s ({stats['device']}, {stats['dtype']})", flush=True)
    return 0
