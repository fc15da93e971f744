"""Text sources: local files (text, JSONL, Parquet), Hugging Face datasets, and the built-in sample.

A source yields documents (``str``) one at a time, so nothing downstream holds the corpus in memory.
Bad input that can be worked around (undecodable bytes, a line that is not JSON, a row without text,
an empty file) is counted in :class:`SourceStats` with the first place it happened; input that cannot
(a missing path, a missing text column, an unreachable hub) raises :class:`DataError` in one line.
"""

from __future__ import annotations

import ast
import functools
import glob
import gzip
import hashlib
import json
import os
import re
import sys
import sysconfig
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

from linformer_train.data import DataError

if TYPE_CHECKING:  # pragma: no cover
    import datasets

    from linformer_train.config import DataConfig

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
MAX_DOCUMENT_CHARS = 1_000_000
"""A longer document is cut (plain text at a line boundary, any other at a space), so neither one
file without blank lines nor one huge record has to be tokenized whole."""
READ_PIECE_BYTES = 1 << 18
"""Plain-text files are read at most this many bytes at a time: a 100 MB line costs 256 KB."""
MIN_BAD_CHARS = 16
"""A file is judged not UTF-8 only once this many bad characters were seen (a few stray bytes in a
big UTF-8 file are replaced and counted, never fatal)."""
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32-LE"), (b"\x00\x00\xfe\xff", "UTF-32-BE"),
         (b"\xff\xfe", "UTF-16-LE"), (b"\xfe\xff", "UTF-16-BE"))


# --------------------------------------------------------------------------------------------------
# What went wrong on the way (counted, not fatal)
# --------------------------------------------------------------------------------------------------


@dataclass
class SourceStats:
    """Counts a source gathers while it is read; ``first`` names where each problem first appeared."""

    files: int = 0
    empty_files: int = 0
    """Files without a single non-blank document (skipped)."""
    documents: int = 0
    characters: int = 0
    undecodable_lines: int = 0
    """Lines with bytes that are not UTF-8; the bad bytes became U+FFFD and the line was kept."""
    invalid_json_lines: int = 0
    """JSONL lines that are not a JSON object (skipped)."""
    missing_text: int = 0
    """Records whose text field is absent, null or not a string (skipped)."""
    split_documents: int = 0
    """Plain-text documents longer than MAX_DOCUMENT_CHARS, cut at a line boundary."""
    first: dict = field(default_factory=dict)

    def note(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.first.setdefault(kind, where)

    def problems(self) -> dict[str, int]:
        keys = ("empty_files", "undecodable_lines", "invalid_json_lines", "missing_text", "split_documents")
        return {k: getattr(self, k) for k in keys if getattr(self, k)}

    def summary(self) -> str:
        """One line for a CLI: what was read and what was skipped or replaced, with first places."""
        parts = [f"{self.documents:,} documents", f"{self.characters:,} characters"]
        if self.files:
            parts.insert(0, f"{self.files:,} files")
        for kind, count in self.problems().items():
            where = self.first.get(kind)
            parts.append(f"{count:,} {kind.replace('_', ' ')}" + (f" (first: {where})" if where else ""))
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


class Source:
    """A stream of documents plus what identifies it (for reuse checks) and what was skipped."""

    kind: str = ""
    description: str = ""

    def __init__(self, max_documents: Optional[int] = None):
        self.max_documents = max_documents
        self.stats = SourceStats()

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity: equal fingerprints mean the same documents in the same order."""
        raise NotImplementedError

    def _documents(self) -> Iterator[str]:
        raise NotImplementedError

    def documents(self) -> Iterator[str]:
        """Every document once, in a fixed order, stopping at max_documents; resets the stats. A
        document longer than MAX_DOCUMENT_CHARS comes as several (counted as split_documents)."""
        self.stats = SourceStats()
        for whole in self._documents():
            for doc in cut_text(whole):
                if len(doc) < len(whole):
                    self.stats.note("split_documents", f"document {self.stats.documents + 1}")
                self.stats.documents += 1
                self.stats.characters += len(doc)
                yield doc
                if self.max_documents is not None and self.stats.documents >= self.max_documents:
                    return

    def as_dataset(self) -> Optional["datasets.Dataset"]:
        """A map-style ``datasets.Dataset`` with a ``text`` column when the source already is one
        (an HF dataset on disk); None when documents must be streamed from :meth:`documents`."""
        return None


def cut_text(doc: str, limit: Optional[int] = None) -> Iterator[str]:
    """``doc`` cut into pieces of at most ``limit`` characters (MAX_DOCUMENT_CHARS by default), at
    the last newline or space before the limit where there is one."""
    limit = limit or MAX_DOCUMENT_CHARS
    start = 0
    while len(doc) - start > limit:
        end = start + limit
        cut = max(doc.rfind("\n", start + limit // 2, end), doc.rfind(" ", start + limit // 2, end))
        end = cut + 1 if cut > start else end
        yield doc[start:end]
        start = end
    yield doc[start:] if start else doc


def lines(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    """The non-blank lines of every document, stripped, a line longer than ``max_chars`` cut at
    spaces: what a tokenizer trains on (sentencepiece drops an over-long line, so a corpus of one
    huge line would otherwise train on nothing)."""
    for doc in documents:
        for line in doc.splitlines():
            line = line.strip()
            if line:
                yield from cut_text(line, max_chars) if len(line) > max_chars else (line,)


def build_source(cfg: "DataConfig") -> Source:
    """The source named by ``data.source``."""
    if cfg.source == "builtin":
        return BuiltinSource(cfg.max_documents)
    if cfg.source == "files":
        return FileSource(cfg.paths, cfg.format, cfg.text_column, cfg.text_split, cfg.max_documents,
                          cfg.max_bad_char_fraction)
    if cfg.source == "hf":
        return HFSource(cfg.hf_name, cfg.hf_config, cfg.hf_split, cfg.streaming, cfg.paths,
                        cfg.text_column, cfg.max_documents)
    raise DataError(f"data.source={cfg.source!r} is unknown; choose builtin, files or hf")


# --------------------------------------------------------------------------------------------------
# The built-in sample corpus
# --------------------------------------------------------------------------------------------------

BUILTIN_VERSION = 1
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_COMMENT_BLOCK = re.compile(r"(?:^[ \t]*#[^\n]*\n)+", re.M)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources(root: Path) -> Iterator[Path]:
    """Every .py file of the standard library, tests excluded, in a fixed (sorted) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _docstrings(source: bytes) -> list[str]:
    """Module, class and function docstrings of one file, in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old stdlib strings
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return []
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, _DOC_NODES)),
                   key=lambda n: getattr(n, "lineno", 0))
    return [d for n in nodes if (d := ast.get_docstring(n, clean=True))]


def _comment_paragraphs(source: str) -> list[str]:
    """Runs of full-line comments that read as prose (8+ words, mostly alphabetic), not code."""
    out = []
    for block in _COMMENT_BLOCK.finditer(source):
        lines = (re.sub(r"^\s*#+\s?", "", line).strip() for line in block.group(0).splitlines())
        text = " ".join(line for line in lines if line)
        words = text.split()
        if len(words) >= 8 and sum(w.isalpha() for w in words) >= 0.6 * len(words):
            out.append(text)
    return out


@functools.lru_cache(maxsize=1)
def builtin_documents() -> tuple[str, ...]:
    """The built-in sample corpus: English prose that ships with every CPython install.

    In order: the reference-manual topics of ``pydoc_data.topics`` (one document each), then per
    standard-library module (sorted paths, tests excluded) one document of its docstrings and one of
    its prose comment blocks, then IDLE's text files and Python's LICENSE. About 3 MB of text; the
    same on every run of the same Python build.
    """
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics)]
    root = _stdlib_dir()
    for path in _stdlib_sources(root):
        raw = path.read_bytes()
        docs.append("\n\n".join(_docstrings(raw)))
        docs.append("\n\n".join(_comment_paragraphs(raw.decode("utf-8", "replace"))))
    for path in [*sorted((root / "idlelib").glob("*.txt")), root / "LICENSE.txt"]:
        if path.is_file():
            docs.append(path.read_text("utf-8", "replace").strip())
    return tuple(d for d in docs if d.strip())


class BuiltinSource(Source):
    kind = "builtin"

    def __init__(self, max_documents: Optional[int] = None):
        super().__init__(max_documents)
        self.description = (f"builtin sample v{BUILTIN_VERSION}: Python {sys.version.split()[0]} "
                            f"reference topics, stdlib docstrings and comments")

    def fingerprint(self) -> dict[str, Any]:
        # Stat the files the corpus is read from instead of re-reading them: building the corpus
        # parses the whole standard library (~15 s), and every run checks the fingerprint.
        from pydoc_data import topics

        root = _stdlib_dir()
        files = [Path(topics.__file__), *_stdlib_sources(root),
                 *sorted((root / "idlelib").glob("*.txt")), root / "LICENSE.txt"]
        digest = hashlib.sha256()
        for path in files:
            if path.is_file():
                st = path.stat()
                digest.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\0".encode())
        return {"kind": self.kind, "version": BUILTIN_VERSION, "python": sys.version,
                "files_sha256": digest.hexdigest(), "max_documents": self.max_documents}

    def _documents(self) -> Iterator[str]:
        yield from builtin_documents()


# --------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _known(path: Path) -> bool:
    return _base_suffix(path) in (*TEXT_SUFFIXES, *JSONL_SUFFIXES, *PARQUET_SUFFIXES)


def resolve_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by ``data.paths`` (files, globs, directories searched recursively), in order."""
    out: list[Path] = []
    for entry in paths:
        text = os.path.expanduser(str(entry))
        if glob.has_magic(text):
            found = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
            if not found:
                raise DataError(f"data.paths: {text!r} matches no files; check the pattern")
        elif Path(text).is_dir():
            found = sorted(p for p in Path(text).rglob("*")
                           if p.is_file() and _known(p) and not p.name.startswith("."))
            if not found:
                kinds = ", ".join((*TEXT_SUFFIXES, *JSONL_SUFFIXES, *PARQUET_SUFFIXES))
                raise DataError(f"data.paths: directory {text} holds no {kinds} files (.gz allowed); "
                                f"name the files directly")
        elif Path(text).is_file():
            found = [Path(text)]
        else:
            raise DataError(f"data.paths: {text} does not exist; check the path (relative to "
                            f"{Path.cwd()})")
        out.extend(p for p in found if p not in out)
    return out


def file_format(path: Path, fmt: str) -> str:
    """text | jsonl | parquet: ``fmt`` unless it is auto, else by suffix (plain text by default)."""
    if fmt != "auto":
        return fmt
    suffix = _base_suffix(path)
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


class _TextCheck:
    """Counts a file's undecodable and NUL characters; refuses the file once they are too many."""

    def __init__(self, path: Path, max_fraction: float):
        self.path, self.max_fraction = path, max_fraction
        self.total = self.bad = self.nul = 0

    def add(self, text: str) -> None:
        self.total += len(text)
        nul, bad = text.count("\x00"), text.count("\ufffd")
        self.nul += nul
        self.bad += bad + nul
        if self.total >= 1 << 16:  # judged early on a big file, on a fair sample of it
            self.check()

    def check(self) -> None:
        if self.bad >= MIN_BAD_CHARS and self.bad > self.max_fraction * self.total and self.max_fraction < 1.0:
            looks = ("UTF-16 text or binary data" if self.nul * 2 >= self.bad
                     else "another encoding (Latin-1, Windows-1252 ...) or binary data")
            raise DataError(
                f"{self.path}: {self.bad:,} of the first {self.total:,} characters are undecodable bytes or "
                f"NUL ({self.bad / self.total:.1%}); it is not UTF-8 text but looks like {looks}: convert "
                f"it to UTF-8 (iconv -t UTF-8), leave it out of data.paths, or read it anyway with "
                f"data.max_bad_char_fraction=1")


def _decoded_lines(path: Path, stats: SourceStats, max_bad_fraction: float = 1.0) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (gzip by suffix); undecodable bytes become U+FFFD. A line
    longer than READ_PIECE_BYTES comes in pieces (same line number), so memory stays bounded. A file
    with a UTF-16/32 byte-order mark, or with too many undecodable or NUL characters, is refused."""
    import codecs

    opener = gzip.open if path.suffix.lower() == ".gz" else open
    check = _TextCheck(path, max_bad_fraction)
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            for bom, name in _BOMS:
                if head.startswith(bom) and max_bad_fraction < 1.0:
                    raise DataError(f"{path} is {name} text (its first bytes are the {name} byte-order mark); "
                                    f"convert it to UTF-8 (iconv -f {name} -t UTF-8) or leave it out of "
                                    f"data.paths")
            f.seek(0)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            lineno, first, noted = 1, True, False
            while raw := f.readline(READ_PIECE_BYTES):
                ends = raw.endswith(b"\n")
                line = decoder.decode(raw, final=ends)
                if "\ufffd" in line and not noted:
                    stats.note("undecodable_lines", f"{path}:{lineno}")
                    noted = True
                if first and line.startswith("\ufeff"):
                    line = line[1:]
                first = False
                check.add(line)
                yield lineno, line
                if ends:
                    lineno, noted = lineno + 1, False
            tail = decoder.decode(b"", final=True)
            if tail:
                check.add(tail)
            check.check()
            if tail:
                yield lineno, tail
    except (OSError, EOFError) as exc:  # a truncated or fake .gz, a permission problem
        raise DataError(f"{path} cannot be read ({_first_line(exc)}); fix or remove the file") from None


def _whole_lines(path: Path, stats: SourceStats, max_bad_fraction: float) -> Iterator[tuple[int, str]]:
    """Like _decoded_lines, with a long line's pieces joined again (a JSON record must parse whole)."""
    parts: list[str] = []
    current = 0
    for lineno, piece in _decoded_lines(path, stats, max_bad_fraction):
        if lineno != current and parts:
            yield current, "".join(parts)
            parts = []
        current = lineno
        parts.append(piece)
    if parts:
        yield current, "".join(parts)


def _text_documents(path: Path, split: str, stats: SourceStats, max_bad_fraction: float = 1.0) -> Iterator[str]:
    """Documents of a plain-text file: blocks between blank lines (``blank_line``) or single lines
    (``line``); either is cut at a line (or read-piece) boundary before it passes MAX_DOCUMENT_CHARS."""
    lines: list[str] = []
    size, previous = 0, 0

    def flush():
        nonlocal lines, size
        doc = "\n".join(lines).strip() if split == "line" else "\n".join(lines)
        lines, size = [], 0
        return doc

    for lineno, line in _decoded_lines(path, stats, max_bad_fraction):
        continued = lineno == previous and bool(lines)  # the next piece of a line longer than a read
        previous = lineno
        line = line.rstrip("\r\n") if continued else line.rstrip()
        if split == "line" and not continued and lines:
            if doc := flush():
                yield doc
        if line.strip() or (continued and line):
            if lines and size + len(line) + 1 > MAX_DOCUMENT_CHARS:  # cut before it grows too long
                stats.note("split_documents", f"{path}:{lineno}")
                if doc := flush():
                    yield doc
                continued = False
            if continued:
                lines[-1] += line
            else:
                lines.append(line)
            size += len(line) + 1
        elif lines and split != "line":
            yield flush()
    if lines and (doc := flush()):
        yield doc


def _jsonl_documents(path: Path, column: str, stats: SourceStats, max_bad_fraction: float = 1.0) -> Iterator[str]:
    seen_column = False
    for lineno, line in _whole_lines(path, stats, max_bad_fraction):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            stats.note("invalid_json_lines", f"{path}:{lineno}")
            continue
        if not isinstance(record, dict):
            stats.note("invalid_json_lines", f"{path}:{lineno}")
            continue
        if column not in record:
            if not seen_column:
                fields = ", ".join(list(record)[:10]) or "none"
                raise DataError(f"{path}:{lineno} has no field {column!r} (fields: {fields}); set "
                                f"data.text_column to the field that holds the text")
            stats.note("missing_text", f"{path}:{lineno}")
            continue
        seen_column = True
        text = record[column]
        if not isinstance(text, str):
            stats.note("missing_text", f"{path}:{lineno}")
        elif text.strip():
            yield text


def json_records(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSONL file that must be well formed
    (labelled examples, inputs to embed), unlike a corpus, whose bad lines are counted and skipped: a
    line that is not a JSON object is a one-line DataError naming it."""
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{path} line {i} is not valid JSON") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {i} is a JSON {type(record).__name__}, not an object")
        yield i, record


def _parquet_documents(path: Path, column: str, stats: SourceStats) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a readable Parquet file ({_first_line(exc)}); "
                        f"fix it or set data.format") from None
    schema = pf.schema_arrow
    if column not in schema.names:
        raise DataError(f"{path} has no column {column!r} (columns: {', '.join(schema.names)}); "
                        f"set data.text_column to the column that holds the text")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {column!r} holds {kind}, not text; set data.text_column "
                        f"to a string column")
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                stats.note("missing_text", f"{path} row {row}")
            elif text.strip():
                yield text


class FileSource(Source):
    kind = "files"

    def __init__(self, paths: Iterable[str], fmt: str = "auto", text_column: str = "text",
                 text_split: str = "blank_line", max_documents: Optional[int] = None,
                 max_bad_char_fraction: float = 0.01):
        super().__init__(max_documents)
        self.max_bad_char_fraction = max_bad_char_fraction
        if not list(paths):
            raise DataError("data.paths is empty; list files, globs or directories of text")
        self.files = resolve_files(paths)
        self.format, self.text_column, self.text_split = fmt, text_column, text_split
        formats = sorted({file_format(p, fmt) for p in self.files})
        self.description = f"files: {len(self.files)} {'/'.join(formats)} file(s) from " + ", ".join(map(str, paths))

    def fingerprint(self) -> dict[str, Any]:
        files = []
        for p in self.files:
            st = p.stat()
            files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
        return {"kind": self.kind, "files": files, "format": self.format, "text_column": self.text_column,
                "text_split": self.text_split, "max_documents": self.max_documents}

    def _documents(self) -> Iterator[str]:
        for path in self.files:
            self.stats.files += 1
            fmt = file_format(path, self.format)
            if fmt == "jsonl":
                docs = _jsonl_documents(path, self.text_column, self.stats, self.max_bad_char_fraction)
            elif fmt == "parquet":
                docs = _parquet_documents(path, self.text_column, self.stats)
            else:
                docs = _text_documents(path, self.text_split, self.stats, self.max_bad_char_fraction)
            empty = True
            for doc in docs:
                empty = False
                yield doc
            if empty:
                self.stats.note("empty_files", str(path))


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------------


class HFSource(Source):
    """``datasets.load_dataset(name, config, split=..., streaming=..., data_files=paths)``."""

    kind = "hf"

    def __init__(self, name: str, config: Optional[str] = None, split: str = "train",
                 streaming: bool = False, data_files: Iterable[str] = (), text_column: str = "text",
                 max_documents: Optional[int] = None):
        super().__init__(max_documents)
        if not name:
            raise DataError("data.hf_name is unset but data.source=hf; name a dataset (e.g. wikitext)")
        self.name, self.config, self.split, self.streaming = name, config, split, streaming
        self.data_files = resolve_files(data_files) if data_files else []
        self.text_column = text_column
        self._dataset = None
        where = f"{name}" + (f"/{config}" if config else "") + f" split={split}"
        self.description = f"hf: {where}" + (" (streaming)" if streaming else "")

    def load(self):
        """The dataset (cached on this object); one-line DataError on every known failure."""
        if self._dataset is not None:
            return self._dataset
        import datasets

        kwargs: dict[str, Any] = {"split": self.split, "streaming": self.streaming}
        if self.data_files:
            kwargs["data_files"] = [str(p) for p in self.data_files]
        where = f"data.hf_name={self.name!r}" + (f" data.hf_config={self.config!r}" if self.config else "")
        try:
            ds = datasets.load_dataset(self.name, self.config, **kwargs)
        except ConnectionError as exc:
            raise DataError(
                f"{where}: the Hugging Face hub cannot be reached ({_first_line(exc)}); on an offline "
                f"machine download the dataset elsewhere and use data.source=files with "
                f"data.paths=<its text/jsonl/parquet files>, or data.hf_name=<a local dataset directory>"
            ) from None
        except FileNotFoundError as exc:
            raise DataError(f"{where} was found neither on the hub nor on disk ({_first_line(exc)}); "
                            f"check the name, or use data.source=files") from None
        except (ValueError, datasets.exceptions.DatasetsError) as exc:
            raise DataError(f"{where} split={self.split!r}: {_first_line(exc)}") from None
        columns = ds.column_names
        if columns is not None and self.text_column not in columns:
            raise DataError(f"{where} has no column {self.text_column!r} (columns: {', '.join(columns)}); "
                            f"set data.text_column to the column that holds the text")
        self._dataset = ds
        return ds

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {"kind": self.kind, "name": self.name, "config": self.config,
                              "split": self.split, "streaming": self.streaming,
                              "text_column": self.text_column, "max_documents": self.max_documents,
                              "data_files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                                             for p in self.data_files]}
        if not self.streaming:
            fp["dataset_fingerprint"] = getattr(self.load(), "_fingerprint", None)
        return fp

    def _documents(self) -> Iterator[str]:
        ds = self.load()
        checked = ds.column_names is not None
        row = 0
        for batch in ds.iter(batch_size=1000):
            if not checked:  # a streamed dataset may not know its columns before the first row
                if self.text_column not in batch:
                    raise DataError(f"data.hf_name={self.name!r} rows have no field {self.text_column!r} "
                                    f"(fields: {', '.join(batch)}); set data.text_column")
                checked = True
            for text in batch[self.text_column]:
                row += 1
                if not isinstance(text, str):
                    self.stats.note("missing_text", f"{self.name} row {row}")
                elif text.strip():
                    yield text

    def as_dataset(self):
        if self.streaming:
            return None
        ds = self.load().select_columns([self.text_column])
        if self.text_column != "text":
            ds = ds.rename_column(self.text_column, "text")
        if self.max_documents is not None and self.max_documents < len(ds):
            ds = ds.select(range(self.max_documents))
        return ds


# --------------------------------------------------------------------------------------------------
# Command-line flags that name a source (shared by tools/train_tokenizer.py and tools/prepare_data.py)
# --------------------------------------------------------------------------------------------------

SOURCE_FLAGS = {
    "source": ("data.source", "builtin | files | hf"),
    "paths": ("data.paths", "files, globs or directories (source=files), or data_files (source=hf)"),
    "format": ("data.format", "auto | text | jsonl | parquet"),
    "text_column": ("data.text_column", "field or column holding the text"),
    "text_split": ("data.text_split", "plain text documents: blank_line | line"),
    "hf_name": ("data.hf_name", "datasets name, local dataset directory, or builder (json, parquet, text)"),
    "hf_config": ("data.hf_config", "dataset configuration, e.g. wikitext-103-raw-v1"),
    "hf_split": ("data.hf_split", "split to read (default train)"),
    "max_documents": ("data.max_documents", "stop after this many documents"),
}


def add_source_flags(parser) -> None:
    """--source, --paths, --format ... as shortcuts for the data.* config keys."""
    group = parser.add_argument_group("source (shortcuts for data.* keys)")
    for name, (key, text) in SOURCE_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if name == "paths":
            group.add_argument(flag, nargs="+", metavar="PATH", help=text)
        elif name == "max_documents":
            group.add_argument(flag, type=int, metavar="N", help=text)
        else:
            group.add_argument(flag, metavar=name.split("_")[-1].upper(), help=text)
    group.add_argument("--streaming", action="store_true", default=None,
                       help="stream the HF dataset instead of downloading it whole")


def source_overrides(args) -> list[str]:
    """The flags that were given, as key=value overrides (values JSON-quoted for the YAML parser)."""
    out = []
    for name, (key, _) in SOURCE_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    if getattr(args, "streaming", None):
        out.append("data.streaming=true")
    return out
