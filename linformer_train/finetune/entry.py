"""The command line behind tools/finetune.py: train (any launcher) and predict (plain PyTorch)."""

from __future__ import annotations

from typing import Sequence

from linformer_train.cli import add_config_arguments, make_parser


def finetune(argv: Sequence[str]) -> int:
    parser = make_parser("finetune", "Fine-tune a Linformer for classification, or predict with one.")
    # the deepspeed launcher puts --local_rank=N before the subcommand
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=_suppress())
    sub = parser.add_subparsers(dest="command", metavar="{train,predict}")
    sub.required = True

    p = sub.add_parser("train", help="fine-tune (deepspeed / torchrun / python)")
    add_config_arguments(p, "model.pretrained=models/base task.preset=sst2 optim.lr=1e-5")

    p = sub.add_parser("predict", help="one predicted label per input line, written to a file")
    p.add_argument("--model", required=True, help="a fine-tuned model directory (<output_dir>/seed_S/best)")
    p.add_argument("--input", required=True, help=".txt (one input per line; pairs: tab-separated), .csv, .tsv or .jsonl")
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--format", choices=("auto", "text", "csv", "tsv", "jsonl"), default="auto")
    p.add_argument("--text-column")
    p.add_argument("--pair-column")
    p.add_argument("--max-length", type=int)
    p.add_argument("--long-inputs", choices=("truncate", "windows"),
                   help="a text longer than max-length: keep its head, or run overlapping windows and "
                        "aggregate their logits (default: as the model was fine-tuned)")
    p.add_argument("--window-stride", type=int, help="tokens between window starts (default: half a window)")
    p.add_argument("--aggregate", choices=("mean", "max"), default="mean",
                   help="how window logits combine into one prediction (default: mean)")

    from linformer_train.convert.entry import parse_with_overrides

    args = parse_with_overrides(parser, argv)
    if args.command == "predict":
        from linformer_train.finetune.predict import predict_file

        count = predict_file(args.model, args.input, args.output, args.batch_size, args.device,
                             args.format, args.text_column, args.pair_column, args.max_length,
                             args.long_inputs, args.window_stride, args.aggregate)
        print(f"wrote {count} predictions to {args.output}", flush=True)
        return 0

    from linformer_train.finetune.config import load_finetune_config

    cfg = load_finetune_config(args.config, args.overrides)

    from linformer_train.finetune.loop import check_output_apart_from_inputs, prepare_task, run_finetune
    from linformer_train.train.distributed import destroy_distributed, init_distributed

    # every rank reads and checks the data before any process group exists: a bad input is one
    # line from each rank, and nobody waits at a barrier for a rank that failed
    check_output_apart_from_inputs(cfg)
    prep = prepare_task(cfg)
    init_distributed()
    try:
        run_finetune(cfg, prep)
    finally:
        destroy_distributed()
    return 0


def _suppress():
    import argparse

    return argparse.SUPPRESS
