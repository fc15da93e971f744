"""The pretraining entry point behind launch/pretrain.py and the `linformer-pretrain` script."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from linformer_train.cli import add_config_arguments, make_parser, run_main


def main() -> None:
    """The `linformer-pretrain` console script: ``pretrain`` under the one-line error contract."""
    sys.exit(run_main(pretrain))


def pretrain(argv: Sequence[str]) -> int:
    parser = make_parser("pretrain", "Pretrain a Linformer encoder with masked-language modelling.")
    add_config_arguments(parser, "optim.lr=3e-4 train.max_steps=1000")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run's latest complete checkpoint (checkpoint.resume=auto)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = parser.parse_intermixed_args(argv)  # overrides may also follow --resume (as in convert, finetune)

    from linformer_train.cli import UsageError
    from linformer_train.config import load_config

    cfg = load_config(args.config, args.overrides)  # every rank parses the same files: fail fast, before init
    if args.resume:  # --resume means checkpoint.resume=auto: a config naming another value is a contradiction
        named = [o for o in args.overrides if o.split("=", 1)[0].strip() == "checkpoint.resume"]
        if named or cfg.checkpoint.resume not in ("none", "auto"):
            said = named[-1] if named else f"checkpoint.resume: {cfg.checkpoint.resume} in the config file"
            raise UsageError(f"pretrain: --resume and {said} contradict each other; use --resume for the run's "
                             f"latest checkpoint or checkpoint.resume=<dir> for a given one, not both")
        cfg = load_config(args.config, list(args.overrides) + ["checkpoint.resume=auto"])

    from linformer_train.cli import user_errors
    from linformer_train.train.distributed import (
        RankLostError,
        destroy_distributed,
        init_distributed,
        lost_ranks,
        rank_table,
    )
    from linformer_train.train.trainer import Trainer, TrainingError

    import os

    if os.environ.get("RANK", "0") == "0":  # the first line, before any slow import or op build
        said = " ".join(args.config) if args.config else "no config file (defaults)"
        extra = f" + {len(args.overrides)} override(s)" if args.overrides else ""
        print(f"config: {said}{extra}", flush=True)
    rank, _ = init_distributed(cfg.logging.verbose)
    ranks = rank_table()
    try:
        return Trainer(cfg).train()
    except RuntimeError as exc:
        # a collective fails when a peer dies; say which rank it was, once, instead of a gloo/NCCL
        # traceback (a SIGKILLed rank prints nothing, and the launcher does not say which one died)
        if isinstance(exc, user_errors() + (TrainingError,)):
            raise
        # the launcher SIGTERMs the survivors about a second after a rank dies (and SIGKILLs them 30 s
        # later): finish this one line first
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        gone = lost_ranks(ranks)
        if not gone:
            raise
        raise RankLostError(_lost_ranks_message(rank, gone, ranks, cfg.train.run_dir)) from exc
    finally:
        destroy_distributed()


def _lost_ranks_message(rank: int, gone: list[int], ranks: list[tuple[str, int]], run_dir: str) -> str:
    from pathlib import Path

    from linformer_train.train.checkpoint import last_good_checkpoint

    who = ", ".join(f"rank {r} (pid {ranks[r][1]} on {ranks[r][0]})" for r in gone)
    try:  # every file of every rank checked: a damaged shard of the dead rank is not named as good
        latest = last_good_checkpoint(Path(run_dir) / "checkpoints")
    except Exception:  # a message about a dead rank must not fail on a damaged checkpoint folder
        latest = None
    resume = (f"the last complete checkpoint is {latest}; rerun with --resume to continue from it"
              if latest else "there is no complete checkpoint yet, so a rerun starts from step 0")
    return (f"rank {rank} stops: {who} ended while the job was running (killed, out of memory, or an "
            f"error in its own output); {resume}")
