#!/usr/bin/env python
"""Train a sentencepiece tokenizer (unigram or BPE, byte fallback, <pad> <s> </s> <unk> <mask> = 0..4).

The source is the config's data section; flags are shortcuts for data.* keys, and key=value
overrides apply last. The tokenizer lands in --out, else data.tokenizer, else
<prepared_dir>/tokenizer (where preparation looks for one it trained itself).

Examples:
  python tools/train_tokenizer.py --config configs/tiny.yaml
  python tools/train_tokenizer.py --source files --paths corpus/ --vocab-size 32000 --type bpe --out tok/
  python tools/train_tokenizer.py --config configs/base-512.yaml --source hf --hf-name wikitext \\
      --hf-config wikitext-103-raw-v1 data.tokenizer_sample_sentences=5000000
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from linformer_train.cli import add_config_arguments, make_parser, run_main  # noqa: E402


def main(argv: Sequence[str]) -> int:
    from linformer_train.data.corpus import add_source_flags, source_overrides

    parser = make_parser("train_tokenizer", __doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--out", metavar="DIR", help="directory (or .model path) to write the tokenizer to")
    parser.add_argument("--vocab-size", type=int, help="pieces (data.tokenizer_vocab_size; "
                        "default model.vocab_size)")
    parser.add_argument("--type", choices=["unigram", "bpe"], help="data.tokenizer_type")
    parser.add_argument("--character-coverage", type=float, help="data.tokenizer_character_coverage")
    parser.add_argument("--sample-sentences", type=int, help="data.tokenizer_sample_sentences")
    add_source_flags(parser)
    args = parser.parse_args(argv)

    from linformer_train.config import load_config
    from linformer_train.data.pipeline import train_tokenizer
    from linformer_train.data.prepare import prepared_dir_for
    from linformer_train.data.tokenizer import load_tokenizer, meta_path

    flags = source_overrides(args)
    for value, key in ((args.vocab_size, "data.tokenizer_vocab_size"), (args.type, "data.tokenizer_type"),
                       (args.character_coverage, "data.tokenizer_character_coverage"),
                       (args.sample_sentences, "data.tokenizer_sample_sentences")):
        if value is not None:
            flags.append(f"{key}={json.dumps(value)}")
    cfg = load_config(args.config, [*flags, *args.overrides])
    d = cfg.data
    out = args.out or d.tokenizer or prepared_dir_for(d, cfg.train.run_dir) / "tokenizer"
    vocab = d.tokenizer_vocab_size or cfg.model.vocab_size
    print(f"training a {d.tokenizer_type} tokenizer with {vocab} pieces -> {out}", flush=True)
    path = train_tokenizer(d, out, vocab)
    tok = load_tokenizer(path)
    meta = json.loads(meta_path(path).read_text())
    print(f"source: {meta['source']}")
    print(f"lines: {meta['sentences_seen']:,} seen, {meta['sentences_used']:,} trained on "
          f"({meta['seconds']:.1f} s)")
    print(f"wrote {path} ({tok.vocab_size} pieces, sha256 {tok.sha256[:12]}) and {meta_path(path).name}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
