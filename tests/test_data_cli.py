"""tools/prepare_data.py and tools/train_tokenizer.py as a user runs them: one-line errors with exit
code 2 and no traceback for every kind of bad input; counts of what was skipped in the summary."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path

import pytest

from helpers import proc
from linformer_train.config import load_config
from linformer_train.data.pipeline import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def start(tool: str, args: list[str], cwd: Path, **env) -> proc.Child:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cwd / "hf_cache"), **env}
    return proc.start([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args], cwd=cwd, env=full_env)


def finish(child: proc.Child) -> tuple[int, str, str]:
    res = child.wait()
    return res.returncode, res.stdout, res.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("cli")
    text = "\n\n".join(topics[k].strip() for k in sorted(topics)[:30]) + "\n"
    (d / "corpus").mkdir()
    (d / "corpus" / "a.txt").write_bytes(text.encode() + b"\n\nundecodable \xff\xfe here\n")
    (d / "corpus" / "b.jsonl").write_text('{"text": "a fine record"}\n{not json at all\n')
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("Only a few words.\n")
    (d / "nocol.jsonl").write_text('{"body": "text under another name"}\n')
    cfg = load_config([], ["data.source=files", f"data.paths=[{d / 'corpus' / 'a.txt'}]"]).data
    tok = train_tokenizer(cfg, d / "tok", 500)
    return {"dir": d, "tok": tok}


BAD = {
    "missing path": ("prepare_data", ["--source", "files", "--paths", "{d}/nope.txt"],
                     r"data\.paths: .*nope\.txt does not exist; check the path"),
    "empty file": ("prepare_data", ["--source", "files", "--paths", "{d}/empty.txt", "--tokenizer", "{tok}"],
                   r"has no text \(0 tokens\); check data\.source"),
    "corpus shorter than one block": (
        "prepare_data", ["--source", "files", "--paths", "{d}/short.txt", "--tokenizer", "{tok}",
                         "--seq-len", "512", "model.k=16"],
        r"gives \d+ tokens, fewer than the ~1,022 needed for two blocks of n=512"),
    "jsonl without the text field": (
        "prepare_data", ["--source", "files", "--paths", "{d}/nocol.jsonl", "--tokenizer", "{tok}"],
        r"nocol\.jsonl:1 has no field 'text' \(fields: body\); set data\.text_column"),
    "hub unreachable": (
        "prepare_data", ["--source", "hf", "--hf-name", "wikitext", "--hf-config", "wikitext-103-raw-v1"],
        r"data\.hf_name='wikitext' data\.hf_config='wikitext-103-raw-v1': the Hugging Face hub cannot be "
        r"reached .*use data\.source=files with data\.paths="),
    "tokenizer vocab too small": (
        "train_tokenizer", ["--source", "files", "--paths", "{d}/corpus", "--vocab-size", "100", "--out", "{d}/t"],
        r"vocab_size=100 is too small"),
}


@pytest.fixture(scope="module")
def bad_runs(files) -> dict[str, tuple[int, str, str]]:
    """Every bad-input command, started at once (each pays Python's start-up)."""
    d = files["dir"]
    procs = {}
    with contextlib.ExitStack() as running:  # a failure in one leaves none of the others running
        for name, (tool, args, _) in BAD.items():
            args = [a.format(d=d, tok=files["tok"]) for a in args]
            procs[name] = running.enter_context(
                start(tool, args + [f"train.run_dir={d / 'runs' / name.replace(' ', '_')}"], d))
        return {name: finish(p) for name, p in procs.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, bad_runs):
    """The tools' contract: one `error:` line last on stderr, exit 2, no traceback."""
    rc, out, err = bad_runs[case]
    assert rc == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # progress lines may precede it
    assert re.search(BAD[case][2], errors[0]), errors[0]


def test_prepare_reports_counts_then_reuses_then_refuses_another_n(files):
    d = files["dir"]
    args = ["--source", "files", "--paths", str(d / "corpus"), "--tokenizer", str(files["tok"]),
            "--out", str(d / "prepared"), "--seq-len", "64", "model.k=16", "data.validation_fraction=0.1"]
    rc, out, err = finish(start("prepare_data", args, d))
    assert rc == 0, err
    assert "blocks of n=64:" in out and "prepared data in" in out
    assert "1 undecodable lines (first: " in out and "a.txt:" in out   # replaced, counted
    assert "1 invalid json lines (first: " in out and "b.jsonl:2" in out  # skipped, counted
    manifest = json.loads((d / "prepared" / "manifest.json").read_text())
    assert manifest["seq_len"] == 64 and manifest["splits"]["validation"]["blocks"] >= 1
    rc, out, err = finish(start("prepare_data", args, d))
    assert rc == 0 and "data: reusing the set prepared in" in err
    rc, out, err = finish(start("prepare_data", [*args, "--seq-len", "128"], d))  # the last flag wins
    assert rc == 2 and "Traceback" not in err
    assert "holds data prepared from other inputs (seq_len: 64 -> 128)" in err


def test_train_tokenizer_writes_model_and_ids(files, tmp_path):
    d = files["dir"]
    out_dir = tmp_path / "tok"
    rc, out, err = finish(start("train_tokenizer", ["--source", "files", "--paths", str(d / "corpus"),
                                                    "--vocab-size", "400", "--type", "bpe", "--out", str(out_dir)], d))
    assert rc == 0, err
    assert "wrote" in out and "400 pieces" in out
    meta = json.loads((out_dir / "tokenizer.json").read_text())
    assert meta["special_ids"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "mask": 4}
    assert meta["trained_with"]["type"] == "bpe"
