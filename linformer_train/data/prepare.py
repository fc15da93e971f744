"""Prepared sets: tokenize documents in parallel, pack them into n-token blocks on disk, write and
read the manifest. The steps are called in order by ``data.pipeline.ensure_prepared``; this module
takes documents, a tokenizer and counts as arguments and imports neither the sources nor the
tokenizer code.

Layout of a prepared directory::

    manifest.json       counts, n, dtype, tokenizer sha256, source and its fingerprint; written last
    train.bin           uint16 (uint32 past 65,536 pieces) tokens, shape (train_blocks, n), row-major
    validation.bin      the same for held-out documents
    tokenizer/          the tokenizer, when it was trained here (data.tokenizer unset)

The stream of a split is ``doc </s> doc </s> ...``; it is cut into rows of n-1 tokens and every row
gets ``<s>`` in front, so each block is exactly n tokens, starts like a RoBERTa sample, and nothing is
padded. Only the last partial row of each split is dropped (counted in the manifest). A document goes
to validation when a hash of its position falls under ``data.validation_fraction``, so train and
validation share no document.

Memory stays flat as the corpus grows: documents stream into Arrow files of ``CHUNK_BYTES`` of text,
``datasets.map`` tokenizes one chunk at a time in ``num_proc`` processes (which end with their
chunk, so the pages they mapped never accumulate), and the packer reads the token shards record
batch by record batch, without memory-mapping them, and appends to the .bin files. A streamed HF
dataset skips the Arrow files and is encoded by the tokenizer's own threads.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import itertools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from linformer_train.data import DataError
from linformer_train.serialization import read_json_object

if TYPE_CHECKING:  # pragma: no cover
    import datasets

    from linformer_train.config import DataConfig

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "validation")
SPLIT_SEED = 0x5EED
DOC_BATCH = 1000
"""Documents per Arrow record batch and per tokenization call."""
BATCH_BYTES = 8 << 20
"""A record batch of documents is also cut at this many bytes of text, so huge documents stay bounded."""
CHUNK_BYTES = 128 << 20
"""Text tokenized per ``datasets.map`` call: what bounds the memory of preparation."""


# --------------------------------------------------------------------------------------------------
# Reading a prepared set
# --------------------------------------------------------------------------------------------------


class BlockSet:
    """Blocks of one split, read from disk on demand: ``len()``, ``[i] -> (n,)``, ``take(idx) -> (B, n)``.

    Reads use ``pread`` rather than a memory map: a file truncated or rewritten under a running job
    (another process, a full disk) then gives a short read and a DataError naming the file, where a
    map would kill the process with SIGBUS and no message. The page cache serves repeated reads."""

    def __init__(self, path: str | os.PathLike, seq_len: int, dtype: str, num_blocks: int):
        self.path, self.seq_len, self.dtype, self.num_blocks = Path(path), seq_len, dtype, num_blocks
        self.row_bytes = seq_len * np.dtype(dtype).itemsize
        self._fd: Optional[int] = None
        self._pid = -1

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked loader worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __len__(self) -> int:
        return self.num_blocks

    def _read(self, i: int, out: np.ndarray) -> None:
        view = memoryview(out).cast("B")
        got = os.preadv(self._file(), [view], i * self.row_bytes)
        if got != self.row_bytes:
            size = os.fstat(self._file()).st_size
            raise DataError(f"{self.path} ends after {size:,} bytes, but block {i} needs bytes up to "
                            f"{(i + 1) * self.row_bytes:,}: the file was truncated or replaced while in use; "
                            f"restore it (or prepare the data again) and resume")

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.num_blocks <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range for {self.num_blocks} blocks in {self.path}")
        out = np.empty(self.seq_len, dtype=self.dtype)
        self._read(i % self.num_blocks, out)
        return out

    def take(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Blocks at ``indices`` as one (len(indices), n) array."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.seq_len), dtype=self.dtype)
        for row, i in enumerate(indices):
            if not 0 <= i < self.num_blocks:
                raise IndexError(f"block {i} out of range for {self.num_blocks} blocks in {self.path}")
            self._read(int(i), out[row])
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(self.num_blocks))

    def __reduce__(self):  # re-open the file in another process instead of pickling the tokens
        return (BlockSet, (self.path, self.seq_len, self.dtype, self.num_blocks))

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"BlockSet({self.path}, blocks={self.num_blocks}, n={self.seq_len}, dtype={self.dtype})"


@dataclass
class PreparedData:
    """A prepared directory opened for training."""

    root: Path
    manifest: dict
    train: BlockSet
    validation: BlockSet

    @property
    def tokenizer_path(self) -> Path:
        path = Path(self.manifest["tokenizer"]["path"])
        return path if path.is_absolute() else self.root / path

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])


def read_manifest(root: Path) -> Optional[dict]:
    """The manifest of a prepared directory; None when there is none (nothing, or an unfinished set)."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        return None
    return read_json_object(path, DataError, fix=f"the set is damaged, delete {root} and prepare it again")


def open_prepared(prepared_dir: str | os.PathLike, seq_len: int,
                  tokenizer_sha256: Optional[str] = None) -> PreparedData:
    """Open a prepared set; DataError (one line, both values) when it was made for another n or
    another tokenizer, or when its files do not match its manifest."""
    root = Path(prepared_dir)
    manifest = read_manifest(root)
    if manifest is None:
        raise DataError(f"{root} holds no prepared data (no {MANIFEST_FILE}); run tools/prepare_data.py "
                        f"with this config, or let training prepare it")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{root} has format version {manifest.get('format_version')}, this code reads "
                        f"{FORMAT_VERSION}; prepare it again")
    try:  # a hand-edited or damaged manifest: one line, not a KeyError or a numpy TypeError
        prepared_n = manifest["seq_len"]
        have, tok_rel = manifest["tokenizer"]["sha256"], manifest["tokenizer"]["path"]
        itemsize = np.dtype(manifest["dtype"]).itemsize
        splits = {split: (manifest["splits"][split]["file"], manifest["splits"][split]["blocks"])
                  for split in SPLITS}
        for value in (prepared_n, *(blocks for _, blocks in splits.values())):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{value!r} is not a count")
        if not all(isinstance(v, str) for v in (have, tok_rel, *(f for f, _ in splits.values()))):
            raise ValueError("a file name or sha256 is not a string")
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{root / MANIFEST_FILE} is damaged ({type(exc).__name__}: {exc}); delete {root} "
                        f"and prepare it again") from None
    if prepared_n != seq_len:
        raise DataError(f"{root} was prepared with n={prepared_n} but model.max_seq_len={seq_len}; "
                        f"prepare it again for this n (another data.prepared_dir) or train with "
                        f"n={prepared_n}")
    if tokenizer_sha256 is not None and tokenizer_sha256 != have:
        raise DataError(f"{root} was tokenized with tokenizer sha256 {have[:12]} but this run's tokenizer "
                        f"is {tokenizer_sha256[:12]}; use the tokenizer it was prepared with "
                        f"({tok_rel}) or prepare it again")
    sets = {}
    for split, (name, blocks) in splits.items():
        path = root / name
        want = blocks * seq_len * itemsize
        if not path.is_file() or path.stat().st_size != want:
            got = path.stat().st_size if path.is_file() else "no file"
            raise DataError(f"{path} has {got} bytes but the manifest says {want}; the set is damaged, "
                            f"delete {root} and prepare it again")
        sets[split] = BlockSet(path, seq_len, manifest["dtype"], blocks)
    return PreparedData(root, manifest, sets["train"], sets["validation"])


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def _unit_hash(index: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (index + seed) as floats in [0, 1): a fixed coin per document position."""
    z = index.astype(np.uint64) + np.uint64(seed)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def pack_rows(carry: np.ndarray, stream: np.ndarray, seq_len: int, bos_id: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """The packing rule: the token stream ``carry + stream`` cut into rows of n - 1 tokens, each
    block ``<s>`` + one row: (blocks (k, n), the partial row left over for the next stream)."""
    row = seq_len - 1
    buf = np.concatenate([carry, stream]) if carry.size else stream
    k = len(buf) // row
    blocks = np.empty((k, seq_len), buf.dtype)
    blocks[:, 0] = bos_id
    blocks[:, 1:] = buf[: k * row].reshape(k, row)
    return blocks, buf[k * row:].copy()


class _SplitWriter:
    """Appends ``<s>`` + (n-1) stream tokens per block to one .bin file; keeps the partial row."""

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype, bos_id: int):
        self.path, self.seq_len, self.dtype, self.bos_id = path, seq_len, dtype, bos_id
        self.file = open(path, "wb")
        self.carry = np.empty(0, dtype)
        self.blocks = 0
        self.documents = 0

    def write(self, stream: np.ndarray) -> None:
        blocks, self.carry = pack_rows(self.carry, stream.astype(self.dtype, copy=False), self.seq_len,
                                       self.bos_id)
        if len(blocks):
            self.file.write(blocks.tobytes())
            self.blocks += len(blocks)

    def close(self) -> None:
        self.file.close()


class Packer:
    """Documents in, two .bin files of exactly-n blocks out (see the module docstring)."""

    def __init__(self, out_dir: Path, seq_len: int, dtype: np.dtype, validation_fraction: float, *,
                 bos_id: int, eos_id: int, seed: int = SPLIT_SEED, allow_uneven_split: bool = False):
        self.allow_uneven_split = allow_uneven_split
        self.eos_id = eos_id  # the tokenizer's own start/end tokens ([CLS]/[SEP] for a BERT tokenizer)
        if seq_len < 2:
            raise DataError(f"model.max_seq_len={seq_len} is too short: a block holds <s> and at least one token")
        self.seq_len, self.dtype, self.fraction, self.seed = seq_len, dtype, validation_fraction, seed
        self.writers = {s: _SplitWriter(out_dir / f"{s}.bin.tmp", seq_len, dtype, bos_id) for s in SPLITS}
        self.documents = 0
        self.empty_documents = 0
        self.tokens = 0  # document tokens, separators not included

    def add(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """One batch of documents: their tokens concatenated (``values``) and per-document lengths."""
        index = np.arange(self.documents, self.documents + len(lengths), dtype=np.uint64)
        self.documents += len(lengths)
        nonempty = lengths > 0
        self.empty_documents += int((~nonempty).sum())
        self.tokens += int(lengths.sum())
        is_val = _unit_hash(index, self.seed) < self.fraction
        for split, chosen in (("train", nonempty & ~is_val), ("validation", nonempty & is_val)):
            if not chosen.any():
                continue
            picked = values[np.repeat(chosen, lengths)]
            ends = np.cumsum(lengths[chosen])
            stream = np.insert(picked, ends, np.array(self.eos_id, self.dtype))  # doc </s> doc </s> ...
            self.writers[split].write(stream)
            self.writers[split].documents += int(chosen.sum())

    def abort(self) -> None:
        """Close and delete the partial files (an error or an interrupt on the way)."""
        for w in self.writers.values():
            w.close()
            w.path.unlink(missing_ok=True)

    def finish(self, out_dir: Path, describe: str) -> dict[str, Any]:
        """Close the files, guarantee one validation block, move them in place; returns the counts."""
        for w in self.writers.values():
            w.close()
        train, val = self.writers["train"], self.writers["validation"]
        total = self.tokens + train.documents + val.documents  # with separators
        need = 2 * (self.seq_len - 1)
        moved = 0
        if val.blocks == 0 and train.blocks >= 2:
            # Too few held-out documents for a whole block: hold out the last training block instead.
            size = self.seq_len * np.dtype(self.dtype).itemsize
            with open(train.path, "r+b") as f_train, open(val.path, "ab") as f_val:
                f_train.seek(-size, os.SEEK_END)
                f_val.write(f_train.read(size))
                f_train.truncate((train.blocks - 1) * size)
            train.blocks, val.blocks, moved = train.blocks - 1, 1, 1
        blocks = train.blocks + val.blocks
        uneven = blocks >= 2 and (train.blocks == 0 or val.blocks / blocks > self.fraction + 0.25)
        if uneven and (train.blocks == 0 or not self.allow_uneven_split):
            for w in self.writers.values():
                w.path.unlink(missing_ok=True)
            knob = "" if train.blocks == 0 else ", or accept it with data.allow_uneven_split=true"
            raise DataError(f"{describe}: splitting by document put {val.blocks:,} of {blocks:,} blocks "
                            f"({val.blocks / blocks:.0%}) in validation for data.validation_fraction="
                            f"{self.fraction:g}; its {self.documents - self.empty_documents:,} document(s) are "
                            f"too few or too unequal to split by document: use more, shorter documents "
                            f"(data.text_split=line makes one per line){knob}")
        if train.blocks == 0 or val.blocks == 0:
            for w in self.writers.values():
                w.path.unlink(missing_ok=True)
            if self.tokens == 0:
                raise DataError(f"{describe} has no text (0 tokens); check data.source, data.paths and "
                                f"data.text_column")
            raise DataError(f"{describe} gives {total:,} tokens, fewer than the ~{need:,} needed for two "
                            f"blocks of n={self.seq_len} (one to train, one to validate); add text or "
                            f"lower model.max_seq_len")
        for split, w in self.writers.items():
            w.path.replace(out_dir / f"{split}.bin")
        dropped = int(train.carry.size + val.carry.size)
        return {
            "documents": {"read": self.documents, "empty_skipped": self.empty_documents,
                          "train": train.documents, "validation": val.documents},
            "tokens": {"documents": self.tokens, "separators": train.documents + val.documents,
                       "dropped_tail": dropped, "bos": train.blocks + val.blocks},
            "splits": {split: {"file": f"{split}.bin", "blocks": w.blocks, "tokens": w.blocks * self.seq_len}
                       for split, w in self.writers.items()},
            "validation_blocks_from_train_tail": moved,
        }


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


class _EncodeBatch:
    """The function ``datasets.map`` runs in each worker; the tokenizer pickles as its path, so each
    worker process loads it once."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, batch: dict) -> dict:
        texts = [t if isinstance(t, str) else "" for t in batch["text"]]
        return {"ids": self.tok.encode(texts)}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, uint32 beyond 65,536 pieces."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@contextlib.contextmanager
def scratch_dir(out_dir: Path) -> Iterator[Path]:
    """``out_dir/.work``, empty, for the chunk files of one preparation; removed afterwards."""
    work = out_dir / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _document_batches(documents: Iterable[str]) -> Iterator[tuple[list[str], int]]:
    """Documents in lists of DOC_BATCH, or fewer once they hold BATCH_BYTES characters, each with
    its character count: the unit of an Arrow record batch and of a streamed encoding call."""
    batch: list[str] = []
    size = 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if len(batch) >= DOC_BATCH or size >= BATCH_BYTES:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def document_chunks(documents: Iterable[str], work: Path) -> Iterator["datasets.Dataset"]:
    """Documents as a series of Arrow files of about CHUNK_BYTES of text each, each opened as a
    ``datasets.Dataset`` and deleted once the consumer asks for the next one."""
    import datasets
    import pyarrow as pa

    schema = pa.schema([("text", pa.large_string())])
    batches = _document_batches(documents)  # shared by the chunks: each takes up to CHUNK_BYTES of it
    for index in itertools.count():
        path = work / f"documents-{index:05d}.arrow"
        written = 0
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch, size in batches:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())], schema=schema))
                written += size
                if written >= CHUNK_BYTES:
                    break
        if written == 0:
            path.unlink()
            return
        yield datasets.Dataset.from_file(str(path))
        path.unlink()


def dataset_chunks(ds: "datasets.Dataset") -> Iterator["datasets.Dataset"]:
    """Contiguous row ranges of a map-style dataset holding about CHUNK_BYTES of text each."""
    per_row = max(1, ds.data.nbytes // max(1, len(ds)))
    rows = max(DOC_BATCH, CHUNK_BYTES // per_row)
    for start in range(0, len(ds), rows):
        yield ds.select(range(start, min(start + rows, len(ds))))


def _token_batches_from_arrow(files: Sequence[str], dtype: np.dtype) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(values, lengths) per record batch of datasets.map's output, read without memory-mapping
    (mapped pages would count in RSS and grow with the corpus)."""
    import pyarrow as pa

    for name in files:
        with pa.OSFile(name, "rb") as f:
            reader = pa.ipc.open_stream(f)
            for batch in reader:
                ids = batch.column(0)
                offsets = ids.offsets.to_numpy()
                values = ids.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
                yield values.astype(dtype, copy=False), np.diff(offsets).astype(np.int64)


def tokenize_streamed(documents: Iterable[str], tok, dtype: np.dtype,
                      num_threads: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(values, lengths) per batch of streamed documents, encoded with the tokenizer's threads."""
    for batch, _ in _document_batches(documents):
        ids = tok.encode(batch, num_threads=num_threads)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        values = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
        yield values, lengths


def tokenize_chunks(chunks: Iterator["datasets.Dataset"], tok, dtype: np.dtype, num_proc: int, work: Path,
                    key: str, timings: dict[str, float]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(values, lengths) of every chunk, tokenized by ``datasets.map`` in ``num_proc`` processes;
    adds the seconds spent reading and tokenizing to ``timings``.

    One chunk at a time: its worker processes end and its memory maps close before the next chunk
    starts, so the pages they touched never add up across the corpus (peak memory stays flat).
    """
    import datasets

    feature = datasets.Value("uint16" if dtype == np.uint16 else "uint32")
    chunk_iter = iter(chunks)
    for index in itertools.count():
        t0 = time.perf_counter()
        ds = next(chunk_iter, None)
        timings["read"] = timings.get("read", 0.0) + time.perf_counter() - t0
        if ds is None:
            return
        t0 = time.perf_counter()
        procs = num_proc if len(ds) >= 2 * DOC_BATCH else 1  # a process for a handful of rows costs more
        tokenized = ds.map(
            _EncodeBatch(tok), batched=True, batch_size=DOC_BATCH, num_proc=procs,
            remove_columns=ds.column_names, features=datasets.Features({"ids": datasets.List(feature)}),
            cache_file_name=str(work / f"tokens-{index:05d}.arrow"), load_from_cache_file=False,
            new_fingerprint=f"{key[:16]}-{index}", desc=f"tokenizing chunk {index} ({procs} proc)")
        files = [c["filename"] for c in tokenized.cache_files]
        del ds, tokenized  # close the maps
        timings["tokenize"] = timings.get("tokenize", 0.0) + time.perf_counter() - t0
        yield from _token_batches_from_arrow(files, dtype)
        for name in files:
            Path(name).unlink(missing_ok=True)


def pack(batches: Iterable[tuple[np.ndarray, np.ndarray]], out_dir: Path, seq_len: int, dtype: np.dtype,
         cfg: "DataConfig", special_ids: dict[str, int], describe: str,
         timings: dict[str, float]) -> dict[str, Any]:
    """Token batches -> train.bin and validation.bin in ``out_dir``; the counts for the manifest,
    with the seconds of each step (``timings`` as the tokenizers left it, plus packing)."""
    packer = Packer(out_dir, seq_len, dtype, cfg.validation_fraction, bos_id=special_ids["bos"],
                    eos_id=special_ids["eos"], allow_uneven_split=cfg.allow_uneven_split)
    try:
        t0 = time.perf_counter()
        for values, lengths in batches:
            packer.add(values, lengths)
        total = time.perf_counter() - t0
        if "tokenize" in timings:
            timings["pack"] = total - timings["read"] - timings["tokenize"]
        else:  # streamed: reading, encoding and packing interleave
            timings["read_tokenize_pack"] = total
        counts = packer.finish(out_dir, describe)
    except BaseException:
        packer.abort()
        raise
    counts["dtype"] = dtype.name
    counts["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    return counts


# --------------------------------------------------------------------------------------------------
# The directory and its manifest
# --------------------------------------------------------------------------------------------------


def prepared_dir_for(cfg: "DataConfig", run_dir: str | os.PathLike) -> Path:
    """``data.prepared_dir``, or ``<run_dir>/data`` when unset."""
    return Path(cfg.prepared_dir) if cfg.prepared_dir else Path(run_dir) / "data"


@contextlib.contextmanager
def locked(root: Path):
    """One preparer per directory at a time (two runs sharing data.prepared_dir wait for each other)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def manifest_inputs(seq_len: int, validation_fraction: float, tokenizer_sha256: str,
                    source_fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What decides whether a set can be reused, as it reads back from the manifest."""
    inputs = {"format_version": FORMAT_VERSION, "seq_len": int(seq_len),
              "validation_fraction": float(validation_fraction), "split_seed": SPLIT_SEED,
              "tokenizer_sha256": tokenizer_sha256, "source": source_fingerprint}
    return json.loads(json.dumps(inputs))  # tuples -> lists, as they read back


def clear(out_dir: Path) -> None:
    """Remove a set's manifest first (it marks the set complete), then its blocks."""
    for name in (MANIFEST_FILE, "train.bin", "validation.bin"):
        (out_dir / name).unlink(missing_ok=True)


def write_manifest(out_dir: Path, inputs: dict[str, Any], source: dict[str, Any], tokenizer: dict[str, Any],
                   counts: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Write manifest.json atomically (last: its presence marks a complete set); returns it.

    ``source`` holds the description and the bad-input counts, ``tokenizer`` its path (relative to
    the set when inside it), sha256, vocabulary and special ids, ``counts`` what :func:`pack` returned."""
    import datasets
    import sentencepiece

    manifest = {
        "format_version": FORMAT_VERSION,
        "inputs": inputs,
        "seq_len": inputs["seq_len"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "tokenizer": tokenizer,
        **counts,
        "tokens_per_second": round((counts["tokens"]["documents"]) / max(seconds, 1e-9)),
        "total_seconds": round(seconds, 2),
        "versions": {"python": sys.version.split()[0], "datasets": datasets.__version__,
                     "sentencepiece": sentencepiece.__version__, "numpy": np.__version__},
    }
    tmp = out_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out_dir / MANIFEST_FILE)
    return manifest


def summarize(manifest: dict) -> str:
    """A few lines about a prepared set, for CLIs and logs."""
    tr, va = manifest["splits"]["train"], manifest["splits"]["validation"]
    docs, toks = manifest["documents"], manifest["tokens"]
    lines = [
        f"source: {manifest['source']['description']}",
        f"tokenizer: {manifest['tokenizer']['path']} ({manifest['tokenizer']['vocab_size']} pieces, "
        f"sha256 {manifest['tokenizer']['sha256'][:12]})",
        f"documents: {docs['read']:,} read, {docs['train']:,} train, {docs['validation']:,} validation, "
        f"{docs['empty_skipped']:,} empty skipped",
        f"tokens: {toks['documents']:,} in documents, {toks['dropped_tail']:,} dropped in partial last "
        f"blocks; {manifest['tokens_per_second']:,} tokens/s",
        f"blocks of n={manifest['seq_len']}: {tr['blocks']:,} train, {va['blocks']:,} validation "
        f"({manifest['dtype']})",
    ]
    problems = {k: v for k, v in manifest["source"]["stats"].items()
                if k in ("empty_files", "undecodable_lines", "invalid_json_lines", "missing_text",
                         "split_documents") and v}
    if problems:
        first = manifest["source"]["stats"].get("first", {})
        lines.append("bad input: " + ", ".join(
            f"{v:,} {k.replace('_', ' ')}" + (f" (first: {first[k]})" if k in first else "")
            for k, v in problems.items()))
    return "\n".join(lines)
