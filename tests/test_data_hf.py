"""source=hf through datasets.load_dataset on local files (the json builder with data_files), in
map-style and streaming mode, and the one-line failures: hub unreachable, missing column, bad split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from linformer_train.config import load_config
from linformer_train.data import DataError
from linformer_train.data.corpus import HFSource
from linformer_train.data.pipeline import ensure_prepared, train_tokenizer
from linformer_train.data.prepare import open_prepared


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep datasets' Arrow cache inside the test's directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> tuple[Path, Path]:
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("hf")
    f = d / "docs.jsonl"
    with open(f, "w") as out:
        for k in sorted(topics)[:40]:
            out.write(json.dumps({"title": k, "text": topics[k]}) + "\n")
    cfg = load_config([], ["data.source=files", f"data.paths=[{f}]"]).data
    return f, train_tokenizer(cfg, d / "tok", 500)


def cfg_for(*overrides):
    return load_config([], ["data.num_proc=1", "model.vocab_size=1000", *overrides]).data


def test_hf_json_builder_matches_files_source_in_both_modes(jsonl, tmp_path, monkeypatch):
    import linformer_train.data.prepare as prepare

    monkeypatch.setattr(prepare, "CHUNK_BYTES", 30_000)  # several chunks of files and of HF rows
    monkeypatch.setattr(prepare, "DOC_BATCH", 8)
    f, tok = jsonl
    common = [f"data.paths=[{f}]", f"data.tokenizer={tok}", "data.validation_fraction=0.1"]
    runs = {
        "files": cfg_for("data.source=files", *common, f"data.prepared_dir={tmp_path / 'files'}"),
        "hf": cfg_for("data.source=hf", "data.hf_name=json", *common, f"data.prepared_dir={tmp_path / 'hf'}"),
        "hf_stream": cfg_for("data.source=hf", "data.hf_name=json", "data.streaming=true", *common,
                             f"data.prepared_dir={tmp_path / 'stream'}"),
    }
    roots = {name: ensure_prepared(cfg, 64, tmp_path, 1000) for name, cfg in runs.items()}
    ref = {s: (roots["files"] / f"{s}.bin").read_bytes() for s in ("train", "validation")}
    for name in ("hf", "hf_stream"):
        for split in ("train", "validation"):
            assert (roots[name] / f"{split}.bin").read_bytes() == ref[split], (name, split)
    m = open_prepared(roots["hf_stream"], 64).manifest
    assert m["source"]["description"] == "hf: json split=train (streaming)"
    assert m["inputs"]["source"]["streaming"] is True and m["documents"]["read"] == 40
    assert ensure_prepared(runs["hf"], 64, tmp_path, 1000) == roots["hf"]  # reused: same fingerprint


def test_hf_text_column_rename_and_max_documents(jsonl, tmp_path):
    f, tok = jsonl
    src = HFSource("json", data_files=[f], text_column="title", max_documents=3)
    assert list(src.documents()) == [json.loads(line)["title"] for line in f.read_text().splitlines()[:3]]
    ds = src.as_dataset()
    assert ds.column_names == ["text"] and len(ds) == 3


def test_hf_missing_column_and_bad_split(jsonl):
    f, _ = jsonl
    with pytest.raises(DataError, match=r"data.hf_name='json' has no column 'body' \(columns: title, text\); "
                                        r"set data.text_column"):
        HFSource("json", data_files=[f], text_column="body").load()
    with pytest.raises(DataError, match=r"split='validation': Unknown split \"validation\""):
        HFSource("json", split="validation", data_files=[f]).load()
    with pytest.raises(DataError, match=r"has no (column|field) 'body' \((columns|fields): title, text\)"):
        list(HFSource("json", streaming=True, data_files=[f], text_column="body").documents())


def test_hub_unreachable_is_one_line(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name, config in (("wikitext", "wikitext-103-raw-v1"), ("no-such-org/no-such-corpus", None)):
        with pytest.raises(DataError) as err:
            HFSource(name, config, streaming=True).load()
        msg = str(err.value)
        assert "\n" not in msg
        assert f"data.hf_name={name!r}" in msg and "the Hugging Face hub cannot be reached" in msg
        assert "data.source=files with data.paths=" in msg
