"""Build a one-rank Trainer from key=value overrides, run a warm-up step, then count every read of a
tensor from Python code (and every aten::nonzero) during one more step; print them as JSON.

    python tests/helpers/count_syncs.py key=value ...

Reads inside linformer_train/data are left out: the loader works on host batches before they move
to the device (its numpy calls never wait for a device)."""

import collections
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from linformer_train.config import load_config  # noqa: E402
from linformer_train.train.distributed import destroy_distributed, init_distributed  # noqa: E402
from linformer_train.train.trainer import Trainer, _Window  # noqa: E402

READS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy")


def main(argv):
    cfg = load_config([], argv)
    init_distributed()
    trainer = Trainer(cfg)
    window = _Window()
    trainer.train_step(window)  # the first step builds optimizer state
    seen = collections.Counter()
    active = [False]

    def watch(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if active[0]:
                frame = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
                if "linformer_train/data/" not in frame.filename:
                    seen[f"{name} {os.path.basename(frame.filename)}:{frame.name}"] += 1
            return original(self, *args, **kwargs)

        setattr(torch.Tensor, name, read)

    for name in READS:
        watch(name)
    active[0] = True
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(window)
    active[0] = False
    nonzero = sum(1 for e in prof.events() if e.name == "aten::nonzero")
    if nonzero:
        seen["aten::nonzero"] = nonzero
    trainer.data.close()
    trainer._release()
    destroy_distributed()
    print("@@SYNCS " + json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1:])
