#!/usr/bin/env python
"""Checkpoint conversion: export a DeepSpeed checkpoint to a portable model directory, resize n and
k, warm start from a local RoBERTa/BERT. docs/CONVERT_FINETUNE.md has the walk-through.

  python tools/convert.py export runs/base-512/checkpoints/step_00100000 models/base-512
  python tools/convert.py resize models/base-512 models/base-4096 model.max_seq_len=4096 model.k=256
  python tools/convert.py warm-start hf/roberta-base models/roberta-lin --tokenizer tok.model \\
      model.attention=linformer model.max_seq_len=4096 model.k=256 model.sharing=kv --min-vocab-coverage 0.6
  python tools/convert.py inspect models/base-4096
"""

import sys
from pathlib import Path

# tools/profile.py would shadow the standard library's `profile` (torch._dynamo imports cProfile):
# take tools/ off the path, put the checkout on it (runs without an install).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from linformer_train.cli import run_main  # noqa: E402
from linformer_train.convert.entry import convert  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(convert))
