#!/usr/bin/env python
"""Sequence length as a schedule, at small scale: a Linformer pretrained at n=128 for the first 3/4
of its tokens and at n=1024 for the last 1/4 (one run, `stages:`), against the same model trained at
n=1024 from the start, with the same tokens, steps and schedule. Both are evaluated at n=1024 on
WikiText-2 test.txt (its first 131,072 tokens, fixed masks) at every checkpoint; wall and CPU time of
each run are recorded.

  run       train + evaluate the runs not yet finished (runs/quality/stages/<name>/)
  report    the markdown table from runs/quality/stages/results.jsonl

Every run: 2 x 64 encoder (preset tiny), Linformer k=64 headwise at both n, vocabulary 4,096 (the
study tokenizer), AdamW lr 1e-3, 60 warmup steps then linear decay, dropout 0.1, fp32, 600 steps of
4,096 tokens (32 x 128 in the short stage, 4 x 1024 otherwise): 2.46M tokens of WikiText-2 valid.txt.
One process, one thread; seeds 1 and 2.

  python benchmarks/quality/stages.py run
  python benchmarks/quality/stages.py report
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (OUT, VOCAB, append_jsonl, eval_blocks, machine, mlm_loss, python_tool,  # noqa: E402
                    read_jsonl, require_data, run, wiki_data_overrides)

STEPS = 600
SWITCH = 450
TOKENS_PER_STEP = 4096
EVAL_N = 1024
SAVE_EVERY = 150
RESULTS = OUT / "stages" / "results.jsonl"


def configurations() -> dict[str, dict]:
    confs = {}
    for seed in (1, 2):
        confs[f"n1024-seed{seed}"] = {"staged": False, "seed": seed}
        confs[f"n128-to-1024-seed{seed}"] = {"staged": True, "seed": seed}
    return confs


def stages_yaml(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"stages:\n"
                    f"  - until_step: {SWITCH}\n"
                    f"    model: {{max_seq_len: 128}}\n"
                    f"    train: {{micro_batch_size: {TOKENS_PER_STEP // 128}}}\n"
                    f"  - model: {{max_seq_len: {EVAL_N}}}\n"
                    f"    train: {{micro_batch_size: {TOKENS_PER_STEP // EVAL_N}}}\n")
    return path


def arguments(name: str, conf: dict) -> list[str]:
    data = wiki_data_overrides(EVAL_N)
    if conf["staged"]:  # one prepared folder per n below this one
        data = [o for o in data if not o.startswith("data.prepared_dir=")]
        data.append(f"data.prepared_dir={OUT / 'data' / 'wiki_valid_stages'}")
    head = ["--config", str(stages_yaml(OUT / "stages" / "stages.yaml"))] if conf["staged"] else []
    return [*head, "model.preset=tiny", f"model.vocab_size={VOCAB}", f"model.max_seq_len={EVAL_N}",
            "model.k=64", "model.sharing=headwise", "model.dropout=0.1", "model.attention_dropout=0.1",
            *data, "optim.lr=1e-3", "optim.warmup_steps=60", f"train.max_steps={STEPS}",
            f"train.micro_batch_size={TOKENS_PER_STEP // EVAL_N}", "train.eval_every=0",
            f"train.seed={conf['seed']}", "train.peak_tflops=1.0", "train.compile=false",
            "precision.dtype=fp32", "logging.log_every=50", "logging.tensorboard=false", "logging.progress=false",
            f"checkpoint.save_every={SAVE_EVERY}", "checkpoint.keep_last=100",
            f"train.run_dir={OUT / 'stages' / name}"]


def run_one(name: str, conf: dict) -> dict:
    from linformer_train.convert import from_pretrained
    from linformer_train.convert.export import export_checkpoint

    run_dir = OUT / "stages" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    timing = run(python_tool("launch/pretrain.py", *arguments(name, conf)), OUT / "logs" / f"stages-{name}.log")
    blocks = eval_blocks(EVAL_N)
    points = []
    for step_dir in sorted((run_dir / "checkpoints").glob("step_*")):
        step = int(step_dir.name.split("_")[1])
        model_dir = run_dir / "models" / step_dir.name
        export_checkpoint(step_dir, model_dir, overwrite=True)
        model = from_pretrained(model_dir)
        # before the switch a staged model is at n=128: it is evaluated after the switch only
        loss = mlm_loss(model, blocks) if model.cfg.max_seq_len == EVAL_N else None
        points.append({"step": step, "tokens": step * TOKENS_PER_STEP,
                       "test_loss": None if loss is None else round(loss, 4),
                       "wall_s": round((step_dir / "complete.json").stat().st_mtime - timing["start"], 1)})
        shutil.rmtree(step_dir)
    record = {"name": name, **conf, "steps": STEPS, "switch": SWITCH if conf["staged"] else None,
              "tokens": STEPS * TOKENS_PER_STEP, "eval_n": EVAL_N, "eval_tokens": int(blocks.size),
              "wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"], "points": points,
              "command": " ".join(["python", "launch/pretrain.py", *arguments(name, conf)]).replace(str(OUT), "runs/quality"),
              "machine": machine()}
    append_jsonl(RESULTS, record)
    return record


def cmd_run() -> None:
    require_data()
    done = {r["name"] for r in read_jsonl(RESULTS)}
    for name, conf in configurations().items():
        if name in done:
            print(f"{name}: done (in {RESULTS})", flush=True)
            continue
        print(f"{name}: training ...", flush=True)
        rec = run_one(name, conf)
        print(f"{name}: test loss {rec['points'][-1]['test_loss']:.4f} at n={EVAL_N}; {rec['wall_s']:.0f} s wall, "
              f"{rec['cpu_s']:.0f} s CPU", flush=True)


def cmd_report() -> None:
    recs = read_jsonl(RESULTS)
    if not recs:
        sys.exit(f"error: no results in {RESULTS}; run `python benchmarks/quality/stages.py run` first")
    print(f"| run (2x64, k=64) | seed | test loss at n={EVAL_N} (ppl) | loss at step 450 | wall s | CPU s |")
    print("| --- | --- | --- | --- | --- | --- |")
    groups: dict[bool, list[dict]] = {}
    for r in recs:
        groups.setdefault(r["staged"], []).append(r)
        final = r["points"][-1]["test_loss"]
        at_switch = next((p["test_loss"] for p in r["points"] if p["step"] == SWITCH), None)
        label = f"n=128 to step {SWITCH}, then n={EVAL_N}" if r["staged"] else f"n={EVAL_N} throughout"
        print(f"| {label} | {r['seed']} | {final:.4f} ({math.exp(final):.1f}) | "
              f"{'-' if at_switch is None else f'{at_switch:.4f}'} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    print()
    for staged, rs in groups.items():
        losses = [r["points"][-1]["test_loss"] for r in rs]
        print(f"{'staged' if staged else 'n=1024 throughout'}: mean test loss {statistics.mean(losses):.4f} over "
              f"{len(rs)} seed(s); mean CPU s {statistics.mean(r['cpu_s'] for r in rs):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "report"))
    args = parser.parse_args()
    {"run": cmd_run, "report": cmd_report}[args.command]()


if __name__ == "__main__":
    main()
