"""The pretraining entry point behind launch/pretrain.py and the `linformer-pretrain` script."""

from __future__ import annotations

from typing import Sequence

from linformer_train.cli import make_parser


def pretrain(argv: Sequence[str]) -> int:
    parser = make_parser("pretrain", "Pretrain a Linformer encoder with masked-language modelling.")
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config file (repeatable; later files override earlier ones)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run's latest complete checkpoint (checkpoint.resume=auto)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse_suppress())
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.lr=3e-4 train.max_steps=1000")
    args = parser.parse_args(argv)

    from linformer_train.config import load_config

    overrides = list(args.overrides) + (["checkpoint.resume=auto"] if args.resume else [])
    cfg = load_config(args.config, overrides)  # every rank parses the same files: fail fast, before init

    from linformer_train.train.distributed import destroy_distributed, init_distributed
    from linformer_train.train.trainer import Trainer

    init_distributed()
    try:
        return Trainer(cfg).train()
    finally:
        destroy_distributed()


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS
