"""Tokenizer: fixed special ids, round trips, byte fallback, word starts, refusals with clear messages."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from linformer_train.config import load_config
from linformer_train.data import DataError
from linformer_train.data.pipeline import train_tokenizer
from linformer_train.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, UNK_ID, load_tokenizer, meta_path


@pytest.fixture(scope="module")
def tok_path(corpus, tmp_path_factory) -> Path:
    cfg = load_config([], ["data.source=files", f"data.paths=[{corpus}]"]).data
    return train_tokenizer(cfg, tmp_path_factory.mktemp("tok"), 600)


def raw_sentencepiece(corpus: Path, out: Path, **kw) -> Path:
    """A sentencepiece model trained without this project's conventions."""
    buf = io.BytesIO()
    lines = [line for line in corpus.read_text().splitlines() if line.strip()]
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=400,
                                   minloglevel=2, **kw)
    out.write_bytes(buf.getvalue())
    return out


def test_special_ids_fixed_and_recorded(tok_path):
    tok = load_tokenizer(tok_path.parent)  # a directory works as well as the .model file
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID) == (0, 1, 2, 3, 4)
    assert [tok.sp.IdToPiece(i) for i in range(5)] == ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    assert tok.special_ids == {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "mask": 4}
    assert tok.vocab_size == 600
    meta = json.loads(meta_path(tok_path).read_text())
    assert meta["special_ids"] == tok.special_ids
    assert meta["sha256"] == tok.sha256 and len(tok.sha256) == 64
    assert meta["trained_with"]["byte_fallback"] is True


def test_round_trip_text_tokens_text(tok_path):
    tok = load_tokenizer(tok_path)
    texts = ["The quick brown fox jumps over the lazy dog.",
             "Unicode falls back to bytes: naïve café, 東京, 🙂 and ∑ x_i."]
    ids = tok.encode(texts)
    assert len(ids) == 2 and all(isinstance(i, int) for i in ids[0])
    assert [tok.decode(x) for x in ids] == texts
    assert tok.encode(texts[0]) == ids[:1]  # a single string counts as one text
    assert UNK_ID not in ids[1]  # byte fallback, not <unk>
    assert tok.decode(np.array(ids[0])) == texts[0]


def test_literal_mask_text_is_not_the_mask_token(tok_path):
    tok = load_tokenizer(tok_path)
    ids = tok.encode("a <mask> b")[0]
    assert MASK_ID not in ids
    assert tok.decode([BOS_ID, *tok.encode("x")[0], MASK_ID, EOS_ID], keep_special=True) == "<s>x<mask></s>"


def test_word_start_marks_pieces_that_begin_words(tok_path):
    tok = load_tokenizer(tok_path)
    assert tok.word_start.shape == (tok.vocab_size,) and tok.word_start.dtype == bool
    for i in range(5, tok.vocab_size):
        assert tok.word_start[i] == tok.sp.IdToPiece(i).startswith("\u2581")
    assert tok.word_start[:5].all()
    ids = tok.encode("internationalization considerations")[0]
    assert tok.word_start[ids[0]] and sum(tok.word_start[i] for i in ids) == 2


def test_bpe_tokenizer(corpus, tmp_path):
    cfg = load_config([], ["data.source=files", f"data.paths=[{corpus}]", "data.tokenizer_type=bpe"]).data
    tok = load_tokenizer(train_tokenizer(cfg, tmp_path / "bpe.model", 500))
    assert tok.sp.IdToPiece(MASK_ID) == "<mask>" and tok.vocab_size == 500
    assert tok.decode(tok.encode("Hello, world")[0]) == "Hello, world"
    assert meta_path(tok.path).name == "bpe.json"


def test_refuses_tokenizer_without_mask(corpus, tmp_path):
    path = raw_sentencepiece(corpus, tmp_path / "plain.model")
    with pytest.raises(DataError, match=r"has no <mask> piece.*tools/train_tokenizer.py"):
        load_tokenizer(path)


def test_refuses_tokenizer_with_other_ids(corpus, tmp_path):
    path = raw_sentencepiece(corpus, tmp_path / "other.model", control_symbols=["<mask>"],
                             unk_id=0, bos_id=1, eos_id=2, pad_id=3)
    with pytest.raises(DataError, match=r"has <pad> at id 3 but this project expects id 0"):
        load_tokenizer(path)


def test_refuses_sidecar_with_disagreeing_ids(tok_path, tmp_path):
    copy = tmp_path / "tokenizer.model"
    copy.write_bytes(tok_path.read_bytes())
    meta = json.loads(meta_path(tok_path).read_text())
    meta["special_ids"]["mask"] = 7
    meta_path(copy).write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"records special ids .* disagree"):
        load_tokenizer(copy)


def test_missing_and_broken_model_files(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; train one with tools/train_tokenizer.py"):
        load_tokenizer(tmp_path / "nope")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"is not a sentencepiece model"):
        load_tokenizer(bad)


def test_training_errors_are_one_line(corpus, tmp_path):
    cfg = load_config([], ["data.source=files", f"data.paths=[{corpus}]"]).data
    with pytest.raises(DataError, match=r"too small: .* at least 262"):
        train_tokenizer(cfg, tmp_path, 100)
    with pytest.raises(DataError, match=r"vocab_size=300 is smaller than the \d+ pieces this corpus needs "
                                        r"for its characters .* raise data.tokenizer_vocab_size"):
        train_tokenizer(cfg, tmp_path, 300)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words\n")
    cfg = load_config([], ["data.source=files", f"data.paths=[{tiny}]"]).data
    with pytest.raises(DataError, match=r"too large for this corpus") as err:
        train_tokenizer(cfg, tmp_path, 5000)
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cfg = load_config([], ["data.source=files", f"data.paths=[{empty}]"]).data
    with pytest.raises(DataError, match=r"has no text"):
        train_tokenizer(cfg, tmp_path, 400)


def test_sampling_caps_training_lines(corpus, tmp_path):
    cfg = load_config([], ["data.source=files", f"data.paths=[{corpus}]",
                           "data.tokenizer_sample_sentences=300"]).data
    path = train_tokenizer(cfg, tmp_path, 400)
    meta = json.loads(meta_path(path).read_text())
    assert meta["sentences_seen"] > 300 and meta["sentences_used"] == 300
    assert load_tokenizer(path).vocab_size == 400
