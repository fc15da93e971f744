#!/usr/bin/env python
"""Mutation testing of the model (linformer_train/model/) and the trainer's LR schedule with mutmut.

Not part of the test suite: every mutant runs against the tests that reach it, which takes tens of
minutes on two cores. One process, a fast subset of the tests:

    pip install mutmut==3.8.1
    nice -n 15 python benchmarks/mutation.py                  # -> runs/mutation/summary.json, survivors.txt

The checkout's package, tests, configs and pyproject.toml are copied into ``<out>/work``; mutmut
writes its ``mutants/`` there, never into the checkout (``--fresh`` removes it first). mutmut forks
each mutant's test run from its own process (ten times faster here than its fork server); the rare
child that inherits a lock held by another of its threads waits on it until mutmut's wall-clock
limit. That limit is first 4x the tests' own time (mutmut's default is 15x), so such a wait costs
seconds; the mutants that hit it are run again under 15x, and only what times out there too is
reported as a timeout. The score is killed / (killed + survived + timeout + suspicious); mutants
no test reaches are counted apart (``no tests``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# what is mutated: the whole model package, and of the trainer the LR schedule (its loss
# normalisation runs only inside a DeepSpeed engine, reached by end-to-end runs of minutes each)
FILES = ["linformer_train/model/*.py", "linformer_train/train/trainer.py"]
MUTANTS = ["linformer_train.model.*", "linformer_train.train.trainer.x_lr_at__mutmut_*"]

# the tests that exercise that code in seconds; the slow ones (a training curve, a fine-tuning run,
# torch.compile) are left out
TESTS = ["tests/test_model.py", "tests/test_memory_floor.py", "tests/test_short_text.py",
         "tests/test_long_inputs.py", "tests/test_mfu.py", "tests/test_train_units.py"]
DESELECT = "not compiled and not learns_short_texts and not finetuning_on_windows and not crash_at_every"

CONFIG = """
[tool.mutmut]
source_paths = ["linformer_train"]
also_copy = ["configs"]
only_mutate = {files}
pytest_add_cli_args_test_selection = {tests}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-k", "{deselect}"]
use_git_change_detection = false
timeout_multiplier = {multiplier}
"""


def copy_checkout(work: Path, multiplier: float = 4.0) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("linformer_train", "tests", "configs"):
        if (work / name).exists():
            shutil.rmtree(work / name)
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    tests = [t for t in TESTS if (ROOT / t).is_file()]
    text = (ROOT / "pyproject.toml").read_text()
    (work / "pyproject.toml").write_text(text + CONFIG.format(files=json.dumps(FILES), tests=json.dumps(tests),
                                                              deselect=DESELECT, multiplier=multiplier))


def results(work: Path, env: dict) -> dict[str, str]:
    out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=work, env=env, capture_output=True,
                         text=True, check=True).stdout
    status = {}
    for line in out.splitlines():
        name, sep, state = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            status[name] = state
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "mutation")
    parser.add_argument("--fresh", action="store_true", help="start from an empty work folder")
    args = parser.parse_args()
    if shutil.which("mutmut") is None:
        print("error: mutmut is not installed; pip install mutmut==3.8.1", file=sys.stderr)
        return 2
    work = args.out / "work"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    copy_checkout(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    start = time.time()
    run = subprocess.run(["mutmut", "run", "--max-children", "1", *MUTANTS], cwd=work, env=env)
    status = results(work, env)
    timeouts = sorted(n for n, s in status.items() if s == "timeout")
    if run.returncode == 0 and timeouts:
        # named mutants are run again whatever their verdict: the timeouts, given 15x
        copy_checkout(work, multiplier=15.0)
        run = subprocess.run(["mutmut", "run", "--max-children", "1", *timeouts], cwd=work, env=env)
        status = results(work, env)
    seconds = time.time() - start
    if run.returncode != 0 or not status:
        print(f"error: mutmut run exited {run.returncode} with {len(status)} results", file=sys.stderr)
        return 1

    def area(name: str) -> str:
        return "model" if name.startswith("linformer_train.model.") else "trainer lr_at"

    summary: dict[str, dict] = {}
    for which in ("model", "trainer lr_at"):
        counts = collections.Counter(s for n, s in status.items() if area(n) == which)
        tested = counts["killed"] + counts["survived"] + counts["timeout"] + counts["suspicious"]
        summary[which] = {**counts, "score": round(counts["killed"] / tested, 4) if tested else None}
    survivors = sorted(n for n, s in status.items() if s not in ("killed",))
    with open(args.out / "survivors.txt", "w") as f:
        for name in survivors:
            diff = subprocess.run(["mutmut", "show", name], cwd=work, env=env, capture_output=True,
                                  text=True).stdout
            f.write(diff.rstrip() + "\n\n")
    summary["seconds"] = round(seconds)
    summary["command"] = "nice -n 15 python benchmarks/mutation.py"
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for which in ("model", "trainer lr_at"):
        s = summary[which]
        print(f"{which}: {s.get('killed', 0)} killed, {s.get('survived', 0)} survived, "
              f"{s.get('timeout', 0)} timeout, {s.get('no tests', 0)} no tests; score {s['score']}")
    print(f"{len(survivors)} not killed: {args.out / 'survivors.txt'}; {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
