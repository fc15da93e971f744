"""Warm start a Linformer from a local Hugging Face RoBERTa or BERT checkpoint directory.

Reads ``config.json``, the weights (``model.safetensors``, ``pytorch_model.bin`` or their sharded
indexes) and the vocabulary (``tokenizer.json``, ``vocab.json`` or ``vocab.txt``) straight from the
files: ``transformers`` is not needed to convert (the tests use it to make a reference model).

The mapping (both models are post-LN; our block is the HF layer):

    embeddings.word_embeddings          -> encoder.tokens          (rows re-ordered, see vocabulary)
    embeddings.position_embeddings      -> encoder.positions       (RoBERTa: from row padding_idx+1)
      + token_type_embeddings[0]          folded into every position row (we have no segments)
    embeddings.LayerNorm                -> encoder.embed_norm
    layer.i.attention.self.{q,k,v}      -> layers.i.attn.qkv       (stacked: weight (3D, D))
    layer.i.attention.output.dense      -> layers.i.attn.out
    layer.i.attention.output.LayerNorm  -> layers.i.attn_norm
    layer.i.intermediate.dense          -> layers.i.ffn_in
    layer.i.output.dense                -> layers.i.ffn_out
    layer.i.output.LayerNorm            -> layers.i.ffn_norm
    lm_head.dense / layer_norm / bias   -> head_dense / head_norm / head_bias (BERT: cls.predictions.*)
    decoder weight                      -> tied to encoder.tokens (checked equal when stored)

``layer_norm_eps``, the dropouts and the sizes come from ``config.json``; ``hidden_act`` must be
the exact (erf) ``gelu`` our blocks use. RoBERTa numbers positions from ``padding_idx + 1`` (row 0
is never used, row 1 belongs to padding), so our position i takes HF row i + padding_idx + 1 and
n_hf = max_position_embeddings - padding_idx - 1 (512 for roberta-base). A longer n extends the
table (``positions="copy"`` by default: Longformer's finding for RoBERTa, which keeps neighbouring
positions as distinct as they were; ``"interpolate"`` also works). With ``attention: full`` the
converted model computes what the HF model computes; with ``attention: linformer`` the E/F
projections start untrained (mean pooling over windows by default) and the model needs continued
pretraining before it computes anything like what the source computed.

Vocabulary: by default the Linformer keeps the source model's own tokenizer (its ``tokenizer.json``
with ``tokenizer_config.json`` / ``special_tokens_map.json``: WordPiece, BPE or Unigram), copied
into the model directory; every embedding row keeps its id and data preparation, pretraining,
fine-tuning and prediction read the special ids from it. Re-tokenizing with a sentencepiece model
(``tokenizer=``, ids 0-4 are <pad> <s> </s> <unk> <mask>) loses what the model knew about its own
pieces (docs/QUALITY.md); there every piece is looked up in the HF vocabulary by its text: ``▁`` becomes a
leading space and byte-level BPE's byte alphabet (``Ġ``) for RoBERTa, a word start / ``##``
continuation for WordPiece, the same piece for a sentencepiece (Unigram) vocabulary; byte pieces
``<0xNN>`` map to their byte (WordPiece has no byte alphabet: a printable ASCII byte maps to its
character, any other byte and the bare word boundary ``▁`` to [UNK], as the HF model reads them). The specials map to the HF specials (<s>/[CLS], </s>/[SEP], ...). A
piece missing from the HF vocabulary is a mismatch: refused unless ``min_vocab_coverage`` allows it,
in which case its row starts as the mean of the rows of its characters.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch

from linformer_train.convert import ConversionError
from linformer_train.convert.model_dir import (build_model, check_output_dir, check_tokenizer, model_config,
                                               save_pretrained)
from linformer_train.convert.resize import POSITION_METHODS, extend_positions
from linformer_train.serialization import read_json_object

FAMILIES = {
    "roberta": {"prefix": "roberta.", "vocab_style": "bytelevel",
                "specials": {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"},
                "head": {"lm_head.dense.weight": "head_dense.weight", "lm_head.dense.bias": "head_dense.bias",
                         "lm_head.layer_norm.weight": "head_norm.weight",
                         "lm_head.layer_norm.bias": "head_norm.bias", "lm_head.bias": "head_bias"},
                "decoder": ("lm_head.decoder.weight", "lm_head.decoder.bias"),
                "dropped": ("pooler.dense.weight", "pooler.dense.bias")},
    "bert": {"prefix": "bert.", "vocab_style": "wordpiece",
             "specials": {"pad": "[PAD]", "bos": "[CLS]", "eos": "[SEP]", "unk": "[UNK]", "mask": "[MASK]"},
             "head": {"cls.predictions.transform.dense.weight": "head_dense.weight",
                      "cls.predictions.transform.dense.bias": "head_dense.bias",
                      "cls.predictions.transform.LayerNorm.weight": "head_norm.weight",
                      "cls.predictions.transform.LayerNorm.bias": "head_norm.bias",
                      "cls.predictions.bias": "head_bias"},
             "decoder": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
             "dropped": ("pooler.dense.weight", "pooler.dense.bias", "cls.seq_relationship.weight",
                         "cls.seq_relationship.bias")},
}
FAMILIES["xlm-roberta"] = {**FAMILIES["roberta"], "prefix": "roberta.", "vocab_style": "sentencepiece"}
FAMILIES["camembert"] = {**FAMILIES["roberta"], "prefix": "roberta.", "vocab_style": "sentencepiece"}

# Fields of the Linformer a user chooses; the rest follow the HF model.
USER_FIELDS = ("max_seq_len", "attention", "k", "projection", "sharing", "projection_init",
               "short_input_scaling", "dropout", "attention_dropout", "init_std")
WORD_START = "\u2581"


# --------------------------------------------------------------------------------------------------
# Reading the HF directory
# --------------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        from linformer_train.convert.model_dir import _hint_for_foreign

        raise ConversionError(f"{hf_dir} is not a Hugging Face model directory (no config.json); "
                              f"{_hint_for_foreign(hf_dir)}")
    cfg = read_json_object(path, ConversionError)
    kind = cfg.get("model_type")
    if kind not in FAMILIES:
        raise ConversionError(f"{hf_dir} holds a {kind!r} model; warm start supports "
                              f"{', '.join(sorted(FAMILIES))}")
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"{hf_dir}: hidden_act={act!r}, but Linformer blocks use the exact (erf) "
                              f"gelu; the converted model would compute something else")
    pos = cfg.get("position_embedding_type", "absolute") or "absolute"
    if pos != "absolute":
        raise ConversionError(f"{hf_dir}: position_embedding_type={pos!r}; only absolute positions map "
                              f"onto the Linformer's learned position table")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise ConversionError(f"{hf_dir} is configured as a decoder; the Linformer is an encoder only")
    if cfg.get("tie_word_embeddings") is False:
        raise ConversionError(f"{hf_dir} has an untied MLM decoder (tie_word_embeddings=false); the "
                              f"Linformer's decoder is tied to its embeddings")
    return cfg


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (single file or sharded index, safetensors or torch)."""
    from safetensors.torch import load_file

    from linformer_train import serialization

    def load_one(f: Path) -> dict[str, torch.Tensor]:
        if f.suffix == ".safetensors":
            return load_file(str(f))
        return serialization.load(f)  # weights only: a pickled callable is refused, never run

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return dict(load_one(hf_dir / name))
        index = hf_dir / f"{name}.index.json"
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in _shard_files(index):
                state.update(load_one(shard))
            return state
    raise ConversionError(f"{hf_dir} has no weights (model.safetensors, pytorch_model.bin or a "
                          f"sharded index)")


def _shard_files(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each checked to be a file beside it (a name with
    ``..``, a path or a link out of the folder is refused: the index must not read elsewhere)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        if not all(isinstance(n, str) for n in names):
            raise TypeError(names)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConversionError(f"{index} is not a shard index (a JSON object with a weight_map of "
                              f"tensor -> file names)") from None
    folder = index.parent.resolve()
    shards = []
    for name in names:
        shard = (index.parent / name).resolve()
        if Path(name).is_absolute() or shard.parent != folder:
            raise ConversionError(f"{index} names the shard {name!r}, which is not a file beside it; "
                                  f"a shard index may only name files in its own folder")
        if not shard.is_file():
            raise ConversionError(f"{index} names the shard {name}, which is missing from {index.parent}")
        shards.append(shard)
    return shards


def _normalise_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Strip the base-model prefix (``roberta.`` / ``bert.``); old checkpoints' LayerNorm gamma/beta."""
    out = {}
    for key, value in state.items():
        key = key[len(prefix):] if key.startswith(prefix) else key
        if key.endswith(".gamma"):
            key = key[: -len(".gamma")] + ".weight"
        elif key.endswith(".beta"):
            key = key[: -len(".beta")] + ".bias"
        out[key] = value
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / RoBERTa byte-level BPE's alphabet: each byte is one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_hf_vocab(hf_dir: Path, family: dict) -> tuple[dict[str, int], str, bool]:
    """(piece -> id, style, lowercase) from tokenizer.json, vocab.json or vocab.txt."""
    style = family["vocab_style"]
    lower = False
    tc = hf_dir / "tokenizer_config.json"
    if tc.is_file():
        try:
            lower = bool(json.loads(tc.read_text()).get("do_lower_case", False))
        except ValueError:
            pass
    tj = hf_dir / "tokenizer.json"
    if tj.is_file():
        try:
            data = json.loads(tj.read_text())
            model = data["model"]
        except (ValueError, KeyError):
            raise ConversionError(f"{tj} is not a Hugging Face tokenizer file") from None
        vocab = model.get("vocab")
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            mapping = {piece: i for i, (piece, _score) in enumerate(vocab)}
            style = "sentencepiece"
        elif isinstance(vocab, dict):
            mapping = dict(vocab)
            style = "wordpiece" if model.get("type") == "WordPiece" else style
        else:
            raise ConversionError(f"{tj} has no vocabulary this converter reads")
        for added in data.get("added_tokens", []):
            mapping.setdefault(added["content"], int(added["id"]))
        normalizer = json.dumps(data.get("normalizer") or {})
        lower = lower or '"lowercase": true' in normalizer or '"Lowercase"' in normalizer
        return mapping, style, lower
    if (hf_dir / "vocab.json").is_file():
        return dict(json.loads((hf_dir / "vocab.json").read_text())), "bytelevel", lower
    if (hf_dir / "vocab.txt").is_file():
        lines = (hf_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines = lines[:-1]
        return {tok: i for i, tok in enumerate(lines)}, "wordpiece", lower
    raise ConversionError(f"{hf_dir} has no vocabulary (tokenizer.json, vocab.json or vocab.txt); "
                          f"it is needed to map the model's rows onto the tokenizer's pieces")


def _is_byte_piece(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _piece_bytes(piece: str) -> Optional[bytes]:
    if _is_byte_piece(piece):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    return piece.replace(WORD_START, " ").encode("utf-8")


def _candidates(piece: str, style: str, lower: bool) -> tuple[list[str], list[str]]:
    """(exact candidate strings, character-level fallbacks) of one sentencepiece piece."""
    if style == "sentencepiece":
        return [piece], list(piece)
    data = _piece_bytes(piece)
    if data is None:
        return [], []
    if style == "bytelevel":
        enc = _bytes_to_unicode()
        s = "".join(enc[b] for b in data)
        return [s], list(s)
    # wordpiece
    if _is_byte_piece(piece):
        ch = data.decode("latin-1")
        return ([ch, "##" + ch] if 33 <= data[0] < 127 else []), []
    text = data.decode("utf-8", errors="replace")
    if lower:
        text = text.lower()
    if text.startswith(" "):
        word = text[1:]
        return ([word] if word else []), list(word)
    return ["##" + text], ["##" + c for c in text] + list(text)


def build_vocab_map(hf_dir: str | os.PathLike, tokenizer) -> dict:
    """Map every piece of ``tokenizer`` (a loaded project tokenizer) to an HF row.

    Returns {"ids": list (our id -> HF id or -1), "fallback": {our id: [HF ids]}, "matched",
    "total", "missing" (a few pieces), "style"}.
    """
    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    family = FAMILIES[cfg["model_type"]]
    vocab, style, lower = read_hf_vocab(hf_dir, family)
    from linformer_train.data.tokenizer import SPECIAL_IDS

    ids = [-1] * tokenizer.vocab_size
    for name, our_id in SPECIAL_IDS.items():
        piece = family["specials"][name]
        if piece not in vocab:
            raise ConversionError(f"{hf_dir}'s vocabulary has no {piece} (the {name} token)")
        ids[our_id] = vocab[piece]
    fallback, missing, as_unk = {}, [], 0
    specials = set(SPECIAL_IDS.values())
    for i in range(tokenizer.vocab_size):
        if i in specials:
            continue
        piece = tokenizer.sp.IdToPiece(i)
        exact, chars = _candidates(piece, style, lower)
        hit = next((vocab[c] for c in exact if c in vocab), None)
        if hit is None and style == "wordpiece" and (_is_byte_piece(piece) or piece == WORD_START):
            # a byte with no spelling in a WordPiece vocabulary reads as <unk> in the HF model too;
            # a bare word boundary has no WordPiece token at all (whitespace is dropped)
            hit = vocab[family["specials"]["unk"]]
            as_unk += 1
        if hit is not None:
            ids[i] = hit
            continue
        missing.append(piece)
        fallback[i] = [vocab[c] for c in chars if c in vocab]
    total = tokenizer.vocab_size - len(specials)
    hf_size = int(cfg["vocab_size"])
    if any(h >= hf_size for h in ids):
        raise ConversionError(f"{hf_dir}'s vocabulary has ids beyond its vocab_size={hf_size}; the "
                              f"tokenizer files do not belong to these weights")
    return {"ids": ids, "fallback": fallback, "matched": total - len(missing), "total": total,
            "missing": missing, "style": style, "as_unk": as_unk}


# --------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------


def _take(state: dict, key: str, used: set) -> torch.Tensor:
    used.add(key)
    return state[key]


def linformer_note(out_dir) -> str:
    """What a warm start into Linformer attention leaves to do (printed by the CLI at the start)."""
    return (f"note: attention=linformer: the source model has no E/F projections, so they start untrained "
            f"(mean pooling over windows) and {out_dir} does not yet compute what the source computed; "
            f"continue pretraining it (train.init_from={out_dir}) before fine-tuning, for well over 200 "
            f"steps: docs/QUALITY.md (warm start) measured a 6 x 384 BERT on SST-2 at 81.1% with full "
            f"attention, 75.5% as a Linformer, and still 75.8% after 200 MLM steps (205k tokens)")


def own_tokenizer(hf_dir: Path):
    """The source model's own tokenizer (its tokenizer.json), ids unchanged."""
    from linformer_train.data.tokenizer import HF_FILE, HFTokenizer

    path = hf_dir / HF_FILE
    if not path.is_file():
        raise ConversionError(
            f"{hf_dir} has no {HF_FILE} (the fast-tokenizer file that carries the model's own vocabulary); "
            f"write one with transformers (AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)), or "
            f"re-tokenize with --tokenizer TOK (a sentencepiece model; the study in docs/QUALITY.md lost "
            f"accuracy that way)")
    return HFTokenizer(path)


def warm_start(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Optional[str | os.PathLike] = None,
               model_overrides: Optional[dict] = None, positions: str = "copy",
               min_vocab_coverage: float = 1.0, init_missing_head: bool = False,
               dtype: str = "fp32", overwrite: bool = False, seed: int = 0) -> Path:
    """Convert a local HF RoBERTa/BERT directory into a Linformer MLM model directory. Without
    ``tokenizer`` the model keeps its own (tokenizer.json and the files naming its special
    tokens) and every embedding row keeps its id; a sentencepiece ``tokenizer`` re-maps the rows
    onto its pieces instead (see the module docstring)."""
    hf_dir = Path(hf_dir)
    check_output_dir(out_dir, overwrite, {"the source model": hf_dir, "the tokenizer": tokenizer})
    if positions not in POSITION_METHODS:
        raise ConversionError(f"positions={positions!r} is unknown; choose one of {', '.join(POSITION_METHODS)}")
    if not 0.0 <= min_vocab_coverage <= 1.0:
        raise ConversionError(f"min_vocab_coverage={min_vocab_coverage} must lie in [0, 1]")
    overrides = dict(model_overrides or {})
    bad = sorted(set(overrides) - set(USER_FIELDS))
    if bad:
        raise ConversionError(f"model.{bad[0]} comes from the Hugging Face model and cannot be set; "
                              f"choose among {', '.join('model.' + f for f in USER_FIELDS)}")
    hf = read_hf_config(hf_dir)
    family = FAMILIES[hf["model_type"]]
    offset = int(hf.get("pad_token_id", 1)) + 1 if family["prefix"] == "roberta." else 0
    n_hf = int(hf["max_position_embeddings"]) - offset
    if tokenizer is None:
        tok = own_tokenizer(hf_dir)
    else:
        tok = check_tokenizer(tokenizer, 1 << 31)
        if tok.kind == "hf" and tok.sha256 != own_tokenizer(hf_dir).sha256:
            raise ConversionError(f"--tokenizer {tok.path} is a Hugging Face tokenizer other than {hf_dir}'s own; "
                                  f"omit --tokenizer to keep the model's own, or give a sentencepiece model "
                                  f"to re-map the rows onto")
    if tok.kind == "hf":  # the model's own vocabulary: every row keeps its id
        if tok.vocab_size > int(hf["vocab_size"]):
            raise ConversionError(f"{tok.path} has {tok.vocab_size} tokens but {hf_dir} has "
                                  f"{hf['vocab_size']} embedding rows; the tokenizer does not belong to it")
        vmap = {"ids": list(range(int(hf["vocab_size"]))), "fallback": {}, "matched": tok.vocab_size,
                "total": tok.vocab_size, "missing": [], "style": "own", "as_unk": 0}
    else:
        vmap = build_vocab_map(hf_dir, tok)
    coverage = vmap["matched"] / max(1, vmap["total"])
    if coverage < min_vocab_coverage:
        raise ConversionError(
            f"vocabulary mismatch: {vmap['total'] - vmap['matched']} of {vmap['total']} pieces of tokenizer "
            f"{tok.path} are not in {hf_dir}'s {hf['model_type']} vocabulary (e.g. "
            f"{', '.join(repr(p) for p in vmap['missing'][:3])}); use the tokenizer that matches the model, "
            f"or allow it with --min-vocab-coverage {math.floor(coverage * 100) / 100:.2f} (missing rows "
            f"start as the mean of their characters' rows)")

    raw = {
        "vocab_size": len(vmap["ids"]), "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
        "ffn_size": hf["intermediate_size"], "max_seq_len": n_hf, "norm": "post",
        "layer_norm_eps": hf.get("layer_norm_eps", 1e-12),
        "dropout": hf.get("hidden_dropout_prob", 0.1),
        "attention_dropout": hf.get("attention_probs_dropout_prob", 0.1),
        "pad_token_id": tok.special_ids["pad"], "init_std": hf.get("initializer_range", 0.02),
        **overrides,
    }
    if "k" not in overrides:  # the paper's n=512 -> k=128 ratio, whatever n is
        raw["k"] = max(1, min(128, raw["max_seq_len"] // 4))
    cfg = model_config(raw, "warm start")

    state = _normalise_keys(read_hf_weights(hf_dir), family["prefix"])
    used: set = set()
    D = cfg.hidden_size
    fix = f"{hf_dir} is not a {hf['model_type']} checkpoint this converter reads"
    missing = [k for k in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                           "embeddings.LayerNorm.weight") if k not in state]
    if missing:
        raise ConversionError(f"{hf_dir} lacks {', '.join(missing)}; {fix}")
    words = _take(state, "embeddings.word_embeddings.weight", used).float()
    if tuple(words.shape) != (int(hf["vocab_size"]), D):
        raise ConversionError(f"{hf_dir}: word embeddings have shape {tuple(words.shape)} but config.json "
                              f"says ({hf['vocab_size']}, {D}); {fix}")
    pos = _take(state, "embeddings.position_embeddings.weight", used).float()[offset:]  # (n_hf, D)
    if "embeddings.token_type_embeddings.weight" in state:
        pos = pos + _take(state, "embeddings.token_type_embeddings.weight", used).float()[0]
    used.add("embeddings.position_ids")
    used.add("embeddings.token_type_ids")

    torch.manual_seed(seed)  # the E/F projections (and a fresh head) start from their init
    model = build_model(cfg, "mlm")
    ours = model.state_dict()
    new: dict[str, torch.Tensor] = {}

    def rows(table: torch.Tensor) -> torch.Tensor:
        """HF vocabulary rows (V_hf, ...) -> ours (V, ...); missing pieces from their characters."""
        out = table[torch.tensor([max(i, 0) for i in vmap["ids"]])].clone()
        for our_id, chars in vmap["fallback"].items():
            out[our_id] = table[chars].mean(0) if chars else table.mean(0)
        return out

    new["encoder.tokens.weight"] = rows(words)
    new["encoder.positions.weight"] = extend_positions(pos, cfg.max_seq_len, positions)
    new["encoder.embed_norm.weight"] = _take(state, "embeddings.LayerNorm.weight", used)
    new["encoder.embed_norm.bias"] = _take(state, "embeddings.LayerNorm.bias", used)
    for i in range(cfg.num_layers):
        src, dst = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        try:
            for part in ("weight", "bias"):
                new[dst + f"attn.qkv.{part}"] = torch.cat(
                    [_take(state, src + f"attention.self.{name}.{part}", used)
                     for name in ("query", "key", "value")], 0)       # (3D, D) / (3D,)
                new[dst + f"attn.out.{part}"] = _take(state, src + f"attention.output.dense.{part}", used)
                new[dst + f"attn_norm.{part}"] = _take(state, src + f"attention.output.LayerNorm.{part}", used)
                new[dst + f"ffn_in.{part}"] = _take(state, src + f"intermediate.dense.{part}", used)
                new[dst + f"ffn_out.{part}"] = _take(state, src + f"output.dense.{part}", used)
                new[dst + f"ffn_norm.{part}"] = _take(state, src + f"output.LayerNorm.{part}", used)
        except KeyError as exc:
            raise ConversionError(f"{hf_dir} lacks {exc.args[0]}; {fix}") from None

    head_present = [k for k in family["head"] if k in state]
    if len(head_present) == len(family["head"]):
        for src, dst in family["head"].items():
            t = _take(state, src, used)
            new[dst] = rows(t) if dst == "head_bias" else t
        dec_w, dec_b = family["decoder"]
        if dec_w in state and not torch.equal(_take(state, dec_w, used), state[
                "embeddings.word_embeddings.weight"]):
            raise ConversionError(f"{hf_dir}: the MLM decoder differs from the word embeddings; the "
                                  f"Linformer's decoder is tied to them")
        bias_key = next(k for k, v in family["head"].items() if v == "head_bias")
        if dec_b in state and not torch.equal(_take(state, dec_b, used), state[bias_key]):
            raise ConversionError(f"{hf_dir}: the MLM decoder bias differs from the head bias")
    elif head_present:
        raise ConversionError(f"{hf_dir} has a partial MLM head ({len(head_present)} of "
                              f"{len(family['head'])} tensors); {fix}")
    elif not init_missing_head:
        raise ConversionError(f"{hf_dir} has no MLM head (a base model); pass --init-head to start "
                              f"one fresh")
    else:
        for key in ("head_dense.weight", "head_dense.bias", "head_norm.weight", "head_norm.bias", "head_bias"):
            new[key] = ours[key]
    used.update(k for k in family["dropped"] if k in state)

    unexpected = sorted(set(state) - used)
    if unexpected:
        raise ConversionError(f"{hf_dir} has {len(unexpected)} tensor(s) the mapping does not place "
                              f"({', '.join(unexpected[:3])}); {fix}")
    for key, value in ours.items():  # E/F projections: their fresh init
        new.setdefault(key, value)
    extra = sorted(set(new) - set(ours))
    if extra:
        raise ConversionError(f"internal mapping error: keys {extra[:3]} do not exist in the Linformer")
    for key, value in new.items():
        if tuple(value.shape) != tuple(ours[key].shape):
            raise ConversionError(f"{hf_dir}: {key} maps to shape {tuple(value.shape)} but the Linformer "
                                  f"needs {tuple(ours[key].shape)}; {fix}")
    model.load_state_dict({k: v.float() for k, v in new.items()}, strict=True)
    source = {"kind": "hf-warm-start", "from": str(hf_dir.resolve()), "model_type": hf["model_type"],
              "hf_max_positions": n_hf, "position_offset": offset, "positions": positions,
              "vocab_style": vmap["style"], "vocab_matched": vmap["matched"], "vocab_total": vmap["total"],
              "vocab_as_unk": vmap["as_unk"], "tokenizer": "own" if tok.kind == "hf" else "re-mapped",
              "segment_embeddings": "row 0 folded into positions",
              "initialised": [k for k in ours if "proj" in k] + ([] if head_present else ["MLM head"])}
    return save_pretrained(model, out_dir, tokenizer=tok.path, dtype=dtype, source=source,
                           overwrite=overwrite)

