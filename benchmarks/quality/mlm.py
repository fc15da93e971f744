#!/usr/bin/env python
"""MLM study behind docs/QUALITY.md: full attention vs Linformer (k, sharing, init), and whether
quality depends on k rather than n. Pretrains on WikiText-2 valid.txt, evaluates every checkpoint
on WikiText-2 test.txt (its first 131,072 tokens, fixed masks) and records perplexity against
tokens and time.

  run       train + evaluate every configuration not yet finished (runs/quality/mlm/<name>/)
  evaluate  evaluate the kept model directories of finished runs again (after changing the evaluation)
  lengths   test loss of the final n=512 models on shorter inputs: the same test tokens cut into
            pieces of L = 16 ... 512 tokens (each starting with <s>), runs/quality/mlm/lengths.jsonl
  report    the markdown tables and docs/figures/quality_mlm_n512.png (and quality_mlm_k_vs_n.png
            once n=256 or 1024 has run) from runs/quality/mlm/results.jsonl

Every configuration: 2 x 64 encoder (preset tiny, 4 heads), vocabulary 4,096 (the study
tokenizer), AdamW lr 1e-3, 60 warmup steps then linear decay, dropout 0.1, fp32, 600 steps of
4,096 tokens (8 x 512, 16 x 256 or 4 x 1024): 2.46M tokens, about 6 passes over valid.txt.
One process, one thread.

Examples:
  python benchmarks/quality/mlm.py run
  python benchmarks/quality/mlm.py run --only full-n512 lin-k64-headwise-n512
  python benchmarks/quality/mlm.py report
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (FIGURES, OUT, VOCAB, append_jsonl, eval_blocks, machine, mlm_loss,  # noqa: E402
                    python_tool, read_jsonl, require_data, run, wiki_data_overrides)

STEPS = 600
TOKENS_PER_STEP = 4096
EVAL_EVERY = 100
RESULTS = OUT / "mlm" / "results.jsonl"


def configurations() -> dict[str, dict]:
    """name -> model overrides (and n), in the order they run: the comparisons first, the rest of
    the k x sharing grid last."""
    confs: dict[str, dict] = {"full-n512": {"n": 512, "attention": "full"}}
    for k in (32, 64, 128):
        confs[f"lin-k{k}-headwise-n512"] = {"n": 512, "k": k, "sharing": "headwise"}
    confs["lin-k64-headwise-n512-normal"] = {"n": 512, "k": 64, "sharing": "headwise", "projection_init": "normal"}
    for sharing in ("none", "kv", "layerwise"):
        confs[f"lin-k64-{sharing}-n512"] = {"n": 512, "k": 64, "sharing": sharing}
    for n in (256, 1024):
        confs[f"full-n{n}"] = {"n": n, "attention": "full"}
        confs[f"lin-k64-headwise-n{n}"] = {"n": n, "k": 64, "sharing": "headwise"}
    for k in (32, 128):
        for sharing in ("none", "kv", "layerwise"):
            confs[f"lin-k{k}-{sharing}-n512"] = {"n": 512, "k": k, "sharing": sharing}
    confs["lin-k64-headwise-n512-mixed"] = {"n": 512, "k": 64, "sharing": "headwise", "projection_init": "mixed"}
    for name in ("full-n512", "lin-k64-headwise-n512", "lin-k64-headwise-n512-normal"):  # a second seed
        confs[f"{name}-seed2"] = {**confs[name], "seed": 2}
    return confs


def overrides(name: str, conf: dict) -> list[str]:
    n = conf["n"]
    model = {k: v for k, v in conf.items() if k not in ("n", "seed")}
    return ["model.preset=tiny", f"model.vocab_size={VOCAB}", f"model.max_seq_len={n}",
            "model.dropout=0.1", "model.attention_dropout=0.1",
            *(f"model.{k}={v}" for k, v in model.items()),
            *wiki_data_overrides(n),
            "optim.lr=1e-3", "optim.warmup_steps=60", f"train.max_steps={STEPS}",
            f"train.micro_batch_size={TOKENS_PER_STEP // n}", "train.eval_every=0", f"train.seed={conf.get('seed', 1)}",
            "train.peak_tflops=1.0", "train.compile=false", "precision.dtype=fp32", "logging.log_every=50", "logging.tensorboard=false",
            "logging.progress=false", f"checkpoint.save_every={EVAL_EVERY}", "checkpoint.keep_last=100",
            f"train.run_dir={OUT / 'mlm' / name}"]


def run_one(name: str, conf: dict) -> dict:
    from linformer_train.convert import from_pretrained
    from linformer_train.convert.export import export_checkpoint

    run_dir = OUT / "mlm" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = python_tool("launch/pretrain.py", *overrides(name, conf))
    timing = run(cmd, OUT / "logs" / f"mlm-{name}.log")
    blocks = eval_blocks(conf["n"])
    points = []
    for step_dir in sorted((run_dir / "checkpoints").glob("step_*")):
        step = int(step_dir.name.split("_")[1])
        model_dir = run_dir / "models" / step_dir.name
        export_checkpoint(step_dir, model_dir, overwrite=True)
        loss = mlm_loss(from_pretrained(model_dir), blocks)
        points.append({"step": step, "tokens": step * TOKENS_PER_STEP, "test_loss": round(loss, 4),
                       "wall_s": round((step_dir / "complete.json").stat().st_mtime - timing["start"], 1)})
        shutil.rmtree(step_dir)  # the exported model directory keeps the weights
    final = from_pretrained(run_dir / "models" / f"step_{STEPS:08d}")
    record = {"name": name, "seed": 1, **conf, "steps": STEPS, "tokens": STEPS * TOKENS_PER_STEP,
              "eval_tokens": int(blocks.size), "params": sum(p.numel() for p in final.parameters()),
              "projection_init": final.cfg.projection_init if final.cfg.attention == "linformer" else None,
              "wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"], "points": points,
              "command": " ".join(["python", "launch/pretrain.py", *overrides(name, conf)]).replace(str(OUT), "runs/quality"),
              "machine": machine()}
    append_jsonl(RESULTS, record)
    return record


def cmd_evaluate() -> None:
    from linformer_train.convert import from_pretrained

    recs = read_jsonl(RESULTS)
    for rec in recs:
        blocks = eval_blocks(rec["n"])
        for point in rec["points"]:
            model = from_pretrained(OUT / "mlm" / rec["name"] / "models" / f"step_{point['step']:08d}")
            point["test_loss"] = round(mlm_loss(model, blocks), 4)
        rec["eval_tokens"] = int(blocks.size)
        print(f"{rec['name']}: test loss {rec['points'][-1]['test_loss']:.3f}", flush=True)
    RESULTS.write_text("".join(json.dumps(r) + "\n" for r in recs))


LENGTH_MODELS = ("full-n512", "lin-k64-headwise-n512", "lin-k64-headwise-n512-mixed", "lin-k64-headwise-n512-normal")


def cmd_lengths() -> None:
    from linformer_train.convert import from_pretrained
    from linformer_train.data.tokenizer import BOS_ID

    blocks = eval_blocks(512)
    out = OUT / "mlm" / "lengths.jsonl"
    out.unlink(missing_ok=True)
    for name in LENGTH_MODELS:
        model = from_pretrained(OUT / "mlm" / name / "models" / f"step_{STEPS:08d}")
        losses = {}
        for length in (16, 32, 64, 128, 256, 512):
            pieces = blocks.reshape(-1, length).copy()   # the same tokens, cut into pieces of L
            pieces[:, 0] = BOS_ID
            losses[length] = round(mlm_loss(model, pieces, batch_size=max(16, 8192 // length)), 4)
        append_jsonl(out, {"name": name, "loss_by_length": losses})
        print(name, losses, flush=True)


def cmd_run(only: list[str]) -> None:
    require_data()
    done = {r["name"] for r in read_jsonl(RESULTS)}
    for name, conf in configurations().items():
        if (only and name not in only) or name in done:
            continue
        rec = run_one(name, conf)
        last = rec["points"][-1]
        print(f"{name}: test loss {last['test_loss']:.3f} after {rec['tokens']:,} tokens, "
              f"{rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s CPU", flush=True)


def _final(r: dict) -> float:
    return r["points"][-1]["test_loss"]


def _times(r: dict | None) -> str:
    return f"{r['wall_s']:.0f} / {r['cpu_s']:.0f}" if r else ""


def cmd_report() -> None:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = {r["name"]: r for r in read_jsonl(RESULTS)}
    if not recs:
        sys.exit(f"error: no results in {RESULTS}; run `python benchmarks/quality/mlm.py run` first")
    full = recs.get("full-n512")
    print("| model (2x64, n=512) | k | sharing | E/F init | params | test loss | test ppl | vs full | wall s | CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in recs.items():
        if r["n"] != 512 or name.endswith("seed2"):
            continue
        ppl = math.exp(_final(r))
        rel = f"{ppl / math.exp(_final(full)) - 1:+.1%}" if full and name != "full-n512" else ""
        print(f"| {'full' if r.get('attention') == 'full' else 'Linformer'} | {r.get('k', '')} | "
              f"{r.get('sharing', '')} | {r.get('projection_init') or ''} | {r['params']:,} | {_final(r):.3f} | "
              f"{ppl:.1f} | {rel} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    print("\n| two seeds (1, 2) | test loss seed 1 | seed 2 | mean | mean vs full |")
    print("| --- | --- | --- | --- | --- |")
    means = {}
    for name in ("full-n512", "lin-k64-headwise-n512", "lin-k64-headwise-n512-normal"):
        if name in recs and f"{name}-seed2" in recs:
            a, b = _final(recs[name]), _final(recs[f"{name}-seed2"])
            means[name] = (a + b) / 2
            rel = f"{math.exp(means[name] - means['full-n512']) - 1:+.1%}" if "full-n512" in means else ""
            print(f"| {name} | {a:.3f} | {b:.3f} | {means[name]:.3f} | {rel} |")
    print("\n| n | sequences x n a step | full test ppl | Linformer k=64 test ppl | Linformer / full | "
          "full wall s / CPU s | Linformer wall s / CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in (256, 512, 1024):
        f, lin = recs.get(f"full-n{n}"), recs.get(f"lin-k64-headwise-n{n}")
        if not (f or lin):
            continue
        a = math.exp(_final(f)) if f else None
        b = math.exp(_final(lin)) if lin else None
        print(f"| {n} | {TOKENS_PER_STEP // n} x {n} | {f'{a:.1f}' if f else 'not run'} | "
              f"{f'{b:.1f}' if lin else 'not run'} | {f'{b / a - 1:+.1%}' if f and lin else ''} | "
              f"{_times(f)} | {_times(lin)} |")
    lengths = read_jsonl(OUT / "mlm" / "lengths.jsonl")
    if lengths:
        cols = list(lengths[0]["loss_by_length"])
        print("\n| model (n=512) | " + " | ".join(f"L={c}" for c in cols) + " |")
        print("| --- |" + " --- |" * len(cols))
        for r in lengths:
            print(f"| {r['name']} | " + " | ".join(f"{v:.3f}" for v in r["loss_by_length"].values()) + " |")

    FIGURES.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    shown = [("full-n512", "full attention", "k-"), ("lin-k32-headwise-n512", "Linformer k=32", "-"),
             ("lin-k64-headwise-n512", "Linformer k=64", "-"), ("lin-k128-headwise-n512", "Linformer k=128", "-"),
             ("lin-k64-layerwise-n512", "Linformer k=64 layerwise", ":"),
             ("lin-k64-headwise-n512-normal", "Linformer k=64, dense E/F init", "--"),
             ("lin-k64-headwise-n512-mixed", "Linformer k=64, mixed E/F init", "-.")]
    for name, label, style in shown:
        r = recs.get(name)
        if not r:
            continue
        ys = [math.exp(p["test_loss"]) for p in r["points"]]
        axes[0].plot([p["tokens"] / 1e6 for p in r["points"]], ys, style, marker="o", ms=3, label=label)
        axes[1].plot([p["wall_s"] / 60 for p in r["points"]], ys, style, marker="o", ms=3, label=label)
    for ax, xl in zip(axes, ("training tokens (millions)", "wall time (minutes; shared 2-core CPU, load ~10)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("WikiText-2 test perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("MLM, 2x64 encoder at n=512, seed 1 (train: WikiText-2 valid; eval: 131k tokens of test)")
    fig.tight_layout()
    out = FIGURES / "quality_mlm_n512.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    print(f"\nwrote {out}")

    pairs = [(n, recs.get(f"full-n{n}"), recs.get(f"lin-k64-headwise-n{n}")) for n in (256, 512, 1024)]
    if sum(bool(lin) for _, _, lin in pairs) > 1:  # the paper's check: at a fixed k, does quality follow n?
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for (n, f, lin), color in zip(pairs, ("tab:blue", "tab:orange", "tab:green")):
            for r, style, label in ((f, "-", f"full, n={n}"), (lin, "--", f"Linformer k=64, n={n}")):
                if not r:
                    continue
                ax.plot([p["tokens"] / 1e6 for p in r["points"]], [math.exp(p["test_loss"]) for p in r["points"]],
                        style, color=color, marker="o", ms=3, label=label)
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("WikiText-2 test perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Fixed k=64, n = 256 / 512 / 1024 (2x64, 4,096 tokens a step, seed 1)", fontsize=9)
        fig.tight_layout()
        out = FIGURES / "quality_mlm_k_vs_n.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train and evaluate every configuration not yet finished")
    p.add_argument("--only", nargs="*", default=[], help="configuration names (see configurations())")
    sub.add_parser("evaluate", help="evaluate the kept models of finished runs again")
    sub.add_parser("lengths", help="test loss of the final n=512 models on shorter inputs")
    sub.add_parser("report", help="tables and figures from the results")
    args = parser.parse_args()
    if args.command == "run":
        cmd_run(args.only)
    elif args.command == "evaluate":
        cmd_evaluate()
    elif args.command == "lengths":
        cmd_lengths()
    else:
        cmd_report()


if __name__ == "__main__":
    main()
