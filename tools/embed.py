#!/usr/bin/env python
"""One vector per document from a model directory's encoder: mean (or first-token) pooling,
documents longer than n as overlapping windows, .txt / .jsonl / .parquet in, .npy / .parquet out.
docs/INTEROP.md has the walk-through.

  python tools/embed.py --model models/base-512 --input docs.jsonl --output runs/vectors.parquet --id-column id
  python tools/embed.py --model models/base-4096 --input reports.txt --output runs/reports.npy --device cuda
"""

import sys
from pathlib import Path

# tools/profile.py would shadow the standard library's `profile` (torch._dynamo imports cProfile):
# take tools/ off the path, put the checkout on it (runs without an install).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from linformer_train.cli import run_main  # noqa: E402
from linformer_train.embed import embed_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(embed_main))
