"""Sources: plain text, JSONL, Parquet, globs and directories, the built-in sample, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from linformer_train.data import DataError
from linformer_train.data.corpus import (BuiltinSource, FileSource, SourceStats, builtin_documents,
                                         resolve_files)


def docs_of(source) -> list[str]:
    return list(source.documents())


def test_plain_text_blank_line_and_line_modes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("First doc line one.\nline two.\n\n\n  Second doc.  \n\nThird\n")
    assert docs_of(FileSource([f])) == ["First doc line one.\nline two.", "  Second doc.", "Third"]
    assert docs_of(FileSource([f], text_split="line")) == [
        "First doc line one.", "line two.", "Second doc.", "Third"]


def test_gzip_text_and_bom(tmp_path):
    f = tmp_path / "a.txt.gz"
    with gzip.open(f, "wt", encoding="utf-8") as g:
        g.write("\ufeffhello there\n\nworld\n")
    assert docs_of(FileSource([f])) == ["hello there", "world"]


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good line\n\nbad \xff\xfe bytes\nmore\n\n\xc3\x28 again\n")
    src = FileSource([f])
    docs = docs_of(src)
    assert docs == ["good line", "bad \ufffd\ufffd bytes\nmore", "\ufffd( again"]
    assert src.stats.undecodable_lines == 2
    assert src.stats.first["undecodable_lines"] == f"{f}:3"
    assert "2 undecodable lines (first: " in src.stats.summary()


def test_jsonl_skips_and_counts_bad_lines(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("\n".join([
        json.dumps({"text": "one", "id": 1}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": 3}),
        json.dumps({"text": None}),
        json.dumps({"text": "two"}),
        "",
    ]))
    src = FileSource([f])
    assert docs_of(src) == ["one", "two"]
    assert (src.stats.invalid_json_lines, src.stats.missing_text) == (2, 2)
    assert src.stats.first["invalid_json_lines"] == f"{f}:2"


def test_jsonl_missing_text_column_is_an_error(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(DataError, match=r"a.jsonl:1 has no field 'text' \(fields: body, id\); set data.text_column"):
        docs_of(FileSource([f]))
    assert docs_of(FileSource([f], text_column="body")) == ["x"]


def test_parquet_column_and_errors(tmp_path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": ["alpha", None, "beta", "  "], "n": [1, 2, 3, 4]}), f)
    src = FileSource([f], text_column="content")
    assert docs_of(src) == ["alpha", "beta"]
    assert src.stats.missing_text == 1
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: content, n\)"):
        docs_of(FileSource([f]))
    with pytest.raises(DataError, match=r"column 'n' holds int64, not text"):
        docs_of(FileSource([f], text_column="n"))
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(DataError, match=r"is not a readable Parquet file"):
        docs_of(FileSource([fake]))


def test_globs_directories_and_format_override(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("bee\n")
    (tmp_path / "d" / "sub" / "a.jsonl").write_text('{"text": "ay"}\n')
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00")
    (tmp_path / "d" / ".hidden.txt").write_text("no\n")
    files = resolve_files([tmp_path / "d"])
    assert [p.name for p in files] == ["b.txt", "a.jsonl"]
    assert docs_of(FileSource([tmp_path / "d"])) == ["bee", "ay"]
    assert docs_of(FileSource([str(tmp_path / "d" / "**" / "*.jsonl")])) == ["ay"]
    raw = tmp_path / "data.log"
    raw.write_text('{"text": "as text"}\n')
    assert docs_of(FileSource([raw])) == ['{"text": "as text"}']
    assert docs_of(FileSource([raw], fmt="jsonl")) == ["as text"]


def test_missing_paths_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"data.paths: .*nope.txt does not exist; check the path"):
        FileSource([tmp_path / "nope.txt"])
    with pytest.raises(DataError, match=r"matches no files; check the pattern"):
        FileSource([str(tmp_path / "*.txt")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"directory .*empty_dir holds no .txt"):
        FileSource([tmp_path / "empty_dir"])
    with pytest.raises(DataError, match=r"data.paths is empty"):
        FileSource([])


def test_empty_files_are_counted(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("\n\n  \n")
    (tmp_path / "c.txt").write_text("words\n")
    src = FileSource([tmp_path])
    assert docs_of(src) == ["words"]
    assert (src.stats.files, src.stats.empty_files, src.stats.documents) == (3, 2, 1)


def test_long_plain_text_document_is_cut(tmp_path, monkeypatch):
    import linformer_train.data.corpus as corpus

    monkeypatch.setattr(corpus, "MAX_DOCUMENT_CHARS", 70)
    f = tmp_path / "long.txt"
    f.write_text("".join(f"line {i:03d} of one long document\n" for i in range(10)))  # 30 chars a line
    src = FileSource([f])
    docs = docs_of(src)
    # cut at line boundaries before a document passes the limit: two lines (61 chars) per document
    assert len(docs) == 5 and src.stats.split_documents == 4
    assert all(len(d) <= 70 for d in docs)
    assert "\n".join(docs) == f.read_text().rstrip("\n")


def test_a_huge_line_is_read_and_cut_in_bounded_pieces(tmp_path, monkeypatch):
    import tracemalloc

    import linformer_train.data.corpus as corpus

    monkeypatch.setattr(corpus, "MAX_DOCUMENT_CHARS", 1000)
    monkeypatch.setattr(corpus, "READ_PIECE_BYTES", 256)
    words = " ".join(f"w{i % 97}é" for i in range(20_000))  # one 120 KB line, multi-byte characters
    for split in ("blank_line", "line"):
        f = tmp_path / f"{split}.txt"
        f.write_text(words + "\n\nlast document\n")
        src = FileSource([f], text_split=split)
        digest, longest, last = hashlib.sha256(), 0, ""
        tracemalloc.start()
        for doc in src.documents():  # streamed: only the pieces in flight are alive
            digest.update(doc.replace(" ", "").encode())
            longest, last = max(longest, len(doc)), doc
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert longest <= 1000 and last == "last document"
        # nothing lost or garbled (a multi-byte character split across two reads decodes whole)
        assert digest.hexdigest() == hashlib.sha256((words + "lastdocument").replace(" ", "").encode()).hexdigest()
        assert src.stats.undecodable_lines == 0 and src.stats.split_documents >= 100
        assert peak < 40_000, peak  # pieces, never the whole 120 KB line at once


def test_max_documents_and_fingerprint(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("a\n\nb\n\nc\n")
    src = FileSource([f], max_documents=2)
    assert docs_of(src) == ["a", "b"]
    fp = src.fingerprint()
    assert fp == FileSource([f], max_documents=2).fingerprint()
    os.utime(f, ns=(1, 1))
    assert FileSource([f], max_documents=2).fingerprint() != fp


def test_builtin_corpus_is_real_deterministic_and_a_few_megabytes():
    docs = builtin_documents()
    size = sum(len(d.encode()) for d in docs)
    assert size > 2_500_000 and len(docs) > 500
    assert any("for" in d and "statement" in d for d in docs[:100])  # reference-manual topics first
    src = BuiltinSource(max_documents=5)
    assert docs_of(src) == list(docs[:5])
    assert src.fingerprint() == BuiltinSource(max_documents=5).fingerprint()
    assert src.fingerprint()["files_sha256"] == BuiltinSource().fingerprint()["files_sha256"]


def test_stats_summary_is_one_line():
    stats = SourceStats(files=2, documents=3, characters=10)
    stats.note("invalid_json_lines", "x.jsonl:4")
    assert stats.summary() == "2 files, 3 documents, 10 characters, 1 invalid json lines (first: x.jsonl:4)"
