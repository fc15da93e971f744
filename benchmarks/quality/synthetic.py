#!/usr/bin/env python
"""The generated sentence task of tests/test_short_text.py at several n and k: whether a Linformer
learns it as fast as full attention depends on the E/F init, not on how short the input is next to n.

Task: <s> w_1 .. w_L </s>, L in [8, 30], 50 positive and 50 negative words among 500, label = sign
of the summed polarities; 60 AdamW steps of 32 fresh sentences (lr 1e-3), 2 x 64 classifier,
accuracy on 1,000 held-out sentences; seeds 0, 1, 2; one thread. About a minute on one core.

Then, at init (seed 0, n=256, k=64, one batch of 256 sentences): the gradient norm reaching the
attention weights (qkv), E/F and the classifier, and how much the first token's final state varies
across sentences (its per-feature std, averaged): how much of the sentence the pooled token carries.

  python benchmarks/quality/synthetic.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from test_short_text import accuracy_after_short_training  # noqa: E402

MODELS = {"full attention": {"attention": "full"}, "Linformer, window init (default)": {},
          "Linformer, dense init, sqrt": {"projection_init": "normal", "short_input_scaling": "sqrt"},
          "Linformer, dense init, none": {"projection_init": "normal", "short_input_scaling": "none"}}
SHAPES = [(256, 64), (32, 8), (32, 32)]


def main() -> None:
    torch.set_num_threads(1)
    print("| model | n=256, k=64 | n=32, k=8 | n=32, k=32 (no compression) |")
    print("| --- | --- | --- | --- |")
    t0 = time.time()
    for name, extra in MODELS.items():
        cells = []
        for n, k in SHAPES:
            accs = [accuracy_after_short_training(s, max_seq_len=n, k=k, **extra) for s in (0, 1, 2)]
            cells.append(f"{sum(accs) / 3:.3f} ({' / '.join(f'{a:.2f}' for a in accs)})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print()
    at_init()
    print(f"\n{time.time() - t0:.0f} s")


def at_init() -> None:
    import torch.nn.functional as F

    from linformer_train.config import config_from_dict
    from linformer_train.model import LinformerForSequenceClassification
    from test_short_text import VOCAB, collate, sentences

    print("| model (n=256, k=64, at init) | grad norm qkv | grad norm E/F | grad norm classifier + pooler | "
          "first-token state std across sentences |")
    print("| --- | --- | --- | --- | --- |")
    for name, extra in MODELS.items():
        torch.manual_seed(0)
        cfg = config_from_dict({"model": dict(preset="tiny", vocab_size=VOCAB, max_seq_len=256, k=64, dropout=0.0,
                                              attention_dropout=0.0, **extra)}).model
        clf = LinformerForSequenceClassification(cfg)
        ids, mask, labels = collate(sentences(torch.Generator().manual_seed(100), 256))
        F.cross_entropy(clf(ids, mask), labels).backward()

        def norm(part: str) -> float:
            grads = [p.grad for n, p in clf.named_parameters() if part in n and p.grad is not None]
            return float(torch.stack([g.norm() for g in grads]).norm()) if grads else float("nan")

        with torch.no_grad():
            spread = clf.encoder(ids, mask)[:, 0].std(0).mean().item()
        head = (norm("classifier") ** 2 + norm("pool") ** 2) ** 0.5
        print(f"| {name} | {norm('qkv'):.2e} | {norm('proj'):.2e} | {head:.3f} | {spread:.4f} |")


if __name__ == "__main__":
    main()
