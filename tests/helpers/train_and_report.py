"""Run the Trainer under any launcher, then write what this rank saw to <run_dir>/rank<R>.json:
its loss history (from metrics.jsonl on rank 0) and a checksum of the full, gathered parameters,
so a test can check that the replicas agree."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from linformer_train.config import load_config  # noqa: E402
from linformer_train.train.distributed import init_distributed  # noqa: E402
from linformer_train.train.trainer import Trainer  # noqa: E402


def main(argv):
    overrides = [a for a in argv if not a.startswith("--local")]
    cfg = load_config([], overrides)
    rank, _ = init_distributed()
    trainer = Trainer(cfg)
    trainer.train()
    import deepspeed

    params = list(trainer.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.zero.stage == 3):
        checksum = [float(p.detach().double().sum()) for p in params]
    out = {"rank": rank, "checksum": checksum, "step": trainer.step}
    Path(cfg.train.run_dir, f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
