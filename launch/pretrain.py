#!/usr/bin/env python
"""Pretrain a Linformer encoder: `deepspeed launch/pretrain.py --config configs/X.yaml [key=value ...]`.

Also runs under `torchrun --nproc_per_node N launch/pretrain.py ...` and plain `python` (one process).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from linformer_train.train.entry import main  # noqa: E402

if __name__ == "__main__":
    main()
