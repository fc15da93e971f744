#!/usr/bin/env python
"""SST-2 study behind docs/QUALITY.md: Linformer beside full attention, from a random init and
from MLM pretraining, through tools/finetune.py (the real fine-tuning loop), 3 seeds each.

  run     fine-tune every configuration not yet finished (runs/quality/sst2/<name>/)
  report  the markdown tables from runs/quality/sst2/results.jsonl (--group to pick)

Groups (``--group``):
  variants  where a short-text Linformer loses (the short-input rules, the E/F init, the
            parameter-free mean projection), 4,000 training sentences, lr 1e-3, 6 epochs
  budget    the small budget that left a dense-init Linformer at chance: lr 3e-4, 3 epochs, 4,000
  main      random init vs MLM pretraining (benchmarks/quality/mlm.py models at n=512), 10,000
            training sentences, lr 1e-3, 3 epochs
  all       the same four starts (full and Linformer, random init and pretrained) on all 67,349
            training sentences, lr 1e-3, one epoch

Every run: 2 x 64 encoder (preset tiny) at n=512 (k=64, headwise, for Linformer), max_length 128,
micro-batch 32, fp32, 6% warmup then linear decay, dev accuracy after each epoch, best epoch per
seed. Training sentences are the first N of a fixed shuffle of GLUE SST-2 train (67,349); the dev
set is all 872. Pretrained starts need `python benchmarks/quality/mlm.py run` first.

Examples:
  python benchmarks/quality/sst2.py run --group variants
  python benchmarks/quality/sst2.py run --group main
  python benchmarks/quality/sst2.py report
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (OUT, SST2_DEV, SST2_TRAIN, append_jsonl, ensure_tokenizer, machine, mean_std,  # noqa: E402
                    python_tool, read_jsonl, require_data, run)

RESULTS = OUT / "sst2" / "results.jsonl"
SEEDS = (1, 2, 3)
SHAPE = {"preset": "tiny", "max_seq_len": 512, "k": 64, "sharing": "headwise", "dropout": 0.1,
         "attention_dropout": 0.1}
MLM = OUT / "mlm"
DENSE = {"projection_init": "normal", "short_input_scaling": "sqrt"}


def pretrained(name: str) -> Path:
    return MLM / name / "models" / "step_00000600"


def configurations() -> dict[str, dict]:
    """name -> {group, start: shape overrides (random init) or a pretrained model, budget}."""
    variants = {"train": 4000, "lr": 1e-3, "epochs": 6}
    budget = {"train": 4000, "lr": 3e-4, "epochs": 3}
    main = {"train": 10000, "lr": 1e-3, "epochs": 3}
    every = {"train": 67349, "lr": 1e-3, "epochs": 1}
    confs = {
        "variants/full": {"group": "variants", "random_init": {"attention": "full"}, **variants},
        "variants/dense-sqrt": {"group": "variants", "random_init": DENSE, **variants},
        "variants/dense-length": {"group": "variants", "random_init": {**DENSE, "short_input_scaling": "length"},
                                  **variants},
        "variants/dense-none": {"group": "variants", "random_init": {**DENSE, "short_input_scaling": "none"},
                                **variants},
        "variants/mean-projection": {"group": "variants", "random_init": {"projection": "mean"}, **variants},
        "variants/window": {"group": "variants", "random_init": {}, **variants},
        "variants/mixed": {"group": "variants", "random_init": {"projection_init": "mixed"}, **variants},
        "budget/full": {"group": "budget", "random_init": {"attention": "full"}, **budget},
        "budget/dense-sqrt": {"group": "budget", "random_init": DENSE, **budget},
        "budget/window": {"group": "budget", "random_init": {}, **budget},
        "main/scratch-full": {"group": "main", "random_init": {"attention": "full"}, **main},
        "main/scratch-window": {"group": "main", "random_init": {}, **main},
        "main/scratch-dense": {"group": "main", "random_init": DENSE, **main},
        "main/scratch-mixed": {"group": "main", "random_init": {"projection_init": "mixed"}, **main},
        "main/pretrained-full": {"group": "main", "pretrained": "full-n512", **main},
        "main/pretrained-window": {"group": "main", "pretrained": "lin-k64-headwise-n512", **main},
        "main/pretrained-dense": {"group": "main", "pretrained": "lin-k64-headwise-n512-normal", **main},
        "main/pretrained-mixed": {"group": "main", "pretrained": "lin-k64-headwise-n512-mixed", **main},
        "all/scratch-full": {"group": "all", "random_init": {"attention": "full"}, **every},
        "all/scratch-window": {"group": "all", "random_init": {}, **every},
        "all/pretrained-full": {"group": "all", "pretrained": "full-n512", **every},
        "all/pretrained-window": {"group": "all", "pretrained": "lin-k64-headwise-n512", **every},
    }
    return confs


def train_subset(count: int) -> Path:
    """The first ``count`` sentences of a fixed shuffle (seed 0) of SST-2 train, GLUE TSV layout."""
    import numpy as np

    path = OUT / "sst2" / f"train_{count}.tsv"
    if not path.is_file():
        lines = SST2_TRAIN.read_text(encoding="utf-8").splitlines()
        header, rows = lines[0], lines[1:]
        order = np.random.default_rng(0).permutation(len(rows))[:count]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + "\n" + "\n".join(rows[i] for i in order) + "\n", encoding="utf-8")
    return path


def arguments(name: str, conf: dict) -> list[str]:
    args = [f"task.train_file={train_subset(conf['train'])}", f"task.eval_file={SST2_DEV}",
            "task.text_column=sentence", "task.label_column=label", "model.max_length=128",
            f"optim.lr={conf['lr']}", "optim.warmup_ratio=0.06", f"train.epochs={conf['epochs']}",
            "train.micro_batch_size=32", f"train.seeds=[{','.join(map(str, SEEDS))}]", "precision.dtype=fp32",
            "logging.log_every=100", "logging.tensorboard=false", "logging.progress=false",
            f"train.output_dir={OUT / 'sst2' / name}"]
    if "pretrained" in conf:
        return [f"model.pretrained={pretrained(conf['pretrained'])}", *args]
    shape = {**SHAPE, **conf["random_init"]}  # k and sharing are ignored by full attention
    init = "{" + ", ".join(f"{k}: {v}" for k, v in shape.items()) + "}"
    return ["model.pretrained=none", f"model.tokenizer={ensure_tokenizer()}", f"model.random_init={init}", *args]


def run_one(name: str, conf: dict) -> dict:
    out = OUT / "sst2" / name
    shutil.rmtree(out, ignore_errors=True)
    if "pretrained" in conf and not pretrained(conf["pretrained"]).is_dir():
        sys.exit(f"error: {pretrained(conf['pretrained'])} is missing; run `python benchmarks/quality/mlm.py "
                 f"run --only {conf['pretrained']}` first")
    args = arguments(name, conf)
    timing = run(python_tool("tools/finetune.py", "train", *args), OUT / "logs" / f"sst2-{name.replace('/', '-')}.log")
    summary = json.loads((out / "results.json").read_text())
    steps = json.loads((out / f"seed_{SEEDS[0]}" / "results.json").read_text())["steps"]
    for seed in SEEDS:  # the kept models are not needed for the tables
        shutil.rmtree(out / f"seed_{seed}" / "best", ignore_errors=True)
    record = {"name": name, **{k: v for k, v in conf.items()}, "seeds": list(SEEDS),
              "accuracy": [r["accuracy"] for r in summary["per_seed"]],
              "best_epoch": [r["epoch"] for r in summary["per_seed"]],
              "steps_per_seed": steps, "num_train": summary["num_train"], "num_eval": summary["num_eval"],
              "wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"],
              "command": "python tools/finetune.py train " + " ".join(args).replace(str(OUT), "runs/quality"),
              "machine": machine()}
    append_jsonl(RESULTS, record)
    return record


def cmd_run(groups: list[str], only: list[str]) -> None:
    require_data()
    done = {r["name"] for r in read_jsonl(RESULTS)}
    for name, conf in configurations().items():
        if (groups and conf["group"] not in groups) or (only and name not in only) or name in done:
            continue
        rec = run_one(name, conf)
        mean, std = mean_std(rec["accuracy"])
        print(f"{name}: dev accuracy {mean:.4f} ± {std:.4f} over seeds {rec['seeds']} "
              f"({rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s CPU)", flush=True)


def cmd_report(groups: list[str]) -> None:
    recs = [r for r in read_jsonl(RESULTS) if not groups or r["group"] in groups]
    if not recs:
        sys.exit(f"error: no results in {RESULTS}; run `python benchmarks/quality/sst2.py run` first")
    print("| run | start | train sentences | epochs | lr | steps/seed | dev accuracy (mean ± std) | per seed | "
          "wall s (3 seeds) | CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in recs:
        mean, std = mean_std(r["accuracy"])
        start = f"MLM {r['pretrained']}" if "pretrained" in r else "random init"
        seeds = " / ".join(f"{a:.3f}" for a in r["accuracy"])
        print(f"| {r['name']} | {start} | {r['num_train']:,} | {r['epochs']} | {r['lr']:g} | {r['steps_per_seed']} | "
              f"{100 * mean:.1f} ± {100 * std:.1f} | {seeds} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="fine-tune every configuration not yet finished")
    p.add_argument("--group", nargs="*", default=[], choices=("variants", "budget", "main", "all"))
    p.add_argument("--only", nargs="*", default=[], help="configuration names (see configurations())")
    p = sub.add_parser("report", help="tables from the results")
    p.add_argument("--group", nargs="*", default=[], choices=("variants", "budget", "main", "all"))
    args = parser.parse_args()
    if args.command == "run":
        cmd_run(args.group, args.only)
    else:
        cmd_report(args.group)


if __name__ == "__main__":
    main()
