"""The package's layers: a module imports its own unit and the layers below it, never a higher layer
and never another unit of its own layer (so no two units import each other), whether the import runs
at load time, inside a function or under TYPE_CHECKING.

Two checks: every import statement of every module (its syntax tree, so an import inside a function
counts although it runs only when called), and a fresh interpreter that imports the package layer by
layer from the bottom and looks, after each layer, for modules of higher layers that came with it.
"""

from __future__ import annotations

import ast
import json
import sys
import tomllib
from pathlib import Path

from helpers import proc

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "linformer_train"

# (layer, unit, module patterns), bottom first. A pattern names a module and its submodules;
# "=name" names the module alone (a package's __init__). The most specific pattern decides.
UNITS: list[tuple[int, str, list[str]]] = [
    (0, "paths", ["paths"]),
    (0, "serialization", ["serialization"]),
    (1, "config", ["config"]),
    (2, "cli", ["cli"]),                  # the one-line error contract every entry point shares
    (2, "model", ["model"]),
    (2, "data", ["data"]),
    # model directories and resizing them: what the trainer loads for train.init_from and resizes
    # between stages (the convert package's own module holds only ConversionError);
    # transformers' classes wrap the model
    (3, "model directories", ["=convert", "convert.model_dir", "convert.resize"]),
    (3, "hf", ["hf"]),
    (4, "train", ["train"]),
    (5, "convert", ["convert"]),          # DeepSpeed export, resize, warm start, to-hf, ONNX
    (6, "finetune", ["finetune"]),
    (7, "embed", ["embed"]),
    (7, "profiling", ["profiling"]),
    (7, "spectrum", ["spectrum"]),
]


def unit_of(module: str) -> tuple[int, str]:
    """(layer, unit) of a module of the package, by its most specific pattern."""
    name = module.removeprefix(PACKAGE + ".")
    best: tuple[int, int, str] | None = None  # (specificity, layer, unit)
    for layer, unit, patterns in UNITS:
        for p in patterns:
            exact = p.startswith("=")
            p = p.lstrip("=")
            if name == p or (not exact and name.startswith(p + ".")):
                rank = 2 * p.count(".") + (2 if name == p else 1)
                if best is None or rank > best[0]:
                    best = (rank, layer, unit)
    assert best is not None, f"{module} is in no layer of tests/test_layers.py UNITS; place it there"
    return best[1], best[2]


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name, from its files (nothing imported)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    out.pop(PACKAGE)  # the empty top-level __init__
    return out


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import in the file, wherever it sits:
    ``import a.b``, ``from a.b import c`` (c too, when it is a module), relative imports and
    ``importlib.import_module("a.b")``."""
    known = modules()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            names = [base_name] + [f"{base_name}.{a.name}" for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        found += [(name, node.lineno) for name in names if name in known and name != PACKAGE]
    return found


def upward(module: str, imported: str) -> bool:
    """True if ``module`` may not import ``imported``."""
    (layer, unit), (their_layer, their_unit) = unit_of(module), unit_of(imported)
    return unit != their_unit and their_layer >= layer


def test_every_module_has_a_layer():
    for module in modules():
        unit_of(module)  # fails, naming the module, when no pattern covers it


def test_no_import_goes_up_or_sideways():
    bad = []
    for module, path in modules().items():
        for imported, line in imports_of(module, path):
            if upward(module, imported):
                bad.append(f"{path.relative_to(ROOT)}:{line} {module} ({unit_of(module)[1]}, layer "
                           f"{unit_of(module)[0]}) imports {imported} ({unit_of(imported)[1]}, layer "
                           f"{unit_of(imported)[0]})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_scan_sees_imports_inside_functions(tmp_path):
    """The scan counts what runs only when a function is called, relative imports included (the
    circles it exists to catch hid there)."""
    pkg = tmp_path / "config.py"
    pkg.write_text("def rule():\n    from linformer_train.data.tokenizer import SPECIAL_IDS\n"
                   "    from .train import entry\n"
                   "    import importlib\n    importlib.import_module('linformer_train.spectrum')\n")
    found = {name for name, _ in imports_of("linformer_train.config", pkg)}
    assert found == {"linformer_train.data.tokenizer", "linformer_train.train", "linformer_train.train.entry",
                     "linformer_train.spectrum"}
    assert all(upward("linformer_train.config", name) for name in found)
    assert not upward("linformer_train.train.trainer", "linformer_train.convert.model_dir")
    assert upward("linformer_train.convert.model_dir", "linformer_train.convert.export")
    assert upward("linformer_train.model.attention", "linformer_train.data")  # same layer, other unit


CHILD = r"""
import importlib, json, sys
layers = json.loads(sys.argv[1])            # [[module, ...] of layer 0, [...] of layer 1, ...]
layer_of = {m: i for i, mods in enumerate(layers) for m in mods}
out = []
for i, mods in enumerate(layers):
    for m in mods:
        importlib.import_module(m)
    above = sorted(m for m in sys.modules if layer_of.get(m, -1) > i)
    if above:
        out.append([i, above])
print(json.dumps(out))
"""


def test_a_fresh_interpreter_loads_each_layer_without_the_ones_above():
    """Layer by layer from the bottom, in one new process: after importing every module of layers
    0..i, no module of a higher layer may be loaded (whoever imported it was at most at layer i)."""
    layers: dict[int, list[str]] = {}
    for module in modules():
        layers.setdefault(unit_of(module)[0], []).append(module)
    order = [layers[i] for i in sorted(layers)]
    res = proc.run([sys.executable, "-c", CHILD, json.dumps(order)], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded_early = json.loads(res.stdout.strip().splitlines()[-1])
    assert not loaded_early, "; ".join(f"importing layers 0..{i} loaded {', '.join(m)}" for i, m in loaded_early)


def test_the_console_script_names_the_pretraining_entry_point():
    import importlib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["linformer-pretrain"].partition(":")
    assert module == "linformer_train.train.entry"
    assert callable(getattr(importlib.import_module(module), attr))


def test_the_vocabulary_floor_counts_the_tokenizer_specials():
    from linformer_train.config import MIN_VOCAB_SIZE, SPECIAL_TOKENS
    from linformer_train.data.tokenizer import SPECIAL_IDS

    assert SPECIAL_TOKENS == len(SPECIAL_IDS) and MIN_VOCAB_SIZE == len(SPECIAL_IDS) + 256 + 1
