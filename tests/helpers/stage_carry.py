"""Train a staged run and record, at its first boundary, each parameter's full fp32 weight and
AdamW moments just before and just after the switch: <run_dir>/carry.json (rank 0) holds, per
parameter, whether resize changed it and the largest differences, and the step counts."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from linformer_train.config import load_config  # noqa: E402
from linformer_train.train.distributed import init_distributed  # noqa: E402
from linformer_train.train.trainer import Trainer  # noqa: E402


def main(argv):
    args = [a for a in argv if not a.startswith("--local")]
    files = []
    if args[:1] == ["--config"]:
        files, args = args[1:2], args[2:]
    cfg = load_config(files, args)
    rank, _ = init_distributed()
    record = {}
    switch = Trainer._next_stage

    def watched(self):
        w0, m0, s0 = self._full_fp32_state()
        switch(self)
        w1, m1, s1 = self._full_fp32_state()
        params = {}
        for name, w in w1.items():
            same = w.shape == w0[name].shape
            entry = {"resized": not same or not torch.equal(w, w0[name])}
            if not entry["resized"]:
                entry["weight_diff"] = float((w - w0[name]).abs().max())
                entry["exp_avg_diff"] = float((m1[name][0] - m0[name][0]).abs().max())
                entry["exp_avg_sq_diff"] = float((m1[name][1] - m0[name][1]).abs().max())
            else:
                entry["exp_avg_max"] = float(m1[name][0].abs().max())
                entry["exp_avg_sq"] = [float(m1[name][1].min()), float(m1[name][1].max())]
                entry["old_exp_avg_sq_mean"] = float(m0[name][1].mean())
            params[name] = entry
        record.update(step=self.step, adam_step_before=s0, adam_step_after=s1, params=params)

    Trainer._next_stage = watched
    trainer = Trainer(cfg)
    trainer.train()
    if rank == 0:
        Path(cfg.train.run_dir, "carry.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
