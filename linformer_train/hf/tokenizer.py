"""A model directory's tokenizer as a transformers fast tokenizer, with the model's ids.

Sentencepiece (``tokenizer.model``, trained here): the pieces, scores and normalizer spec are read
from the model's protobuf and rebuilt as a ``tokenizers`` pipeline: Unigram or BPE (merges ranked
by piece score) with byte fallback, the model's precompiled NFKC character map, sentencepiece's
whitespace rules (strip, collapse runs of spaces, ``▁`` for a space, a dummy prefix) and a decoder
that undoes them. ``<pad> <s> </s> <unk> <mask>`` keep ids 0-4.

What differs from sentencepiece, measured by tests/test_hf_interop.py on Python's reference topics:
BPE gives identical ids on every line; Unigram gives identical ids except where two segmentations
score the same (runs of one repeated character such as ``=====``): sentencepiece breaks those ties
by float32 rounding, ``tokenizers`` computes in float64, and the same pieces can come out in another
order. And, as in every transformers tokenizer, the literal text ``<mask>`` (or ``<s>``) is the
special token, which fill-mask needs; sentencepiece reads it as plain characters.

Hugging Face (``tokenizer.json`` after a warm start): the pipeline is kept as it is; the special
tokens are named from the files beside it (the roles ``HFTokenizer`` reads).

Either way the post-processor lays inputs out as fine-tuning does: ``<s> a </s>`` and
``<s> a </s></s> b </s>`` (with the tokenizer's own start and end tokens), no token type ids.
"""

from __future__ import annotations

import os
from pathlib import Path

from linformer_train.data import DataError

_NORMAL = 1               # sentencepiece's ModelProto.SentencePiece.Type of a normal piece
_UNIGRAM, _BPE = 1, 2     # its TrainerSpec.ModelType
ROLE_KWARGS = {"bos": ("bos_token", "cls_token"), "eos": ("eos_token", "sep_token"), "pad": ("pad_token",),
               "unk": ("unk_token",), "mask": ("mask_token",)}


def _read_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # pragma: no cover - protobuf is missing
        raise DataError("reading a sentencepiece model's pieces needs the protobuf package; "
                        "pip install protobuf") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as exc:  # protobuf's DecodeError
        raise DataError(f"{path} is not a sentencepiece model ({type(exc).__name__})") from None
    return proto


def _bpe_merges(pieces) -> list[tuple[str, str]]:
    """Merges that rebuild sentencepiece's BPE: every split of a normal piece into two normal
    pieces, ranked by the merged piece's score (higher first), then by id."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def fast_from_sentencepiece(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` that encodes as the sentencepiece model at ``path`` does."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = _read_proto(Path(path))
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    if trainer.model_type == _UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                               byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == _BPE:
        model = models.BPE(vocab={p.piece: i for i, p in enumerate(pieces)}, merges=_bpe_merges(pieces),
                           unk_token=pieces[trainer.unk_id].piece, fuse_unk=True,
                           byte_fallback=trainer.byte_fallback)
    else:
        raise DataError(f"{path} is a sentencepiece model of type {trainer.model_type}; only unigram "
                        f"and bpe models convert to a fast tokenizer")
    tok = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # spaces only: sentencepiece leaves newlines and tabs alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if norm.add_dummy_prefix:  # Metaspace adds no prefix to a text that starts with ▁; sentencepiece does
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tok.normalizer = normalizers.Sequence(steps)
    if norm.add_dummy_prefix:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    steps = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def hf_tokenizer_for(tokenizer_path: str | os.PathLike, model_max_length: int):
    """The transformers fast tokenizer for a model directory's tokenizer (its ``tokenizer.model``
    or Hugging Face ``tokenizer.json``), with the model's special tokens and fine-tuning's layout."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from linformer_train.data.tokenizer import SPECIAL_PIECES, load_tokenizer

    ours = load_tokenizer(tokenizer_path)
    if ours.kind == "sentencepiece":
        pipeline = fast_from_sentencepiece(ours.path)
        tokens = {role: SPECIAL_PIECES[role] for role in ROLE_KWARGS}
        # control pieces: never split, never normalized; <mask> eats the space before it as RoBERTa's does
        pipeline.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=(r == "mask"))
                                     for r, t in tokens.items()])
    else:
        pipeline = Tokenizer.from_file(str(ours.path))
        pipeline.no_truncation()
        pipeline.no_padding()
        tokens = {role: pipeline.id_to_token(i) for role, i in ours.special_ids.items()}
    bos, eos = tokens["bos"], tokens["eos"]
    pipeline.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, ours.special_ids["bos"]), (eos, ours.special_ids["eos"])])
    kwargs = {name: tokens[role] for role, names in ROLE_KWARGS.items() if role in tokens for name in names}
    return PreTrainedTokenizerFast(tokenizer_object=pipeline, model_max_length=model_max_length,
                                   model_input_names=["input_ids", "attention_mask"], **kwargs)
