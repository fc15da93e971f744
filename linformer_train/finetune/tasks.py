"""Classification tasks: presets (GLUE SST-2, QNLI, QQP and IMDB through ``datasets``) and local
CSV / TSV (GLUE layout) / JSONL files with configurable text, pair and label columns.

Labels are strings (a label 1 in a file and a ClassLabel 1 from the hub are both "1"); their order
is ``task.labels`` or the sorted training labels. A label at evaluation that training never saw is
an error that names it, the file and the line.
"""

from __future__ import annotations

import csv
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from linformer_train.data import DataError
from linformer_train.data.corpus import json_records


@dataclass(frozen=True)
class Preset:
    hf_name: str
    hf_config: Optional[str]
    text_column: str
    pair_column: Optional[str]
    label_column: str
    train_split: str
    eval_split: str
    label_aliases: tuple = ()
    """Other names of the label column in the task's downloadable files (QQP's TSV: is_duplicate)."""


PRESETS: dict[str, Preset] = {
    "sst2": Preset("nyu-mll/glue", "sst2", "sentence", None, "label", "train", "validation"),
    "imdb": Preset("stanfordnlp/imdb", None, "text", None, "label", "train", "test"),
    "qnli": Preset("nyu-mll/glue", "qnli", "question", "sentence", "label", "train", "validation"),
    "qqp": Preset("nyu-mll/glue", "qqp", "question1", "question2", "label", "train", "validation",
                  label_aliases=("is_duplicate",)),
}


@dataclass
class ResolvedTask:
    """A TaskConfig with the preset's defaults filled in."""

    name: str
    text_column: str
    pair_column: Optional[str]
    label_column: str
    label_aliases: tuple = ()
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "validation"

    @property
    def is_pair(self) -> bool:
        return self.pair_column is not None

    def describe(self) -> dict:
        return {"name": self.name, "text_column": self.text_column, "pair_column": self.pair_column,
                "label_column": self.label_column}


def resolve_task(task) -> ResolvedTask:
    """Fill what ``task`` leaves unset from its preset (or the plain defaults)."""
    preset = PRESETS.get(task.preset) if task.preset else None

    def pick(name: str, default):
        mine = getattr(task, name)
        if mine is not None:
            return mine
        return getattr(preset, name) if preset is not None else default

    return ResolvedTask(
        name=task.preset or "custom",
        text_column=pick("text_column", "text"),
        pair_column=pick("pair_column", None),
        label_column=pick("label_column", "label"),
        label_aliases=preset.label_aliases if preset is not None and task.label_column is None else (),
        hf_name=pick("hf_name", None),
        hf_config=pick("hf_config", None),
        train_split=pick("train_split", "train"),
        eval_split=pick("eval_split", "validation"),
    )


@dataclass
class Examples:
    """Texts (and second texts) with string labels (None when unlabelled) and their origins."""

    texts: list[str]
    pairs: Optional[list[str]]
    labels: Optional[list[str]]
    where: str
    lines: list[int] = field(default_factory=list)
    """1-based line (or row) of each example in its file, for error messages."""

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, count: Optional[int]) -> "Examples":
        if count is None or count >= len(self):
            return self
        return Examples(self.texts[:count], self.pairs[:count] if self.pairs is not None else None,
                        self.labels[:count] if self.labels is not None else None, self.where,
                        self.lines[:count])


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------


def file_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    formats = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "text"}
    if suffix not in formats:
        raise DataError(f"cannot tell the format of {path} from its suffix; use .csv, .tsv, .jsonl "
                        f"or set task.format")
    return formats[suffix]


def read_rows(path: Path, fmt: str, skip_bad_rows: bool = False) -> tuple[list[dict], list[int], list[str]]:
    """(rows as dicts, their 1-based lines, the column names) of a CSV, TSV or JSONL file."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    rows, lines, skipped = [], [], 0
    if fmt in ("csv", "tsv"):
        csv.field_size_limit(sys.maxsize)
        with open(path, newline="", encoding="utf-8") as f:
            # GLUE's TSVs hold unbalanced quotes: read them with no quoting at all
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(f)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path} is empty; a header row naming the columns comes first")
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    if skip_bad_rows:
                        skipped += 1
                        continue
                    raise DataError(f"{path} line {reader.line_num} has {len(row)} fields but the header "
                                    f"has {len(header)}; fix the row or set task.skip_bad_rows=true")
                rows.append(dict(zip(header, row)))
                lines.append(reader.line_num)
        columns = header
    elif fmt == "jsonl":
        columns: list[str] = []
        with open(path, encoding="utf-8") as f:
            for i, obj in json_records(path, f):
                for k in obj:
                    if k not in columns:
                        columns.append(k)
                rows.append(obj)
                lines.append(i)
    else:
        raise DataError(f"{path}: format {fmt!r} cannot hold columns; use csv, tsv or jsonl")
    if skipped:
        print(f"{path}: skipped {skipped} malformed row(s)", file=sys.stderr, flush=True)
    return rows, lines, columns


def _column(name: str, columns: list[str], path, role: str, task: ResolvedTask,
            aliases: tuple = ()) -> str:
    if name in columns:
        return name
    for alias in aliases:
        if alias in columns:
            return alias
    have = ", ".join(columns) or "none"
    if role == "pair":
        raise DataError(f"task {task.name} is a sentence-pair task (task.pair_column={name!r}) but {path} "
                        f"has no column {name!r} (columns: {have}); give both text columns, or unset "
                        f"task.pair_column for a single-sentence task")
    raise DataError(f"{path} has no {role} column {name!r} (columns: {have}); set task.{role}_column")


def _text(value, path, line: int, column: str) -> str:
    if value is None:
        raise DataError(f"{path} line {line}: column {column!r} is empty")
    return value if isinstance(value, str) else str(value)


def _label(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def examples_from_rows(rows: list[dict], lines: list[int], columns: list[str], where: str,
                       task: ResolvedTask, labelled: bool = True) -> Examples:
    text_col = _column(task.text_column, columns, where, "text", task)
    pair_col = _column(task.pair_column, columns, where, "pair", task) if task.is_pair else None
    label_col = _column(task.label_column, columns, where, "label", task, task.label_aliases) if labelled else None
    texts, pairs, labels = [], [] if pair_col else None, [] if labelled else None
    for row, line in zip(rows, lines):
        texts.append(_text(row.get(text_col), where, line, text_col))
        if pair_col:
            pairs.append(_text(row.get(pair_col), where, line, pair_col))
        if labelled:
            value = row.get(label_col)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(f"{where} line {line} has no label in column {label_col!r}")
            labels.append(_label(value))
    return Examples(texts, pairs, labels, where, list(lines))


def read_file(path: str | Path, task: ResolvedTask, fmt: str = "auto", labelled: bool = True,
              skip_bad_rows: bool = False) -> Examples:
    path = Path(path)
    rows, lines, columns = read_rows(path, file_format(path, fmt), skip_bad_rows)
    if not rows:
        raise DataError(f"{path} holds no examples")
    return examples_from_rows(rows, lines, columns, str(path), task, labelled)


def read_hf(task: ResolvedTask, split: str) -> Examples:
    """A split of a datasets hub task (or a local dataset directory); offline: one line and a hint."""
    import logging

    import datasets

    where = f"{task.hf_name}" + (f"/{task.hf_config}" if task.hf_config else "") + f" [{split}]"
    for name in ("datasets", "huggingface_hub", "fsspec"):  # the retry chatter of an offline hub
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        if Path(task.hf_name).is_dir() and (Path(task.hf_name) / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(task.hf_name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(task.hf_name, task.hf_config, split=split)
    except Exception as exc:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot load {where} ({first[:160]}); offline? download it where the hub is reachable "
            f"(datasets cache or save_to_disk) or pass local files: task.train_file=... "
            f"task.eval_file=... (CSV, GLUE TSV or JSONL)") from None
    columns = list(ds.column_names)
    rows = ds.to_list()
    features = ds.features
    label_col = task.label_column
    names = getattr(features.get(label_col), "names", None)
    if names is not None:  # ClassLabel: keep the integer, as the GLUE TSVs write it
        for r in rows:
            if r.get(label_col) is not None and r[label_col] < 0:
                raise DataError(f"{where} has unlabelled rows (label -1, e.g. a GLUE test split); "
                                f"evaluate on a labelled split (task.eval_split)")
    return examples_from_rows(rows, list(range(1, len(rows) + 1)), columns, where, task)


def load_split(task_cfg, task: ResolvedTask, which: str) -> Examples:
    """The train or eval examples of a task, capped by task.max_*_examples."""
    path = task_cfg.train_file if which == "train" else task_cfg.eval_file
    cap = task_cfg.max_train_examples if which == "train" else task_cfg.max_eval_examples
    if path is not None:
        ex = read_file(path, task, task_cfg.format, skip_bad_rows=task_cfg.skip_bad_rows)
    else:
        ex = read_hf(task, task.train_split if which == "train" else task.eval_split)
    return ex.head(cap)


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------


def _sort_key(label: str):
    return (0, float(label), label) if re.fullmatch(r"-?\d+(\.\d+)?", label) else (1, 0.0, label)


def build_label_list(train: Examples, configured: Optional[list]) -> list[str]:
    seen = sorted(set(train.labels), key=_sort_key)
    if configured is None:
        if len(seen) < 2:
            raise DataError(f"{train.where} has a single label ({seen[0]!r}); a classifier needs at least two")
        return seen
    labels = [str(x) for x in configured]
    extra = [x for x in seen if x not in labels]
    if extra:
        raise DataError(f"{train.where} has label(s) {extra[:3]} missing from task.labels={labels}")
    return labels


def label_ids(ex: Examples, labels: list[str]) -> list[int]:
    """Labels as indices; DataError naming the first label outside ``labels``."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for i, label in enumerate(ex.labels):
        if label not in index:
            line = ex.lines[i] if i < len(ex.lines) else i + 1
            raise DataError(f"{ex.where} line {line} has label {label!r}, which training never saw "
                            f"(labels: {', '.join(labels)}); fix the file or list every label in task.labels")
        out.append(index[label])
    return out
