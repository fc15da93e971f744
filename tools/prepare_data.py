#!/usr/bin/env python
"""Tokenize and pack a corpus into n-token blocks for pretraining (what training would do first).

Runs the same ensure_prepared() that training calls on rank 0: trains the tokenizer if needed,
tokenizes in data.num_proc processes, packs blocks of model.max_seq_len tokens into
<prepared_dir>/{train,validation}.bin and writes manifest.json. Re-running with the same inputs reuses
the result; a directory prepared from other inputs is refused unless --overwrite.

Examples:
  python tools/prepare_data.py --config configs/tiny.yaml
  python tools/prepare_data.py --config configs/base-4096.yaml --source files --paths corpus/ \\
      --out data/corpus-4096 --num-proc 8
  python tools/prepare_data.py --config configs/base-512.yaml --source hf --hf-name wikitext \\
      --hf-config wikitext-103-raw-v1 --streaming
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from linformer_train.cli import add_config_arguments, make_parser, run_main  # noqa: E402


def main(argv: Sequence[str]) -> int:
    from linformer_train.data.corpus import add_source_flags, source_overrides

    parser = make_parser("prepare_data", __doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--out", metavar="DIR", help="data.prepared_dir (default <train.run_dir>/data)")
    parser.add_argument("--seq-len", type=int, metavar="N", help="model.max_seq_len: tokens per block")
    parser.add_argument("--tokenizer", metavar="PATH", help="data.tokenizer: an existing .model, a Hugging "
                        "Face tokenizer.json, or a directory holding one, such as a warm-started model "
                        "(a sentencepiece model is trained here when unset)")
    parser.add_argument("--num-proc", type=int, metavar="P", help="data.num_proc: tokenizing processes")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a set prepared from other inputs instead of refusing")
    add_source_flags(parser)
    args = parser.parse_args(argv)

    from linformer_train.config import load_config
    from linformer_train.data.pipeline import ensure_prepared
    from linformer_train.data.prepare import open_prepared, summarize

    flags = source_overrides(args)
    for value, key in ((args.out, "data.prepared_dir"), (args.seq_len, "model.max_seq_len"),
                       (args.tokenizer, "data.tokenizer"), (args.num_proc, "data.num_proc")):
        if value is not None:
            flags.append(f"{key}={json.dumps(value)}")
    cfg = load_config(args.config, [*flags, *args.overrides])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = ensure_prepared(cfg.data, cfg.model.max_seq_len, cfg.train.run_dir, cfg.model.vocab_size,
                           overwrite=args.overwrite)
    prepared = open_prepared(root, cfg.model.max_seq_len)
    print(f"prepared data in {root}")
    print(summarize(prepared.manifest))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
