"""The data path keeps its shape: data/pipeline.py calls the steps in order, and the modules below it
do not call each other (read from their syntax trees, imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "linformer_train" / "data"

# module -> the modules of the data package it may import (the package itself, for DataError, always)
ALLOWED = {
    "corpus": set(),
    "tokenizer": set(),
    "prepare": set(),
    "masking": set(),
    "windows": set(),
    "loader": {"masking"},  # the masker is handed in; the loader reads the stream ids and IGNORE_INDEX
    "pipeline": {"corpus", "tokenizer", "prepare", "masking", "loader"},
    "__init__": {"pipeline"},  # the lazy build_training_data attribute
}


def data_imports(path: Path) -> dict[str, int]:
    """Modules of the data package that ``path`` imports, with the first line that does."""
    modules = {p.stem for p in DATA.glob("*.py")} - {"__init__"}
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module if node.level == 0 else f"linformer_train.data.{node.module}"
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["linformer_train", "data"] and len(parts) > 2 and parts[2] in modules:
                found.setdefault(parts[2], node.lineno)
    return found


def test_every_data_module_is_placed():
    assert {p.stem for p in DATA.glob("*.py")} == set(ALLOWED)


def test_only_the_pipeline_calls_the_steps_of_the_data_path():
    wrong = []
    for path in sorted(DATA.glob("*.py")):
        for module, line in data_imports(path).items():
            if module not in ALLOWED[path.stem]:
                wrong.append(f"data/{path.name}:{line} imports data.{module}")
    assert not wrong, "; ".join(wrong) + " (a step calls another: route it through data/pipeline.py)"


def test_the_scan_sees_a_sideways_import(tmp_path):
    """The check itself: an import inside a function, like the one the tokenizer once had, is found."""
    sample = tmp_path / "tokenizer.py"
    sample.write_text("def lines():\n    from linformer_train.data.corpus import cut_text\n"
                      "from linformer_train.data import prepare\n")
    assert data_imports(sample) == {"corpus": 2, "prepare": 3}
