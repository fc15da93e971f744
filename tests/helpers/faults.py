"""Pretrain through the real entry point (launch/pretrain.py's `pretrain` under `run_main`) with
faults injected at chosen steps, for tests/test_reliability.py and tools/soak.py.

    python tests/helpers/faults.py [FAULT ...] -- [--resume] key=value ...

Faults (steps count from 1, as the logs do; a rank-specific fault fires on that rank only):
  --kill RANK:STEP          SIGKILL this rank in the middle of STEP (in the first forward)
  --nan RANK:STEP[,STEP]    the loss (and so every gradient) of RANK is NaN at those steps
  --await-sigterm STEP      rank 0 writes <run_dir>/awaiting_sigterm_STEP at the start of STEP and
                            waits until a signal has arrived: the test sends SIGTERM from outside,
                            and the stop lands at a known step
  --unwritable-after-save N after the N-th save, rank 0 makes <run_dir>/checkpoints unwritable
                            (chmod 0555; as root, where modes do not bind, also `chattr +i`)

Every fault is a real one: the kernel's SIGKILL and SIGTERM, a non-finite loss through the real
backward and optimizer, a directory the kernel refuses to write in. Nothing a user can configure.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


import torch.distributed as dist  # noqa: E402

from linformer_train.cli import run_main  # noqa: E402
from linformer_train.train import trainer as trainer_module  # noqa: E402
from linformer_train.train.entry import pretrain  # noqa: E402


def _rank_steps(spec: str) -> tuple[int, set[int]]:
    rank, _, steps = spec.partition(":")
    return int(rank), {int(s) for s in steps.split(",")}


def make_unwritable(path: Path) -> None:
    """Refuse writes in ``path`` for this process: mode 0555, and as root the immutable flag."""
    os.chmod(path, 0o555)
    if os.geteuid() == 0:  # root ignores modes; the immutable attribute binds root too (ext4, xfs)
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)


def make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)
    os.chmod(path, 0o755)


def faulty_trainer(args) -> type:
    kill = _rank_steps(args.kill) if args.kill else None
    nan = _rank_steps(args.nan) if args.nan else None

    class FaultyTrainer(trainer_module.Trainer):
        def __init__(self, cfg, on_checkpoint_stage=None):
            self._saves = 0
            super().__init__(cfg, on_checkpoint_stage=self._on_stage)
            module = self.engine.module
            forward = module.forward

            def faulty_forward(*a, **kw):
                step = self.step + 1  # the step being computed
                if kill and self.rank == kill[0] and step in kill[1]:
                    os.kill(os.getpid(), signal.SIGKILL)
                out = forward(*a, **kw)
                if nan and self.rank == nan[0] and step in nan[1] and module.training:
                    out = out._replace(loss_sum=out.loss_sum * float("nan"))
                return out

            module.forward = faulty_forward

        def train_step(self, window):
            if args.await_sigterm and self.step + 1 == args.await_sigterm:
                dist.barrier()  # every rank is in its loop, with its signal handlers installed
            if args.await_sigterm and self.rank == 0 and self.step + 1 == args.await_sigterm:
                marker = self.run_dir / f"awaiting_sigterm_{args.await_sigterm}"
                marker.write_text(str(os.getpid()))
                while not self._stop_requested:  # no deadline: the test's hang detection has one
                    time.sleep(0.02)
            return super().train_step(window)

        def _on_stage(self, name):
            if name == "done":
                self._saves += 1
                if args.unwritable_after_save == self._saves and self.rank == 0:
                    make_unwritable(self.checkpoints.root)

    return FaultyTrainer


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill")
    parser.add_argument("--nan")
    parser.add_argument("--await-sigterm", type=int)
    parser.add_argument("--unwritable-after-save", type=int)
    own = [a for a in argv if not a.startswith("--local_rank")]
    split = own.index("--") if "--" in own else len(own)
    args = parser.parse_args(own[:split])
    trainer_module.Trainer = faulty_trainer(args)  # entry.pretrain imports it at call time
    code = run_main(pretrain, own[split + 1:])
    # a signalled launcher cannot report its ranks' exit codes: each rank says its own
    sys.stderr.write(f"faults.py: rank {os.environ.get('RANK', '0')} exit code {code}\n")  # one write: no interleaving
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
