"""Preparation: packing keeps every token in order, exact n-token blocks, manifest, reuse, refusals."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linformer_train.config import load_config
from linformer_train.data import DataError
from linformer_train.data.pipeline import ensure_prepared, train_tokenizer
from linformer_train.data.prepare import SPLIT_SEED, Packer, _unit_hash, open_prepared, summarize
from linformer_train.data.tokenizer import BOS_ID, EOS_ID, load_tokenizer


@pytest.fixture(scope="module")
def tok_path(corpus, tmp_path_factory) -> Path:
    cfg = load_config([], ["data.source=files", f"data.paths=[{corpus}]"]).data
    return train_tokenizer(cfg, tmp_path_factory.mktemp("tok"), 500)


def data_cfg(paths, tok=None, *extra):
    overrides = ["data.source=files", f"data.paths={json.dumps([str(p) for p in paths])}",
                 "data.num_proc=1", "model.vocab_size=1000", *extra]
    if tok is not None:
        overrides.append(f"data.tokenizer={tok}")
    return load_config([], overrides).data


def split_streams(docs: list[list[int]], fraction: float) -> dict[str, np.ndarray]:
    """What packing must produce per split: documents in order, each followed by </s>."""
    is_val = _unit_hash(np.arange(len(docs), dtype=np.uint64), SPLIT_SEED) < fraction
    out = {}
    for split, want in (("train", False), ("validation", True)):
        chosen = [d + [EOS_ID] for d, v in zip(docs, is_val) if v == want and d]
        out[split] = np.array([t for d in chosen for t in d], dtype=np.int64)
    return out


def test_packing_keeps_every_token_in_order(corpus, tok_path, tmp_path):
    cfg = data_cfg([corpus], tok_path, "data.validation_fraction=0.2")
    n = 48
    root = ensure_prepared(cfg, n, tmp_path, 1000)
    data = open_prepared(root, n)
    tok = load_tokenizer(tok_path)
    from linformer_train.data.corpus import FileSource

    docs = tok.encode(list(FileSource([corpus]).documents()))
    expected = split_streams(docs, 0.2)
    dropped = 0
    for split, blocks in (("train", data.train), ("validation", data.validation)):
        rows = blocks.take(np.arange(len(blocks))).astype(np.int64)
        assert rows.shape == (len(blocks), n)                  # exactly n tokens, no padding
        assert (rows[:, 0] == BOS_ID).all()                    # every block starts with <s>
        flat = rows[:, 1:].reshape(-1)
        want = expected[split]
        assert len(want) - len(flat) < n - 1                   # only the last partial row is dropped
        np.testing.assert_array_equal(flat, want[: len(flat)])  # every token, in order
        dropped += len(want) - len(flat)
    m = data.manifest
    assert m["tokens"]["dropped_tail"] == dropped
    assert m["tokens"]["documents"] == sum(map(len, docs))
    assert m["splits"]["train"]["blocks"] == len(data.train) and len(data.validation) >= 1
    assert m["documents"]["train"] + m["documents"]["validation"] == sum(1 for d in docs if d)
    assert m["seq_len"] == n and m["tokenizer"]["sha256"] == tok.sha256
    assert m["dtype"] == "uint16" and data.tokenizer_path == tok_path
    assert data.train[0].shape == (n,) and data.train[-1].shape == (n,)
    with pytest.raises(IndexError):
        data.train[len(data.train)]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=60), n=st.integers(2, 33),
       fraction=st.floats(0.05, 0.45), batch=st.integers(1, 7), wide=st.booleans())
def test_packer_property(lengths, n, fraction, batch, wide):
    dtype = np.dtype(np.uint32 if wide else np.uint16)
    rng = np.random.default_rng(len(lengths))
    docs = [list(rng.integers(5, 60000, size=k)) for k in lengths]
    expected = split_streams([[int(t) for t in d] for d in docs], fraction)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        packer = Packer(out, n, dtype, fraction, bos_id=BOS_ID, eos_id=EOS_ID,  # the packing itself, here
                        allow_uneven_split=True)
        for i in range(0, len(docs), batch):  # batch boundaries must not matter
            part = docs[i:i + batch]
            values = np.array([t for d in part for t in d], dtype=dtype)
            packer.add(values, np.array([len(d) for d in part], dtype=np.int64))
        try:
            counts = packer.finish(out, "test corpus")
        except DataError as exc:
            total = sum(len(v) for v in expected.values())
            assert any(words in str(exc) for words in ("fewer than", "has no text", "splitting by document"))
            assert total < 3 * (n - 1) or min(len(v) for v in expected.values()) < n - 1
            return
        flat = {s: np.fromfile(out / f"{s}.bin", dtype=dtype).reshape(-1, n) for s in ("train", "validation")}
        moved = counts["validation_blocks_from_train_tail"]
        train_stream = flat["train"][:, 1:].reshape(-1).astype(np.int64)
        assert (flat["train"][:, 0] == BOS_ID).all() and (flat["validation"][:, 0] == BOS_ID).all()
        if moved:  # the held-out block is the training stream's next row
            train_stream = np.concatenate([train_stream, flat["validation"][0, 1:].astype(np.int64)])
            assert len(flat["validation"]) == 1
        else:
            val = flat["validation"][:, 1:].reshape(-1).astype(np.int64)
            np.testing.assert_array_equal(val, expected["validation"][: len(val)])
        np.testing.assert_array_equal(train_stream, expected["train"][: len(train_stream)])
        assert counts["splits"]["train"]["blocks"] >= 1 and counts["splits"]["validation"]["blocks"] >= 1


def test_rerun_reuses_and_changes_are_refused(corpus, tok_path, tmp_path):
    cfg = data_cfg([corpus], tok_path)
    root = ensure_prepared(cfg, 32, tmp_path, 1000)
    stamp = {f: (root / f).stat().st_mtime_ns for f in ("train.bin", "validation.bin", "manifest.json")}
    assert ensure_prepared(cfg, 32, tmp_path, 1000) == root
    assert stamp == {f: (root / f).stat().st_mtime_ns for f in stamp}  # reused, not rewritten
    with pytest.raises(DataError, match=r"holds data prepared from other inputs \(seq_len: 32 -> 64\).*--overwrite"):
        ensure_prepared(cfg, 64, tmp_path, 1000)
    with pytest.raises(DataError, match=r"prepared with n=32 but model.max_seq_len=64"):
        open_prepared(root, 64)
    with pytest.raises(DataError, match=r"tokenizer sha256 [0-9a-f]{12} but this run's tokenizer is abcdef012345"):
        open_prepared(root, 32, tokenizer_sha256="abcdef012345" + "0" * 52)
    ensure_prepared(cfg, 64, tmp_path, 1000, overwrite=True)
    assert open_prepared(root, 64).manifest["seq_len"] == 64


def test_changed_source_or_tokenizer_is_refused(corpus, tmp_path):
    text = tmp_path / "c.txt"
    text.write_text(corpus.read_text())
    tok_file = tmp_path / "tok" / "tokenizer.model"  # missing: trained there, then reused
    cfg = data_cfg([text], tok_file, "data.tokenizer_vocab_size=400")
    root = ensure_prepared(cfg, 32, tmp_path, 1000)
    assert tok_file.is_file() and ensure_prepared(cfg, 32, tmp_path, 1000) == root
    with open(text, "a") as f:
        f.write("\nOne more document.\n")
    with pytest.raises(DataError, match=r"other inputs \(source.files"):
        ensure_prepared(cfg, 32, tmp_path, 1000)
    other = load_config([], ["data.source=files", f"data.paths=[{corpus}]"]).data
    train_tokenizer(other, tok_file, 450)  # someone replaced the tokenizer file
    with pytest.raises(DataError, match=r"other inputs \(tokenizer_sha256: "):
        ensure_prepared(cfg, 32, tmp_path, 1000)


def test_trained_here_tokenizer_settings_change_is_refused(corpus, tmp_path):
    cfg = data_cfg([corpus], None, "data.tokenizer_vocab_size=400", "data.validation_fraction=0.1")
    root = ensure_prepared(cfg, 64, tmp_path, 1000)
    assert (root / "tokenizer" / "tokenizer.model").is_file()
    assert open_prepared(root, 64).manifest["tokenizer"]["path"] == "tokenizer/tokenizer.model"
    cfg2 = data_cfg([corpus], None, "data.tokenizer_vocab_size=420", "data.validation_fraction=0.1")
    with pytest.raises(DataError, match=r"trains a new one \(tokenizer settings changed \(trained_with.vocab_size: 400 -> 420\)\)"):
        ensure_prepared(cfg2, 64, tmp_path, 1000)


def test_corpus_too_short_or_empty(tok_path, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of words here.\n\nAnd a second tiny document.\n")
    with pytest.raises(DataError, match=r"gives \d+ tokens, fewer than the ~1,022 needed for two blocks of "
                                        r"n=512 \(one to train, one to validate\); add text or lower model.max_seq_len"):
        ensure_prepared(data_cfg([short], tok_path), 512, tmp_path / "a", 1000)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"has no text \(0 tokens\)"):
        ensure_prepared(data_cfg([empty], tok_path), 32, tmp_path / "b", 1000)
    assert not (tmp_path / "b" / "data" / "train.bin").exists()


def test_one_validation_block_guaranteed(corpus, tok_path, tmp_path):
    one_doc = tmp_path / "one.txt"
    one_doc.write_text(" ".join(corpus.read_text().split()[:3000]) + "\n")  # a single document
    root = ensure_prepared(data_cfg([one_doc], tok_path), 64, tmp_path, 1000)
    m = open_prepared(root, 64).manifest
    assert m["splits"]["validation"]["blocks"] == 1 and m["validation_blocks_from_train_tail"] == 1


def test_tokenizer_bigger_than_model_vocab(corpus, tok_path, tmp_path):
    with pytest.raises(DataError, match=r"has 500 pieces but model.vocab_size=400; raise model.vocab_size"):
        ensure_prepared(data_cfg([corpus], tok_path), 32, tmp_path, 400)


def test_parallel_tokenization_matches_one_process(tok_path, tmp_path):
    from pydoc_data.topics import topics

    lines = [line.strip() for k in sorted(topics)[:60] for line in topics[k].splitlines() if line.strip()]
    assert len(lines) >= 2000  # enough documents for datasets.map to use two processes
    f = tmp_path / "lines.txt"
    f.write_text("\n".join(lines) + "\n")
    a = ensure_prepared(data_cfg([f], tok_path, "data.text_split=line", "data.num_proc=1",
                                 "data.prepared_dir=" + str(tmp_path / "p1")), 64, tmp_path, 1000)
    b = ensure_prepared(data_cfg([f], tok_path, "data.text_split=line", "data.num_proc=2",
                                 "data.prepared_dir=" + str(tmp_path / "p2")), 64, tmp_path, 1000)
    for name in ("train.bin", "validation.bin"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert not (a / ".work").exists()


def test_bad_input_counts_reach_the_manifest(corpus, tok_path, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.txt").write_bytes(corpus.read_bytes() + b"\n\nbroken \xff bytes\n")
    (d / "b.jsonl").write_text('{"text": "fine"}\n{oops\n{"text": 3}\n')
    (d / "c.txt").write_text("")
    root = ensure_prepared(data_cfg([d], tok_path), 32, tmp_path, 1000)
    m = open_prepared(root, 32).manifest
    stats = m["source"]["stats"]
    assert (stats["undecodable_lines"], stats["invalid_json_lines"], stats["missing_text"],
            stats["empty_files"]) == (1, 1, 1, 1)
    text = summarize(m)
    assert "bad input: 1 empty files (first: " in text and "1 invalid json lines (first: " in text
    assert "b.jsonl:2" in text


def test_chunked_preparation_gives_the_same_blocks(corpus, tok_path, tmp_path, monkeypatch):
    import linformer_train.data.prepare as prepare

    one = ensure_prepared(data_cfg([corpus], tok_path, f"data.prepared_dir={tmp_path / 'one'}"), 32, tmp_path, 1000)
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 20_000)  # many chunks, one datasets.map call each
    monkeypatch.setattr(prepare, "DOC_BATCH", 16)
    many = ensure_prepared(data_cfg([corpus], tok_path, f"data.prepared_dir={tmp_path / 'many'}"), 32, tmp_path, 1000)
    for name in ("train.bin", "validation.bin"):
        assert (one / name).read_bytes() == (many / name).read_bytes()
