"""Nothing lost, nothing executed: every class of data-loss and code-execution path, through the
real entry points (in this process where a process group is cheap to fake, in subprocesses where
a real run or a real fault matters).

1. code from a file never runs (a pickle payload in every kind of file we or DeepSpeed write)
2. a run folder belongs to one run (fresh start refused or moved aside, abandoned histories set
   aside, a lock against a second run, a stale lock taken over)
3. outputs never overwrite inputs (every tool that writes)
4. pointers stay inside their folder (`latest`, a shard index)
5. run-time faults end in one line and leave files parseable (torn metrics line, a file-size limit
   hit mid-run, a run folder that is a file or read-only, train.bin truncated under a running job)
6. mismatches are refused (init_from with another tokenizer, --resume against checkpoint.resume)
7. bad corpora are caught (UTF-16, random bytes, Latin-1, one huge line, one document, a glob into
   the run folder)
8. absurd sizes fail fast (model dims, a safetensors file with an unexpected tensor)
9. start-up never hangs on a build lock left by a killed build
10. a dead rank's message names a checkpoint that is really good
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli_env, pretrain, read_metrics, run_cli, tiny_overrides, write_topics, _free_port
from helpers import proc
from helpers.faults import make_unwritable, make_writable
from helpers.inprocess import accept, call, load_tool

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this creates ``marker`` (a directory): what an attacker's code would do first."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_the_payload_is_live(tmp_path):
    """The payload really runs when unpickled by plain pickle: the tests below prove a refusal."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.is_dir()


def tree_digest(root: Path) -> str:
    """A digest of every file's path, size and bytes under ``root`` (a file or a folder)."""
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(root.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def plant(step_dir: Path, name: str, marker: Path) -> None:
    """Add a payload to ``name`` in a checkpoint and keep its size record true (as anyone who edits a
    checkpoint on a shared disk would)."""
    from linformer_train.serialization import allow_deepspeed_records

    allow_deepspeed_records()
    f = step_dir / name
    state = torch.load(f, map_location="cpu", weights_only=True)  # our own, trusted file
    state = {**state, "extra": Payload(marker)} if isinstance(state, dict) else {"state": state, "x": Payload(marker)}
    torch.save(state, f)
    meta = json.loads((step_dir / "complete.json").read_text())
    meta["files"][name] = f.stat().st_size
    (step_dir / "complete.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory):
    """Two finished one-rank runs: ZeRO-0 fp32 (model states hold the optimizer) and ZeRO-3 bf16
    (per-rank model states and a bf16 optimizer shard). Each test works on a copy."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in {"z0": ["zero.stage=0"],
                        "z3": ["zero.stage=3", "precision.dtype=bf16"]}.items():
        run = root / name
        res = pretrain(tiny_overrides(prepared_data, run, "train.max_steps=2", "checkpoint.save_every=2",
                                      "train.eval_every=0", *extra))
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = run
    return out


def copy_run(runs: dict, name: str, dest: Path) -> Path:
    shutil.copytree(runs[name], dest)
    return dest


@pytest.fixture
def real_entry(monkeypatch):
    """launch/pretrain.py's main in this process with a real one-rank process group."""
    from linformer_train.train.entry import pretrain as pretrain_main

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # torch wraps it at every init
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def run(argv, stub_engine: bool = True):
        import deepspeed

        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        with monkeypatch.context() as m:
            if stub_engine:  # every refusal below must come before the engine is built
                m.setattr(deepspeed, "initialize", accept)
            return call(pretrain_main, argv)

    return run


STEP = "step_00000002"
FILE_KINDS = [("z0", "mp_rank_00_model_states.pt"), ("z0", "rank_state_00000.pt"),
              ("z3", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
              ("z3", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"), ("z3", "rank_state_00000.pt")]
REFUSED = "refused"


# ------------------------------------------------------------------ 1. no code from a file runs


@pytest.mark.parametrize("kind,name", FILE_KINDS, ids=[f"{k}-{n}" for k, n in FILE_KINDS])
def test_a_payload_in_any_checkpoint_file_is_refused_by_resume_export_and_spectrum(
        runs, prepared_data, tmp_path, real_entry, kind, name):
    from linformer_train.convert.entry import convert

    run = copy_run(runs, kind, tmp_path / "run")
    marker = tmp_path / "pwned"
    plant(run / "checkpoints" / STEP, name, marker)
    extra = ["zero.stage=3", "precision.dtype=bf16"] if kind == "z3" else []
    outcomes = {
        "resume": real_entry(tiny_overrides(prepared_data, run, "--resume", *extra)),
        "export": call(convert, ["export", str(run), str(tmp_path / "model")]),
        "spectrum": call(load_tool("spectrum").main, ["measure", str(run), "--data", "builtin", "-n", "64",
                                                      "--out", str(tmp_path / "spectrum")]),
    }
    for entry, out in outcomes.items():
        assert out.one_line_error(REFUSED, "pickled Python objects"), (entry, out)
        assert "pickled Python objects" in out.lines[0] and name in out.lines[0], (entry, out.lines)
    assert not marker.exists()
    assert not (tmp_path / "model").exists()


NO_PRESCAN = ("import runpy, sys; import linformer_train.serialization as s, linformer_train.train.trainer as t; "
              "t.verify_contents = lambda path, rank: None; s.check_loadable = lambda path: None; "
              "t.read_client_state = lambda path: {}; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize("kind,name", [("z3", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                       ("z0", "mp_rank_00_model_states.pt")])
def test_deepspeeds_own_loads_are_weights_only_even_without_our_prescan(runs, prepared_data, tmp_path,
                                                                        monkeypatch, kind, name):
    """With our pre-load vetting switched off, the payload reaches DeepSpeed's own torch.load calls
    (engine.load_checkpoint in a real run; zero_to_fp32 in export): they run weights-only too, and
    the refusal is one line."""
    import linformer_train.serialization as serialization
    from linformer_train.convert.entry import convert

    run = copy_run(runs, kind, tmp_path / "run")
    marker = tmp_path / "pwned"
    plant(run / "checkpoints" / STEP, name, marker)
    extra = ["zero.stage=3", "precision.dtype=bf16"] if kind == "z3" else []
    res = run_cli([sys.executable, "-c", NO_PRESCAN, "launch/pretrain.py",
                   *tiny_overrides(prepared_data, run, "--resume", *extra)])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "pickled Python objects" in errors[0] and "could run code" in errors[0]
    if kind == "z3":  # DeepSpeed's merge of the ZeRO partitions (utils/zero_to_fp32)
        monkeypatch.setattr(serialization, "check_loadable", lambda path: None)
        out = call(convert, ["export", str(run), str(tmp_path / "model")])
        assert out.one_line_error("pickled Python objects"), out
    assert not marker.exists()


def test_universal_conversion_refuses_a_payload_and_an_output_inside_its_input(runs, tmp_path):
    from linformer_train.convert.entry import convert

    run = copy_run(runs, "z3", tmp_path / "run")
    step = run / "checkpoints" / STEP
    out = call(convert, ["universal", str(run), str(run / "universal")])
    assert out.one_line_error("is inside the checkpoint"), out
    marker = tmp_path / "pwned"
    plant(step, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    out = call(convert, ["universal", str(step), str(tmp_path / "universal")])
    assert out.one_line_error("pickled Python objects"), out
    assert not marker.exists() and not (tmp_path / "universal").exists()


def test_a_payload_in_a_pytorch_model_bin_is_refused_by_warm_start(tmp_path):
    from linformer_train.convert.entry import convert
    from test_convert import _make_hf

    tok = write_tokenizer(tmp_path)
    hf_dir, model, _ = _make_hf(tmp_path, tok, "roberta")
    (hf_dir / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({**model.state_dict(), "x": Payload(marker)}, hf_dir / "pytorch_model.bin")
    out = call(convert, ["warm-start", str(hf_dir), str(tmp_path / "out"), "--tokenizer", str(tok)])
    assert out.one_line_error("pickled Python objects"), out
    assert "pytorch_model.bin" in out.lines[0] and "weights_only=False" not in out.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def write_tokenizer(tmp_path: Path, vocab: int = 512, docs: int = 40) -> Path:
    """A small sentencepiece tokenizer of this project's kind, trained here."""
    from linformer_train.config import load_config
    from linformer_train.data.pipeline import train_tokenizer

    corpus = write_topics(tmp_path / f"corpus-{docs}.txt", docs)
    cfg = load_config([], ["data.source=files", f"data.paths=[{corpus}]", f"data.tokenizer_vocab_size={vocab}",
                           f"model.vocab_size={vocab}"])
    return Path(train_tokenizer(cfg.data, tmp_path / f"tok-{docs}", vocab))


# ------------------------------------------------------------ 2. a run folder belongs to one run


def test_a_fresh_run_into_a_used_folder_is_refused_before_anything_is_written(runs, prepared_data, tmp_path,
                                                                               real_entry):
    run = copy_run(runs, "z0", tmp_path / "run")
    before = tree_digest(run)
    out = real_entry(tiny_overrides(prepared_data, run))
    assert out.one_line_error("already holds a run"), out
    line = out.lines[0]
    assert "--resume" in line and "train.run_dir=" in line and "checkpoint.overwrite=true" in line
    assert f"checkpoint {STEP}" in line
    assert tree_digest(run) == before  # not a byte written (the lock was taken and given back)
    # resume=PATH naming another run's checkpoint is a fresh history here too
    other = copy_run(runs, "z0", tmp_path / "other")
    out = real_entry(tiny_overrides(prepared_data, run, f"checkpoint.resume={other / 'checkpoints' / STEP}"))
    assert out.one_line_error("starts a new history here"), out


def test_overwrite_moves_the_old_run_aside_and_the_new_run_owns_the_folder(runs, prepared_data, tmp_path):
    run = copy_run(runs, "z0", tmp_path / "run")
    old_ckpt = tree_digest(run / "checkpoints" / STEP)
    res = pretrain(tiny_overrides(prepared_data, run, "train.max_steps=3", "checkpoint.save_every=3",
                                  "train.eval_every=0", "checkpoint.overwrite=true"))
    assert res.returncode == 0, res.stderr[-3000:]
    aside = list(run.glob("replaced-*"))
    assert len(aside) == 1 and f"moved the earlier run in {run}" in res.stdout
    assert tree_digest(aside[0] / "checkpoints" / STEP) == old_ckpt  # kept whole, never deleted
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_00000003"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]  # one run's history, not two mixed


def test_resuming_an_older_checkpoint_sets_the_newer_history_aside(prepared_data, tmp_path):
    run = tmp_path / "run"
    base = tiny_overrides(prepared_data, run, "train.max_steps=4", "checkpoint.save_every=2",
                          "train.eval_every=0", "checkpoint.keep_last=5")
    res = pretrain(base)
    assert res.returncode == 0, res.stderr[-3000:]
    first_step4 = tree_digest(run / "checkpoints" / "step_00000004")
    res = pretrain(base + [f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}", "optim.lr=1e-2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "belong to the history this run replaces" in res.stdout
    aside = list((run / "checkpoints").glob("superseded-*/step_00000004"))
    assert len(aside) == 1 and tree_digest(aside[0]) == first_step4  # the old history, kept whole
    # the step_4 in place is the new history's (another lr), and `latest` names it
    assert tree_digest(run / "checkpoints" / "step_00000004") != first_step4
    assert f"saved checkpoint {run / 'checkpoints' / 'step_00000004'}" in res.stdout
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_a_second_run_on_a_locked_folder_is_refused_and_a_stale_lock_is_taken_over(prepared_data, tmp_path,
                                                                                   real_entry):
    import psutil

    from linformer_train.train.run_dir import LOCK, RunLock

    run = tmp_path / "run"
    run.mkdir()
    held = RunLock(run).acquire()  # a live run (this process) holds the folder
    try:
        out = real_entry(tiny_overrides(prepared_data, run))
        assert out.one_line_error("is in use by another run"), out
        assert f"pid {os.getpid()} on " in out.lines[0]
    finally:
        held.release()
    # a lock file whose flock is free but which names a live process here (a filesystem where
    # flock does nothing) still stops a second run
    with proc.start([sys.executable, "-c", "import time; time.sleep(600)"], cwd=ROOT, env=cli_env()) as live:
        owner = {"pid": live.pid, "host": os.uname().nodename, "started": "now",
                 "process_start": psutil.Process(live.pid).create_time()}
        (run / LOCK).write_text(json.dumps(owner))
        out = real_entry(tiny_overrides(prepared_data, run))
        live.kill()
    assert out.one_line_error(f"is in use by another run (pid {live.pid} on "), out
    # a lock left by a process that is gone is taken over, with a line that says so
    dead = proc.start([sys.executable, "-c", "pass"], cwd=ROOT, env=cli_env())
    dead.wait()
    (run / LOCK).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "process_start": 1.0,
                                        "started": "earlier"}))
    out = real_entry(tiny_overrides(prepared_data, run))
    assert out.code == "accepted", out  # went on to build the engine
    assert not (run / LOCK).exists()  # given back when the run ended


def test_a_live_run_holds_its_folder_against_a_second_process(prepared_data, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "tests/helpers/faults.py", "--await-sigterm", "2", "--",
            *tiny_overrides(prepared_data, run, "train.max_steps=4", "train.eval_every=0")]
    with proc.start(args, cwd=ROOT, env=cli_env()) as first:
        first.wait_until((run / "awaiting_sigterm_2").exists, "the first run reached step 2")
        second = pretrain(tiny_overrides(prepared_data, run, "--resume"))
        first.send_signal(signal.SIGTERM)
        done = first.wait()
    assert second.returncode == 2 and second.stderr.strip().startswith("error: "), second.stderr[-2000:]
    assert "is in use by another run" in second.stderr and f"pid {first.pid}" in second.stderr
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------- 3 and 4. outputs apart, pointers in


@pytest.fixture(scope="module")
def model_dir(runs, tmp_path_factory):
    from linformer_train.convert.export import export_checkpoint

    return export_checkpoint(runs["z0"], tmp_path_factory.mktemp("models") / "model")


def test_no_tool_writes_over_what_it_reads(runs, model_dir, tmp_path):
    from linformer_train.convert.entry import convert
    from linformer_train.finetune.entry import finetune

    run = copy_run(runs, "z0", tmp_path / "run")
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    texts = tmp_path / "texts.txt"
    texts.write_text("a sentence\nanother one\n")
    (tmp_path / "link-to-run").symlink_to(run)
    (tmp_path / "link-to-texts").symlink_to(texts)
    (tmp_path / "corpus").mkdir()
    corpus = write_topics(tmp_path / "corpus" / "topics.txt", 5)
    guarded = {"run": run, "model": model, "texts": texts, "corpus": corpus}
    before = {k: tree_digest(v) for k, v in guarded.items()}
    prepare = load_tool("prepare_data").main
    cases = {
        "export RUN RUN": (convert, ["export", str(run), str(run), "--overwrite"]),
        "export RUN into RUN/checkpoints": (convert, ["export", str(run), str(run / "checkpoints"), "--overwrite"]),
        "export STEP over its run": (convert, ["export", str(run / "checkpoints" / STEP), str(run), "--overwrite"]),
        "export through a symlink": (convert, ["export", str(run), str(tmp_path / "link-to-run"), "--overwrite"]),
        "resize MODEL MODEL": (convert, ["resize", str(model), str(model), "model.max_seq_len=128", "--overwrite"]),
        "resize into MODEL": (convert, ["resize", str(model), str(model / "sub"), "model.max_seq_len=128"]),
        "predict --output INPUT": (finetune, ["predict", "--model", str(model), "--input", str(texts),
                                              "--output", str(texts)]),
        "predict --output link to INPUT": (finetune, ["predict", "--model", str(model), "--input", str(texts),
                                                      "--output", str(tmp_path / "link-to-texts")]),
        "predict --output inside MODEL": (finetune, ["predict", "--model", str(model), "--input", str(texts),
                                                     "--output", str(model / "labels.txt")]),
        "finetune output_dir = MODEL": (finetune, ["train", f"model.pretrained={model}", f"task.train_file={texts}",
                                                   f"task.eval_file={texts}", f"train.output_dir={model}"]),
        "prepare_data --out holding the corpus": (prepare, ["--out", str(corpus.parent), "--source", "files",
                                                            "--paths", str(corpus)]),
        "spectrum measure --out MODEL": (load_tool("spectrum").main, ["measure", str(model), "--data", "builtin",
                                                                      "--out", str(model)]),
    }
    bad = []
    for name, (main, argv) in cases.items():
        out = call(main, argv)
        if not out.one_line_error("is inside", " is ", "contains", "own output"):
            bad.append(f"{name}: {out.code} {out.lines[-2:]}")
    assert not bad, "\n".join(bad)
    assert {k: tree_digest(v) for k, v in guarded.items()} == before


def test_pointers_never_lead_out_of_their_folder(runs, tmp_path):
    from linformer_train.convert.entry import convert
    from test_convert import _make_hf

    run = copy_run(runs, "z0", tmp_path / "run")
    elsewhere = copy_run(runs, "z0", tmp_path / "elsewhere")
    for target in (f"../../elsewhere/checkpoints/{STEP}", str(elsewhere / "checkpoints" / STEP)):
        (run / "checkpoints" / "latest").write_text(target)
        out = call(convert, ["export", str(run), str(tmp_path / "model")])
        assert out.one_line_error("not the name of a checkpoint folder beside it"), (target, out)
    tok = write_tokenizer(tmp_path)
    hf_dir, model, _ = _make_hf(tmp_path, tok, "roberta")
    (hf_dir / "model.safetensors").rename(tmp_path / "outside.safetensors")
    state = {k: "../outside.safetensors" for k in model.state_dict()}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": state}))
    out = call(convert, ["warm-start", str(hf_dir), str(tmp_path / "out"), "--tokenizer", str(tok)])
    assert out.one_line_error("not a file beside it"), out


# -------------------------------------------------------------------------- 5. run-time faults


def test_a_torn_metrics_line_is_repaired_on_resume(runs, prepared_data, tmp_path):
    run = copy_run(runs, "z0", tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 3, "lo')  # a disk that filled in the middle of a line
    res = pretrain(tiny_overrides(prepared_data, run, "--resume", "train.max_steps=3", "train.eval_every=0"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "metrics.jsonl: dropped 1 damaged line(s)" in res.stdout
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]  # every line parses


def test_a_file_size_limit_hit_mid_run_is_one_line_and_leaves_parseable_files(runs, prepared_data, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG), as a full disk refuses them:
    metrics.jsonl hits it a few steps in."""
    run = copy_run(runs, "z0", tmp_path / "run")
    size = (run / "metrics.jsonl").stat().st_size
    wrapper = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size + 1500}, resource.RLIM_INFINITY)); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    res = run_cli([sys.executable, "-c", wrapper, "launch/pretrain.py",
                   *tiny_overrides(prepared_data, run, "--resume", "train.max_steps=40", "train.eval_every=0",
                                   "checkpoint.save_every=0")])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 1 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"writing {run / 'metrics.jsonl'} failed (File too large)" in errors[0]
    assert f"its last checkpoint {run / 'checkpoints' / STEP} is intact" in errors[0]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:-1]]  # every whole line parses; only the last may be cut
    assert rows[-1]["step"] > 2
    res = pretrain(tiny_overrides(prepared_data, run, "--resume", "train.max_steps=3", "train.eval_every=0"))
    assert res.returncode == 0, res.stderr[-3000:]  # and resume reads (and repairs) what is left
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


def test_a_run_folder_that_is_a_file_or_read_only_is_one_line(prepared_data, tmp_path, real_entry):
    as_file = tmp_path / "file"
    as_file.write_text("not a folder")
    out = real_entry(tiny_overrides(prepared_data, as_file))
    assert out.one_line_error("cannot be used"), out
    locked = tmp_path / "ro"
    locked.mkdir()
    make_unwritable(locked)
    try:
        out = real_entry(tiny_overrides(prepared_data, locked / "run"))
        assert out.one_line_error("cannot be used"), out
    finally:
        make_writable(locked)


def test_train_bin_truncated_under_a_running_job_is_one_line_not_a_bus_error(prepared_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared_data, data)
    run = tmp_path / "run"
    args = [sys.executable, "launch/pretrain.py",
            *tiny_overrides(data, run, "train.max_steps=100000", "train.eval_every=0", "checkpoint.save_every=0")]
    with proc.start(args, cwd=ROOT, env=cli_env()) as job:
        job.wait_until(lambda: (run / "metrics.jsonl").is_file()
                       and (run / "metrics.jsonl").read_text().count("\n") >= 2, "two steps were logged")
        with open(data / "train.bin", "r+b") as f:
            f.truncate(0)
        res = job.wait()
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert "train.bin ends after 0 bytes" in errors[0] and "truncated or replaced" in errors[0]


# ----------------------------------------------------------------------------- 6. mismatches


def test_init_from_a_model_with_another_tokenizer_is_refused(runs, prepared_data, tmp_path, real_entry):
    from linformer_train.convert.export import export_checkpoint

    other = write_tokenizer(tmp_path, docs=20)
    model = export_checkpoint(runs["z0"], tmp_path / "model", tokenizer=other)
    out = real_entry(tiny_overrides(prepared_data, tmp_path / "run", f"train.init_from={model}"))
    assert out.one_line_error("was trained with tokenizer"), out
    assert f"set data.tokenizer={model} " in out.lines[0]


@pytest.mark.parametrize("argv", [["--resume", "checkpoint.resume=/somewhere/step_1"],
                                  ["checkpoint.resume=none", "--resume"],
                                  ["--resume", "checkpoint.resume=auto", "checkpoint.resume=none"]])
def test_resume_flag_and_checkpoint_resume_that_disagree_are_refused(prepared_data, tmp_path, real_entry, argv):
    out = real_entry(tiny_overrides(prepared_data, tmp_path / "run") + argv)
    assert out.one_line_error("contradict each other"), out


def test_a_config_file_naming_a_checkpoint_and_resume_flag_disagree(prepared_data, tmp_path, real_entry):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("checkpoint:\n  resume: /somewhere/step_00000010\n")
    out = real_entry(["--config", str(cfg), *tiny_overrides(prepared_data, tmp_path / "run"), "--resume"])
    assert out.one_line_error("contradict each other"), out
    assert "in the config file" in out.lines[0]


# -------------------------------------------------------------------------- 7. bad corpora


def one_error(out, *words: str) -> bool:
    """Exit 2, no traceback, one `error:` line, the last, naming ``words`` (the tool's progress lines
    for the work done before the refusal may precede it)."""
    errors = [line for line in out.lines if line.startswith("error: ")]
    return (out.code == 2 and len(errors) == 1 and out.lines[-1] == errors[0]
            and "Traceback" not in out.stderr and all(w in errors[0] for w in words))


def _prepare(tmp_path: Path, paths: list[Path], *extra: str, out: str = "prepared"):
    return call(load_tool("prepare_data").main,
                ["--out", str(tmp_path / out), "--source", "files", "--paths", *map(str, paths), "--seq-len", "64", "model.k=16",
                 "model.vocab_size=512", "data.tokenizer_vocab_size=512", "data.num_proc=1", *extra])


def test_text_that_is_not_utf8_is_refused_with_a_knob_to_accept(tmp_path):
    good = write_topics(tmp_path / "good.txt", 30)
    text = good.read_text()
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text(text, encoding="utf-16")
    utf16_raw = tmp_path / "utf16-nobom.txt"
    utf16_raw.write_bytes(text.encode("utf-16-le"))
    noise = tmp_path / "noise.txt"
    noise.write_bytes(os.urandom(200_000))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(text.replace("e", "\u00e9").encode("latin-1", "replace"))
    cases = {utf16: "UTF-16-LE text", utf16_raw: "looks like UTF-16", noise: "is not UTF-8 text",
             latin1: "another encoding"}
    for path, words in cases.items():
        out = _prepare(tmp_path, [good, path], out=f"p-{path.stem}")
        assert out.one_line_error(words), (path.name, out)
        assert str(path) in out.lines[0] and "iconv" in out.lines[0]
    # the knob reads the Latin-1 file anyway (bad bytes replaced and counted)
    out = _prepare(tmp_path, [good, latin1], "data.max_bad_char_fraction=1", out="accepted")
    assert out.code == 0, out


def test_one_huge_line_is_packed_in_bounded_pieces(tmp_path, monkeypatch):
    import linformer_train.data.corpus as corpus

    monkeypatch.setattr(corpus, "MAX_DOCUMENT_CHARS", 20_000)
    words = write_topics(tmp_path / "t.txt", 60).read_text().split()
    line = tmp_path / "line.txt"
    line.write_text(" ".join(words * 3) + "\n")  # ~1 MB, not one newline
    out = _prepare(tmp_path, [line], "data.validation_fraction=0.05")
    assert out.code == 0, out
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    split = manifest["splits"]
    assert manifest["source"]["stats"]["split_documents"] >= 40
    assert split["validation"]["blocks"] <= 0.25 * (split["train"]["blocks"] + split["validation"]["blocks"])


def test_a_split_that_goes_badly_wrong_is_named_as_such(tmp_path):
    import numpy as np

    from linformer_train.data.prepare import SPLIT_SEED, _unit_hash

    fraction = 0.05
    assert _unit_hash(np.zeros(1, np.uint64), SPLIT_SEED)[0] < fraction  # document 0 is held out
    topics = write_topics(tmp_path / "t.txt", 400).read_text().split("\n\n")
    big = " ".join(topics[:300]).replace("\n", " ")
    # most of the text in the one held-out document: by document, far more than 5% is validation
    lopsided = tmp_path / "lopsided.txt"
    lopsided.write_text("\n\n".join([big, *topics[300:306]]) + "\n")
    out = _prepare(tmp_path, [lopsided], f"data.validation_fraction={fraction}", out="a")
    assert one_error(out, "splitting by document put", "data.allow_uneven_split=true"), out
    assert "fewer than" not in out.stderr
    assert _prepare(tmp_path, [lopsided], f"data.validation_fraction={fraction}", "data.allow_uneven_split=true",
                    out="b").code == 0
    # one document with plenty of tokens, held out whole: said as such, not "fewer tokens than needed"
    single = tmp_path / "single.txt"
    single.write_text(big + "\n")
    out = _prepare(tmp_path, [single], f"data.validation_fraction={fraction}", out="c")
    assert one_error(out, "splitting by document put", "its 1 document(s)"), out
    assert "fewer than" not in out.stderr


def test_a_data_glob_that_reaches_into_the_run_folder_is_refused(prepared_data, tmp_path, real_entry):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    write_topics(tmp_path / "runs" / "corpus.txt", 20)
    out = real_entry([*tiny_overrides(prepared_data, run), "data.source=files", "data.prepared_dir=null",
                      f"data.paths=[{tmp_path / 'runs'}/**]"])
    assert out.one_line_error("the run would read its own output"), out


# -------------------------------------------------------------------------- 8. absurd sizes


@pytest.mark.parametrize("extra", [["model.vocab_size=1000000000"],
                                   ["model.hidden_size=65536", "model.num_heads=64", "model.ffn_size=262144"],
                                   ["model.num_layers=100000"]])
def test_absurd_sizes_fail_before_any_work(prepared_data, tmp_path, real_entry, extra):
    run = tmp_path / "run"
    t0 = time.monotonic()
    out = real_entry([*tiny_overrides(prepared_data, run), "data.prepared_dir=null", *extra])
    assert out.one_line_error("this config needs at least"), out
    assert "GiB per rank" in out.lines[0] and not (run / "data").exists()
    assert time.monotonic() - t0 < 60  # refused up front (no data preparation, no allocation)


def test_a_memory_budget_beyond_the_machine_is_capped(capsys):
    import types

    from rich.console import Console

    from linformer_train.profiling import GIB, default_budget_bytes

    profile = load_tool("profile")
    console = Console(width=200)
    have = default_budget_bytes("cpu")
    budget = profile._budget(types.SimpleNamespace(budget_gib=100000.0), "cpu", console)
    assert budget <= have * 1.05 and "--budget-gib 100000 is more than cpu has" in capsys.readouterr().out
    assert profile._budget(types.SimpleNamespace(budget_gib=0.5), "cpu", console) == int(0.5 * GIB)


def test_a_safetensors_file_with_an_unexpected_tensor_is_refused_before_it_is_read(model_dir, tmp_path,
                                                                                   monkeypatch):
    import safetensors.torch
    from safetensors.torch import load_file, save_file

    from linformer_train.convert.model_dir import ConversionError, from_pretrained

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    state = load_file(str(model / "model.safetensors"))
    state["surprise"] = torch.zeros(4096, 4096)  # 64 MB nobody asked for
    save_file(state, str(model / "model.safetensors"))

    def never(*args, **kwargs):
        raise AssertionError("tensors were read before the keys and shapes were checked")

    monkeypatch.setattr(safetensors.torch, "load_file", never)
    with pytest.raises(ConversionError, match=r"1 unexpected key\(s\) \(surprise\)"):
        from_pretrained(model)


# ------------------------------------------------------------------- 9. start-up never hangs


def test_a_build_lock_left_by_a_killed_build_is_detected_and_removed(prepared_data, tmp_path):
    from torch.utils.cpp_extension import _get_build_directory

    built = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    if not any(built.glob("*.so")):
        pytest.skip("DeepSpeed's CPU communication op is not built in this environment yet")
    ext = tmp_path / "ext"
    shutil.copytree(built, ext / "deepspeed_shm_comm")
    (ext / "deepspeed_shm_comm" / "lock").write_text("")  # what a SIGTERM mid-build leaves
    res = run_cli([sys.executable, "launch/pretrain.py",
                   *tiny_overrides(prepared_data, tmp_path / "run", "train.max_steps=1", "train.eval_every=0")],
                  env={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "a lock left by an interrupted build of DeepSpeed's CPU communication op" in res.stdout
    assert not (ext / "deepspeed_shm_comm" / "lock").exists()


# ------------------------------------------------------- 10. a dead rank's message names a good one


def test_the_dead_rank_message_skips_a_checkpoint_whose_shard_is_damaged(runs, tmp_path):
    from linformer_train.train.entry import _lost_ranks_message

    run = copy_run(runs, "z3", tmp_path / "run")
    ckpts = run / "checkpoints"
    newer = ckpts / "step_00000004"
    shutil.copytree(ckpts / STEP, newer)
    meta = json.loads((newer / "complete.json").read_text())
    meta["step"] = 4
    (newer / "complete.json").write_text(json.dumps(meta))
    (ckpts / "latest").write_text(newer.name)
    shard = newer / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped inside a tensor
    shard.write_bytes(bytes(data))
    line = _lost_ranks_message(0, [1], [("host", 1), ("host", 2)], str(run))
    assert f"the last complete checkpoint is {ckpts / STEP};" in line
    os.remove(ckpts / STEP / "rank_state_00000.pt")
    assert "there is no complete checkpoint yet" in _lost_ranks_message(0, [1], [("h", 1), ("h", 2)], str(run))
