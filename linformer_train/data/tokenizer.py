"""SentencePiece tokenizer: train one with fixed special ids on any source, load it back and check it.

Every tokenizer this project uses reserves ids 0-4 for ``<pad> <s> </s> <unk> <mask>``; ``<mask>`` is
a control symbol, so the literal text "<mask>" in a corpus is never read as a mask. Byte fallback is
always on: a character outside the vocabulary becomes its UTF-8 bytes, never ``<unk>``. Next to
``tokenizer.model`` a small ``tokenizer.json`` records the special ids, the training settings and
the model's sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence

import numpy as np

from linformer_train.data import DataError

if TYPE_CHECKING:  # pragma: no cover
    from linformer_train.config import DataConfig
    from linformer_train.data.corpus import Source

PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_PIECES = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
SPECIAL_IDS = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID, "mask": MASK_ID}
MODEL_FILE = "tokenizer.model"
MIN_VOCAB_SIZE = len(SPECIAL_IDS) + 256 + 1  # the specials, 256 byte pieces, at least one more
MAX_SENTENCE_BYTES = 1 << 16
WORD_START = "\u2581"  # sentencepiece's "▁": the piece begins a new word


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_path(path: str | os.PathLike) -> Path:
    """A tokenizer location (a .model file, or a directory holding tokenizer.model) -> the file."""
    path = Path(path).expanduser()
    return path if path.suffix == ".model" else path / MODEL_FILE


def meta_path(model: Path) -> Path:
    """The JSON next to a model: tokenizer.model -> tokenizer.json."""
    return model.with_suffix(".json")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


class Tokenizer:
    """A loaded sentencepiece model with this project's special ids checked."""

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


def read_meta(model: Path) -> dict:
    """The tokenizer.json next to a model ({} when absent); DataError when it is not a JSON object."""
    meta = meta_path(model)
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text())
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise DataError(f"{meta} is not a valid tokenizer record (a JSON object); delete it or train the "
                        f"tokenizer again")
    return data


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer (.model file or its directory); DataError when it lacks this project's
    special pieces at their ids."""
    return Tokenizer(path)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def training_spec(cfg: "DataConfig", vocab_size: int) -> dict:
    """The settings that decide a trained tokenizer (with the source's fingerprint: its identity)."""
    return {"type": cfg.tokenizer_type, "vocab_size": int(vocab_size),
            "character_coverage": cfg.tokenizer_character_coverage,
            "sample_sentences": cfg.tokenizer_sample_sentences, "byte_fallback": True,
            "special_ids": SPECIAL_IDS}


def _sentences(documents: Iterator[str], counter: list[int]) -> Iterator[str]:
    """Lines of every document (sentencepiece trains on lines); counts them in counter[0]."""
    for doc in documents:
        for line in doc.splitlines():
            line = line.strip()
            if line:
                counter[0] += 1
                yield line


def train_tokenizer(cfg: "DataConfig", out_dir: str | os.PathLike, vocab_size: int,
                    source: Optional["Source"] = None) -> Path:
    """Train a sentencepiece model on ``data``'s source; write tokenizer.model and tokenizer.json.

    ``out_dir`` is a directory (tokenizer.model goes inside) or a path ending in .model. Unigram or
    BPE per ``data.tokenizer_type``; sentencepiece samples ``data.tokenizer_sample_sentences`` lines
    uniformly (reservoir) from a bigger source, so memory stays bounded. Files are replaced
    atomically. Returns the path of the .model file.
    """
    import sentencepiece as spm

    from linformer_train.data.corpus import build_source

    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"tokenizer vocab_size={vocab_size} is too small: 5 special pieces and 256 "
                        f"byte pieces need at least {MIN_VOCAB_SIZE}; raise data.tokenizer_vocab_size")
    source = source or build_source(cfg)
    path = model_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    counter = [0]
    buffer = io.BytesIO()
    t0 = time.perf_counter()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_sentences(source.documents(), counter),
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
            raise DataError(f"cannot train a tokenizer: {source.description} has no text; "
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
        raise DataError(f"sentencepiece could not train on {source.description}: {msg}") from None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    meta = {
        "special_ids": SPECIAL_IDS,
        "special_pieces": SPECIAL_PIECES,
        "sha256": sha256_file(path),
        "trained_with": training_spec(cfg, vocab_size),
        "source": source.description,
        "source_fingerprint": source.fingerprint(),
        "sentences_seen": counter[0],
        "sentences_used": min(counter[0], cfg.tokenizer_sample_sentences),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    meta_file = meta_path(path)
    tmp = meta_file.with_name(meta_file.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    tmp.replace(meta_file)
    return path
