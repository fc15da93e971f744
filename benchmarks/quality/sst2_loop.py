#!/usr/bin/env python
"""Diagnostics the fine-tuning tool has no switch for, on the same SST-2 setting as
``sst2.py --group variants`` (2 x 64 at n=512, k=64 headwise, 4,000 sentences, lr 1e-3 with 6%
warmup then linear decay, AdamW (0.9, 0.98), weight decay 0.1 off biases and norms, clip 1.0,
batch 32, 6 epochs, max_length 128, fp32, best dev epoch, seeds 1-3), in a plain PyTorch loop:

  - E/F frozen at their init (does the model need to learn the projections?)
  - mean pooling of the final states instead of the first token

  python benchmarks/quality/sst2_loop.py            # every row; runs/quality/sst2_loop.jsonl
  python benchmarks/quality/sst2_loop.py --report
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, SST2_DEV, append_jsonl, ensure_tokenizer, machine, mean_std, read_jsonl  # noqa: E402
from sst2 import SHAPE, train_subset  # noqa: E402

RESULTS = OUT / "sst2_loop.jsonl"
DENSE = {"projection_init": "normal", "short_input_scaling": "sqrt"}
ROWS = {
    "dense init, first token": (DENSE, "first", False),
    "dense init, E/F frozen": (DENSE, "first", True),
    "dense init, mean pooling": (DENSE, "mean", False),
}


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def run_row(name: str, seed: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from linformer_train.config import config_from_dict
    from linformer_train.data.tokenizer import load_tokenizer
    from linformer_train.finetune.data import Encoded, collate
    from linformer_train.model import LinformerForSequenceClassification
    from linformer_train.train.trainer import lr_at, param_groups

    overrides, pooling, frozen = ROWS[name]
    torch.set_num_threads(1)
    tok = load_tokenizer(ensure_tokenizer())

    def encode(texts, labels):
        ids = [np.array([1, *t[:126], 2]) for t in tok.encode(texts)]
        return Encoded(ids, np.array(labels), 0)

    train, dev = encode(*read_tsv(train_subset(4000))), encode(*read_tsv(SST2_DEV))
    torch.manual_seed(seed)
    cfg = config_from_dict({"model": {**SHAPE, "vocab_size": tok.vocab_size, **overrides}}).model
    model = LinformerForSequenceClassification(cfg)

    def forward(ids, mask):
        if pooling == "first":
            return model(ids, mask)
        h = model.encoder(ids, mask)
        m = mask[..., None].float()
        h = (h * m).sum(1) / m.sum(1)                               # (B, D) mean of the real tokens
        return model.classifier(model.pool_dropout(torch.tanh(model.pool_dense(model.pool_dropout(h)))))

    for pname, p in model.named_parameters():
        if frozen and "proj" in pname:
            p.requires_grad_(False)
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in param_groups(model, 0.1)]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    per_epoch = math.ceil(len(train) / 32)
    total, warmup = per_epoch * 6, math.ceil(0.06 * per_epoch * 6)
    t0, step, history = time.time(), 0, []
    for epoch in range(6):
        order = np.random.default_rng([seed, epoch]).permutation(len(train))
        model.train()
        for start in range(0, len(order), 32):
            batch = collate(train, order[start:start + 32])
            for g in opt.param_groups:
                g["lr"] = lr_at(step, 1e-3, warmup, total, "linear", 0.0)
            loss = F.cross_entropy(forward(batch["input_ids"], batch["attention_mask"]), batch["labels"])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(dev), 64):
                batch = collate(dev, np.arange(start, min(start + 64, len(dev))))
                pred = forward(batch["input_ids"], batch["attention_mask"]).argmax(-1)
                correct += int((pred == batch["labels"]).sum())
        history.append(correct / len(dev))
    return {"name": name, "seed": seed, "accuracy": max(history), "history": history, "steps": step,
            "seconds": round(time.time() - t0, 1), "machine": machine()}


def report() -> None:
    recs = read_jsonl(RESULTS)
    print("| model (2x64, n=512, k=64) | dev accuracy (mean ± std) | per seed | epoch-1 accuracy (mean) |")
    print("| --- | --- | --- | --- |")
    for name in ROWS:
        rows = [r for r in recs if r["name"] == name]
        if rows:
            mean, std = mean_std(r["accuracy"] for r in rows)
            first = sum(r["history"][0] for r in rows) / len(rows)
            seeds = " / ".join(f"{r['accuracy']:.3f}" for r in rows)
            print(f"| {name} | {100 * mean:.1f} ± {100 * (std or 0):.1f} | {seeds} | {100 * first:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.report:
        return report()
    done = {(r["name"], r["seed"]) for r in read_jsonl(RESULTS)}
    for name in ROWS:
        for seed in (1, 2, 3):
            if (name, seed) not in done:
                rec = run_row(name, seed)
                append_jsonl(RESULTS, rec)
                print(f"{name} seed {seed}: {rec['accuracy']:.4f} ({rec['seconds']:.0f} s)", flush=True)
    report()


if __name__ == "__main__":
    main()
