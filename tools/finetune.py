#!/usr/bin/env python
"""Fine-tune a pretrained Linformer for (sentence-pair) classification, or predict with one.
docs/CONVERT_FINETUNE.md has the walk-through.

  python tools/finetune.py train --config configs/finetune-sst2.yaml model.pretrained=models/base-512
  deepspeed --num_gpus 8 tools/finetune.py train --config configs/finetune-imdb-4096.yaml
  python tools/finetune.py train --config configs/finetune-sst2.yaml \\
      task.preset=null task.train_file=train.tsv task.eval_file=dev.tsv train.seeds=[1,2,3]
  python tools/finetune.py predict --model runs/finetune-sst2/seed_1/best --input reviews.txt --output labels.txt
"""

import sys
from pathlib import Path

# tools/profile.py would shadow the standard library's `profile` (torch._dynamo imports cProfile):
# take tools/ off the path, put the checkout on it (runs without an install).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from linformer_train.cli import run_main  # noqa: E402
from linformer_train.finetune.entry import finetune  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(finetune))
