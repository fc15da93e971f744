"""Tokenizers: this project's sentencepiece models (trained here) and Hugging Face tokenizer files
(``tokenizer.json``: WordPiece, BPE or Unigram, carried over from a warm-started model).

A sentencepiece tokenizer trained here reserves ids 0-4 for ``<pad> <s> </s> <unk> <mask>``;
``<mask>`` is a control symbol, so the literal text "<mask>" in a corpus is never read as a mask.
Byte fallback is always on: a character outside the vocabulary becomes its UTF-8 bytes, never
``<unk>``. Next to ``tokenizer.model`` a small ``tokenizer.json`` records the special ids, the
training settings and the model's sha256. Training takes lines of text, not a source: the pipeline
(``data.pipeline.train_tokenizer``) reads them from one.

A Hugging Face tokenizer keeps its own ids: its special tokens are read from
``tokenizer_config.json`` / ``special_tokens_map.json`` beside it (``cls_token`` or ``bos_token``
starts a sequence, ``sep_token`` or ``eos_token`` ends one, ``pad_token``, ``mask_token``,
``unk_token``), else found by their usual names ([CLS] / <s>, ...). Every consumer reads
``special_ids`` from the tokenizer instead of assuming 0-4. A directory holding ``tokenizer.model``
is sentencepiece; one holding only ``tokenizer.json`` (the Hugging Face format) is Hugging Face.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from linformer_train.config import MIN_VOCAB_SIZE, SPECIAL_TOKENS  # the vocabulary floor: a config rule
from linformer_train.data import DataError
from linformer_train.serialization import read_json_object

if TYPE_CHECKING:  # pragma: no cover
    from linformer_train.config import DataConfig

PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_PIECES = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
SPECIAL_IDS = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID, "mask": MASK_ID}
MODEL_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
"""Files beside a Hugging Face tokenizer.json that name its special tokens; copied with it."""
MAX_SENTENCE_BYTES = 1 << 16
MAX_SENTENCE_CHARS = MAX_SENTENCE_BYTES // 4
"""A longer line is cut before training: sentencepiece drops a line over MAX_SENTENCE_BYTES, and a
character is up to 4 bytes."""
WORD_START = "\u2581"  # sentencepiece's "▁": the piece begins a new word


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_path(path: str | os.PathLike) -> Path:
    """A tokenizer location -> its file: a .model or .json file is itself; a directory gives its
    tokenizer.model, else its Hugging Face tokenizer.json, else tokenizer.model (where one is trained)."""
    path = Path(path).expanduser()
    if path.suffix in (".model", ".json"):
        return path
    if not (path / MODEL_FILE).is_file() and is_hf_tokenizer_file(path / HF_FILE):
        return path / HF_FILE
    return path / MODEL_FILE


def is_hf_tokenizer_file(path: Path) -> bool:
    """A Hugging Face tokenizer.json (a pipeline with a "model" section), not a sentencepiece
    model's record of the same name."""
    if not path.is_file() or path.suffix != ".json" or path.with_suffix(".model").is_file():
        return False
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(1 << 16)
    except (OSError, UnicodeDecodeError):
        return False
    return '"model"' in head and ('"normalizer"' in head or '"pre_tokenizer"' in head or '"added_tokens"' in head)


def meta_path(model: Path) -> Path:
    """The JSON next to a model: tokenizer.model -> tokenizer.json."""
    return model.with_suffix(".json")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


class Tokenizer:
    """A loaded sentencepiece model with this project's special ids checked."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = model_path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer {self.path} does not exist; train one with "
                            f"tools/train_tokenizer.py, or unset data.tokenizer to train it while preparing")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise DataError(f"tokenizer {self.path} is not a sentencepiece model ({exc}); "
                            f"train one with tools/train_tokenizer.py") from None
        self.sha256 = sha256_file(self.path)
        self.vocab_size = int(self.sp.GetPieceSize())
        self.meta = self._read_meta()
        self._check_specials()
        self.special_ids = dict(SPECIAL_IDS)
        pieces = [self.sp.IdToPiece(i) for i in range(self.vocab_size)]
        self.word_start = np.array([p.startswith(WORD_START) for p in pieces], dtype=bool)
        self.word_start[list(SPECIAL_IDS.values())] = True  # a special token always ends a word

    def _read_meta(self) -> dict:
        return read_meta(self.path)

    def _check_specials(self) -> None:
        where = f"tokenizer {self.path}"
        fix = "train one with tools/train_tokenizer.py (it reserves <pad> <s> </s> <unk> <mask> as ids 0-4)"
        mask = self.sp.PieceToId(SPECIAL_PIECES["mask"])
        if mask == self.sp.unk_id() and SPECIAL_PIECES["mask"] != SPECIAL_PIECES["unk"]:
            raise DataError(f"{where} has no <mask> piece, which masked-language modelling needs; {fix}")
        for name, want in SPECIAL_IDS.items():
            piece = SPECIAL_PIECES[name]
            got = self.sp.PieceToId(piece)
            if got != want or self.sp.IdToPiece(want) != piece:
                raise DataError(f"{where} has {piece} at id {got} but this project expects id {want}; {fix}")
        recorded = self.meta.get("special_ids", SPECIAL_IDS)
        if recorded != SPECIAL_IDS:
            raise DataError(f"{meta_path(self.path)} records special ids {recorded}, which disagree with "
                            f"this project's {SPECIAL_IDS}; {fix}")

    def encode(self, texts: Sequence[str] | str, num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text (a single str counts as one text); no <s> or </s> added."""
        if isinstance(texts, str):
            texts = [texts]
        return self.sp.Encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        """Text of a token sequence; with keep_special, <mask>, </s> and friends show as pieces."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if not keep_special:
            return self.sp.Decode(ids)
        specials = set(SPECIAL_IDS.values())
        out, run = [], []
        for i in ids:
            if i in specials:
                out.append(self.sp.Decode(run))
                out.append(self.sp.IdToPiece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.Decode(run))
        return "".join(out)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"

    def __reduce__(self):  # another process (a datasets.map worker) loads the file again
        return (Tokenizer, (self.path,))

    @property
    def files(self) -> list[Path]:
        """What a model directory copies: the model and, when present, its record."""
        return [self.path] + ([meta_path(self.path)] if meta_path(self.path).is_file() else [])


def read_meta(model: Path) -> dict:
    """The tokenizer.json next to a model ({} when absent); DataError when it is not a JSON object."""
    meta = meta_path(model)
    if not meta.is_file():
        return {}
    return read_json_object(meta, DataError, "a valid tokenizer record (a JSON object)",
                            "delete it or train the tokenizer again")


# The roles a sequence needs, the tokenizer_config.json keys that name them (first found wins), and
# the usual token names to look for when no config names them (BERT's first, then RoBERTa's).
HF_ROLES = {"bos": ("cls_token", "bos_token"), "eos": ("sep_token", "eos_token"), "pad": ("pad_token",),
            "unk": ("unk_token",), "mask": ("mask_token",)}
HF_USUAL = {"bos": ("[CLS]", "<s>"), "eos": ("[SEP]", "</s>"), "pad": ("[PAD]", "<pad>"),
            "unk": ("[UNK]", "<unk>"), "mask": ("[MASK]", "<mask>")}


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (through the ``tokenizers`` library) with the interface of
    :class:`Tokenizer`: ids as the source model knew them, special ids read from its files."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike):
        try:
            from tokenizers import Tokenizer as _Pipeline
        except ImportError:  # pragma: no cover - a dependency of the project
            raise DataError("reading a Hugging Face tokenizer needs the tokenizers package; "
                            "pip install tokenizers") from None
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DataError(f"tokenizer {self.path} does not exist")
        try:
            self.pipeline = _Pipeline.from_file(str(self.path))
            self.spec = json.loads(self.path.read_text(encoding="utf-8"))
        except Exception as exc:  # tokenizers raises a plain Exception for a bad file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"{self.path} is not a Hugging Face tokenizer file ({first[:120]}); save one "
                            f"with transformers' tokenizer.save_pretrained(DIR)") from None
        self.pipeline.no_truncation()  # inputs are cut by the data code, which knows n and the specials
        self.pipeline.no_padding()
        self.sha256 = sha256_file(self.path)
        self.vocab_size = int(self.pipeline.get_vocab_size(with_added_tokens=True))
        self.meta: dict = {}
        self.special_ids = self._special_ids()
        self.word_start = self._word_starts()

    @property
    def files(self) -> list[Path]:
        return [self.path] + [self.path.parent / n for n in HF_SIDE_FILES if (self.path.parent / n).is_file()]

    def _declared(self) -> dict[str, str]:
        declared: dict[str, str] = {}
        for name in HF_SIDE_FILES:
            f = self.path.parent / name
            if not f.is_file():
                continue
            data = read_json_object(f, DataError, fix="fix it or delete it (the usual special-token names "
                                    "are then looked up)")
            for key in {k for keys in HF_ROLES.values() for k in keys}:
                value = data.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and value:
                    declared.setdefault(key, value)
        return declared

    def _special_ids(self) -> dict[str, int]:
        declared = self._declared()
        ids: dict[str, int] = {}
        for role, keys in HF_ROLES.items():
            token = next((declared[k] for k in keys if k in declared), None)
            if token is None:
                token = next((t for t in HF_USUAL[role] if self.pipeline.token_to_id(t) is not None), None)
            if token is None:
                if role == "unk":  # byte-level vocabularies can do without
                    continue
                raise DataError(f"tokenizer {self.path} names no {role} token ({' or '.join(keys)} in "
                                f"{' / '.join(HF_SIDE_FILES)}) and has none of {', '.join(HF_USUAL[role])}; "
                                f"add the token to the tokenizer and name it in tokenizer_config.json")
            tid = self.pipeline.token_to_id(token)
            if tid is None:
                raise DataError(f"tokenizer {self.path}: its config names {token!r} as the {role} token, "
                                f"but the vocabulary has no such token")
            ids[role] = int(tid)
        return ids

    def _word_starts(self) -> np.ndarray:
        """Pieces that begin a word (whole-word masking): WordPiece marks continuations (##),
        byte-level BPE marks starts (Ġ), Metaspace/Unigram marks starts (▁); otherwise every piece
        counts as a word."""
        model = self.spec.get("model") or {}
        pre = json.dumps(self.spec.get("pre_tokenizer") or {})
        pieces = [self.pipeline.id_to_token(i) or "" for i in range(self.vocab_size)]
        if model.get("type") == "WordPiece":
            prefix = model.get("continuing_subword_prefix") or "##"
            starts = [not p.startswith(prefix) for p in pieces]
        elif "ByteLevel" in pre:
            starts = [p.startswith("Ġ") for p in pieces]
        elif "Metaspace" in pre or model.get("type") == "Unigram":
            starts = [p.startswith(WORD_START) for p in pieces]
        else:
            starts = [True] * len(pieces)
        out = np.array(starts, dtype=bool)
        out[list(self.special_ids.values())] = True
        return out

    def encode(self, texts: Sequence[str] | str, num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text (a single str counts as one text); no specials added."""
        if isinstance(texts, str):
            texts = [texts]
        return [e.ids for e in self.pipeline.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        return self.pipeline.decode(ids, skip_special_tokens=not keep_special)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"

    def __reduce__(self):
        return (HFTokenizer, (self.path,))


def load_tokenizer(path: str | os.PathLike) -> "Tokenizer | HFTokenizer":
    """Load a tokenizer: a sentencepiece .model (or a directory holding tokenizer.model), checked
    for this project's special pieces at their ids; or a Hugging Face tokenizer.json (or a directory
    holding only that), with its own special ids. DataError when it is neither."""
    file = model_path(path)
    if file.suffix == ".json":
        if file.with_suffix(".model").is_file():  # the record of a sentencepiece model
            return Tokenizer(file.with_suffix(".model"))
        return HFTokenizer(file)
    return Tokenizer(file)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def training_spec(cfg: "DataConfig", vocab_size: int) -> dict:
    """The settings that decide a trained tokenizer (with the source's fingerprint: its identity)."""
    return {"type": cfg.tokenizer_type, "vocab_size": int(vocab_size),
            "character_coverage": cfg.tokenizer_character_coverage,
            "sample_sentences": cfg.tokenizer_sample_sentences, "byte_fallback": True,
            "special_ids": SPECIAL_IDS}


def train_sentencepiece(lines: Iterable[str], out_dir: str | os.PathLike, vocab_size: int,
                        cfg: "DataConfig", source: str, source_fingerprint: dict[str, Any]) -> Path:
    """Train a sentencepiece model on ``lines``; write tokenizer.model and tokenizer.json.

    ``lines`` are non-blank and at most MAX_SENTENCE_CHARS long (``corpus.lines`` makes them);
    ``source`` and ``source_fingerprint`` describe where they came from, for the record and for
    reuse checks. ``out_dir`` is a directory (tokenizer.model goes inside) or a path ending in .model.
    Unigram or BPE per ``data.tokenizer_type``; sentencepiece samples ``data.tokenizer_sample_sentences``
    lines uniformly (reservoir) from a bigger source, so memory stays bounded. Files are replaced
    atomically. Returns the path of the .model file.
    """
    import sentencepiece as spm

    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"tokenizer vocab_size={vocab_size} is too small: {SPECIAL_TOKENS} special pieces and 256 "
                        f"byte pieces need at least {MIN_VOCAB_SIZE}; raise data.tokenizer_vocab_size")
    path = model_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    counter = [0]

    def counted(lines: Iterable[str]) -> Iterator[str]:
        for line in lines:
            counter[0] += 1
            yield line

    buffer = io.BytesIO()
    t0 = time.perf_counter()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=counted(lines),
            model_writer=buffer,
            model_type=cfg.tokenizer_type,
            vocab_size=vocab_size,
            character_coverage=cfg.tokenizer_character_coverage,
            byte_fallback=True,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            pad_piece=SPECIAL_PIECES["pad"], bos_piece=SPECIAL_PIECES["bos"],
            eos_piece=SPECIAL_PIECES["eos"], unk_piece=SPECIAL_PIECES["unk"],
            control_symbols=[SPECIAL_PIECES["mask"]],
            input_sentence_size=cfg.tokenizer_sample_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            train_extremely_large_corpus=False,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else "sentencepiece failed"
        if counter[0] == 0:
            raise DataError(f"cannot train a tokenizer: {source} has no text; "
                            f"check data.source and data.paths") from None
        if "Vocabulary size too high" in msg:
            hint = msg.split("Please set it to a value")[-1].strip(" .")
            raise DataError(f"tokenizer vocab_size={vocab_size} is too large for this corpus "
                            f"({counter[0]:,} lines; sentencepiece: set it to a value {hint}); lower "
                            f"data.tokenizer_vocab_size or use more text") from None
        if "smaller than required_chars" in msg:
            need = re.search(r"(\d+) vs (\d+)", msg)
            need_text = f"the {need.group(2)} pieces" if need else "the pieces"
            raise DataError(f"tokenizer vocab_size={vocab_size} is smaller than {need_text} this corpus "
                            f"needs for its characters at data.tokenizer_character_coverage="
                            f"{cfg.tokenizer_character_coverage}; raise data.tokenizer_vocab_size or "
                            f"lower the coverage") from None
        raise DataError(f"sentencepiece could not train on {source}: {msg}") from None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    meta = {
        "special_ids": SPECIAL_IDS,
        "special_pieces": SPECIAL_PIECES,
        "sha256": sha256_file(path),
        "trained_with": training_spec(cfg, vocab_size),
        "source": source,
        "source_fingerprint": source_fingerprint,
        "sentences_seen": counter[0],
        "sentences_used": min(counter[0], cfg.tokenizer_sample_sentences),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    meta_file = meta_path(path)
    tmp = meta_file.with_name(meta_file.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    tmp.replace(meta_file)
    return path
