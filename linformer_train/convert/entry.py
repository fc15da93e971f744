"""The command line behind tools/convert.py: export, resize, warm-start, universal, inspect."""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from linformer_train.cli import UsageError, make_parser

DESCRIPTION = """\
Export, resize and warm-start Linformer model directories.

commands:
  export CHECKPOINT OUT
      a DeepSpeed checkpoint (a step, checkpoints or run folder) -> model dir
  resize MODEL OUT model.max_seq_len=N [model.k=K]
      the same model at another n and k
  warm-start HF_DIR OUT [--tokenizer TOK] [model.key=value ...]
      a local RoBERTa/BERT dir -> Linformer model dir (keeps its tokenizer)
  universal CHECKPOINT OUT
      DeepSpeed checkpoint -> universal checkpoint (another rank count)
  to-hf MODEL OUT [--pooling mean|first]
      model dir -> transformers (AutoModel, fill-mask, sentence-transformers)
  from-hf HF_DIR OUT [--tokenizer TOK]
      to-hf's directory (or a model fine-tuned with transformers) -> model dir
  to-onnx MODEL OUT.onnx
      the encoder (or the classifier) as ONNX, dynamic batch and length <= n
  inspect MODEL
      what a model directory holds

`convert COMMAND --help` lists a command's options;
docs/CONVERT_FINETUNE.md walks through them.
"""


def _model_overrides(items: Sequence[str], allowed: Sequence[str], why: str = "") -> dict:
    """``model.k=64`` style overrides -> {"k": 64}; values parsed as YAML (ints, lists, dicts)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"override {item!r} is not key=value (e.g. model.max_seq_len=4096)")
        name = key[len("model."):] if key.startswith("model.") else None
        if name not in allowed:
            raise UsageError(f"{key} cannot be set here{why}; choose among "
                             f"{', '.join('model.' + a for a in allowed)}")
        try:
            out[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"{key}={value!r} is not a valid value") from None
    return out


def parse_with_overrides(parser, argv: Sequence[str]):
    """parse_args, except that key=value overrides may also follow the options (argparse stops
    filling a positional list at the first option)."""
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + list(extra)
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("convert", DESCRIPTION, usage="%(prog)s [-h] COMMAND ...",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    # the commands are listed in the description, with their arguments
    sub = parser.add_subparsers(dest="command", metavar="{export,resize,warm-start,inspect}", help=argparse.SUPPRESS,
                                prog=parser.prog)
    sub.required = True

    p = sub.add_parser("export", help="DeepSpeed checkpoint -> model directory",
                       description="A DeepSpeed checkpoint -> a portable model directory "
                                   "(safetensors, config.yaml, tokenizer).")
    p.add_argument("checkpoint", help="a step folder, a checkpoints folder (its latest) or a run folder")
    p.add_argument("out", help="the model directory to write")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights' dtype (default: fp32)")
    p.add_argument("--tokenizer", help="tokenizer.model or its directory (default: the run's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("resize", help="change n (max_seq_len) and k",
                       description="The same model at another n (model.max_seq_len) and k.")
    p.add_argument("model", help="a model directory")
    p.add_argument("out", help="the model directory to write")
    p.add_argument("overrides", nargs="*", metavar="model.key=value",
                   help="model.max_seq_len=N (required) and model.k=K")
    p.add_argument("--positions", choices=("interpolate", "copy"), default="interpolate",
                   help="a longer n: stretch the position table linearly (interpolate), or tile it, "
                        "position i taking row i mod n (copy) (default: interpolate)")
    p.add_argument("--projection-scaling", choices=("norm", "linear", "none"), default="norm",
                   help="E and F rows after interpolation: keep each row's L2 norm (norm), multiply "
                        "by n/n' (linear) or leave them (none) (default: norm)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="weights' dtype (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="for the rows a larger k adds (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("warm-start", help="local RoBERTa/BERT directory -> Linformer model directory",
                       description="A local RoBERTa/BERT directory -> a Linformer model directory.")
    p.add_argument("hf_dir", help="a Hugging Face model directory (config.json and weights)")
    p.add_argument("out", help="the model directory to write")
    p.add_argument("--tokenizer", help="re-tokenize with this sentencepiece tokenizer.model (or its directory), "
                                       "re-mapping the embedding rows onto its pieces (default: keep the model's "
                                       "own tokenizer.json and ids)")
    p.add_argument("overrides", nargs="*", metavar="model.key=value",
                   help="Linformer settings: model.attention, model.max_seq_len, model.k, model.sharing ...")
    p.add_argument("--positions", choices=("copy", "interpolate"), default="copy",
                   help="a longer n than the model's: tile the position table, position i taking row i "
                        "mod n (copy), or stretch it (interpolate) (default: copy)")
    p.add_argument("--min-vocab-coverage", type=float, default=1.0,
                   help="share of the tokenizer's pieces the HF vocabulary must hold; a missing piece's "
                        "row starts as the mean of its characters' rows (default: 1.0)")
    p.add_argument("--init-head", action="store_true", help="start a fresh MLM head if the model has none")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights' dtype (default: fp32)")
    p.add_argument("--seed", type=int, default=0, help="for the E/F projections and a fresh head (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("universal", help="DeepSpeed checkpoint -> universal checkpoint",
                       description="A DeepSpeed checkpoint -> a universal checkpoint, to resume on another "
                                   "number of ranks (checkpoint.resume=OUT checkpoint.universal=true). "
                                   "DeepSpeed's ds_to_universal, with weights-only loads.")
    p.add_argument("checkpoint", help="a step folder, a checkpoints folder (its latest) or a run folder")
    p.add_argument("out", help="the folder to write (must not exist)")
    p.add_argument("--workers", type=int, default=1, help="processes extracting ZeRO shards (default: 1)")

    p = sub.add_parser("to-hf", help="model directory -> transformers directory",
                       description="A model directory -> a transformers directory: config.json, "
                                   "model.safetensors, a fast tokenizer and sentence-transformers' pooling. "
                                   "Load it after `import linformer_train.hf` (docs/INTEROP.md).")
    p.add_argument("model", help="a model directory")
    p.add_argument("out", help="the transformers directory to write")
    p.add_argument("--pooling", choices=("mean", "first"), default="mean",
                   help="sentence-transformers' pooling: mean over real tokens or the first token (default: mean)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("from-hf", help="transformers directory -> model directory",
                       description="A transformers directory of a Linformer (written by to-hf, or fine-tuned "
                                   "and saved with transformers) -> a model directory.")
    p.add_argument("hf_dir", help="a transformers directory (config.json with model_type linformer-train)")
    p.add_argument("out", help="the model directory to write")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json to keep (default: the one to-hf "
                                       "stored under linformer/, else the fast tokenizer.json)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("to-onnx", help="model directory -> ONNX",
                       description="The encoder of an MLM directory (output last_hidden_state) or a "
                                   "classifier (output logits) as an ONNX file with dynamic batch and "
                                   "length (up to n), checked against torch with onnxruntime when present.")
    p.add_argument("model", help="a model directory")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("inspect", help="print a model directory's description",
                       description="Print what a model directory holds.")
    p.add_argument("model", help="a model directory")
    return parser


def convert(argv: Sequence[str]) -> int:
    args = parse_with_overrides(build_parser(), argv)

    if args.command == "export":
        from linformer_train.convert.export import export_checkpoint

        out = export_checkpoint(args.checkpoint, args.out, args.dtype, args.tokenizer, args.overwrite)
    elif args.command == "resize":
        from linformer_train.convert.resize import resize_model_dir

        ov = _model_overrides(args.overrides, ("max_seq_len", "k"), " (resize changes n and k only)")
        if "max_seq_len" not in ov:
            raise UsageError("resize needs model.max_seq_len=N (and optionally model.k=K)")
        out = resize_model_dir(args.model, args.out, ov["max_seq_len"], ov.get("k"), args.positions,
                               args.projection_scaling, args.dtype, args.overwrite, args.seed)
    elif args.command == "warm-start":
        from linformer_train.convert.hf import USER_FIELDS, linformer_note, warm_start

        overrides = _model_overrides(args.overrides, USER_FIELDS, " (it comes from the Hugging Face model)")
        if overrides.get("attention", "linformer") == "linformer":
            print(linformer_note(args.out), flush=True)
        out = warm_start(args.hf_dir, args.out, args.tokenizer,
                         _model_overrides(args.overrides, USER_FIELDS, " (it comes from the Hugging Face model)"),
                         args.positions,
                         args.min_vocab_coverage, args.init_head, args.dtype, args.overwrite, args.seed)
    elif args.command == "universal":
        from linformer_train.convert.universal import to_universal

        out = to_universal(args.checkpoint, args.out, args.workers)
        print(f"wrote {out}; resume with checkpoint.resume={out} checkpoint.universal=true", flush=True)
        return 0
    elif args.command == "to-hf":
        from linformer_train.convert.hf_export import to_hf

        out = to_hf(args.model, args.out, args.pooling, args.overwrite)
        print(f"wrote {out}; load it after `import linformer_train.hf`", flush=True)
        return 0
    elif args.command == "from-hf":
        from linformer_train.convert.hf_export import from_hf

        out = from_hf(args.hf_dir, args.out, args.tokenizer, args.overwrite)
    elif args.command == "to-onnx":
        from linformer_train.convert.onnx_export import to_onnx

        report = to_onnx(args.model, args.out, args.opset, args.overwrite)
        print(f"wrote {args.out}; {report}", flush=True)
        return 0
    else:
        return _inspect(args.model)
    print(f"wrote {out}", flush=True)
    return _inspect(out)


def _inspect(path) -> int:
    from linformer_train.config import k_schedule
    from linformer_train.convert.model_dir import load_model_info, read_model_config

    info = load_model_info(path)
    cfg = read_model_config(path)
    ks = k_schedule(cfg) if cfg.attention == "linformer" else None
    print(f"{path}: {info['architecture']} | {cfg.num_layers} x {cfg.hidden_size} ({cfg.num_heads} heads) | "
          f"n={cfg.max_seq_len} | attention={cfg.attention}"
          + (f" k={ks} sharing={cfg.sharing} projection={cfg.projection}" if ks else "")
          + f" | vocab {cfg.vocab_size} | {info['num_parameters']:,} parameters | {info['dtype']}")
    if info.get("labels"):
        print(f"labels: {info['labels']}")
    print(f"source: {json.dumps(info.get('source'), default=str)}")
    return 0
