"""Train and die (os._exit, no cleanup, as a SIGKILL would) at a chosen stage of the N-th save."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from linformer_train.config import load_config  # noqa: E402
from linformer_train.train.distributed import init_distributed  # noqa: E402
from linformer_train.train.trainer import Trainer  # noqa: E402


def main(argv):
    stage, nth, *overrides = argv
    seen = {"count": 0}

    def hook(name):
        if name == "before":
            seen["count"] += 1
        if name == stage and seen["count"] == int(nth):
            os._exit(17)

    init_distributed()
    Trainer(load_config([], overrides), on_checkpoint_stage=hook).train()


if __name__ == "__main__":
    main(sys.argv[1:])
