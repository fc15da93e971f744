"""Faults, damaged artefacts and load: what a pretraining job does when a rank is SIGKILLed, the job is
SIGTERMed, a loss goes non-finite, a checkpoint write fails, an input on disk is corrupt or from
another run, and when it runs for a long time. docs/RELIABILITY.md has the table and the figures.

The two-rank job runs three times on the same run directory (tests/helpers/faults.py injects the
faults through the real entry point):

  A  SIGKILL of rank 0 in the middle of step 8; rank 1's loss is NaN at step 2 (policy skip)
  B  --resume (from step 4, the last complete checkpoint), SIGTERM to every rank at step 5
  C  --resume (from step 5), rank 0's loss NaN at step 8 with train.nonfinite_policy=stop

A's history is the reference: B's step 5 and C's steps 6-7 must equal it to the bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli_env, deepspeed_command, deepspeed_run, read_metrics, run_cli, tiny_overrides, _free_port
from helpers import proc
from helpers.faults import make_writable
from helpers.inprocess import accept, call
from linformer_train.train.checkpoint import (
    LATEST,
    CheckpointError,
    CheckpointManager,
    verify_checkpoint,
    verify_contents,
)

pytestmark = pytest.mark.slow

TWO_RANK = ["train.max_steps=12", "train.eval_every=0", "checkpoint.save_every=4", "zero.stage=1"]


def _by_step(rows: list[dict]) -> dict[int, list[tuple]]:
    out: dict[int, list[tuple]] = {}
    for r in rows:
        out.setdefault(r["step"], []).append((r["loss"], r["accuracy"]))
    return out


def _signal_ranks_when(marker: Path, job: proc.Child) -> None:
    """SIGTERM every rank of the job once rank 0 waits at the marked step (what torchrun and
    SLURM's srun do with a SIGTERM: every task gets it)."""
    import psutil

    job.wait_until(marker.exists, f"rank 0 reached {marker.name}")
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True)
             if any(a.startswith("--local_rank") for a in p.cmdline())]
    assert len(ranks) == 2
    for p in ranks:
        p.send_signal(signal.SIGTERM)


@pytest.fixture(scope="module")
def two_rank_job(prepared_data, tmp_path_factory):
    """Runs A, B, C (see the module docstring); returns their outputs and A's checkpoint copy."""
    run = tmp_path_factory.mktemp("job") / "run"
    overrides = tiny_overrides(prepared_data, run, *TWO_RANK)
    a = deepspeed_run("tests/helpers/faults.py", ["--kill", "0:8", "--nan", "1:2", "--", *overrides])
    rows_a = read_metrics(run)
    saved_a = run.parent / "after_a"  # a 2-rank ZeRO-1 checkpoint for the artefact tests
    shutil.copytree(run / "checkpoints", saved_a)

    b_args = ["--await-sigterm", "5", "--", *overrides, "--resume"]
    with proc.start(deepspeed_command("tests/helpers/faults.py", b_args), cwd=ROOT, env=cli_env()) as job:
        _signal_ranks_when(run / "awaiting_sigterm_5", job)
        b = job.wait()
    # a resumed run keeps the history up to its checkpoint (step 4) and logs the steps after it once
    history_b = read_metrics(run)
    rows_b = [r for r in history_b if r["step"] > 4]
    latest_b = CheckpointManager(run / "checkpoints", 3).latest()

    c = deepspeed_run("tests/helpers/faults.py", ["--nan", "0:8", "--", *overrides, "--resume",
                                                  "train.nonfinite_policy=stop"])
    history_c = read_metrics(run)
    rows_c = [r for r in history_c if r["step"] > 5]
    return {"run": run, "a": a, "b": b, "c": c, "rows_a": rows_a, "rows_b": rows_b, "rows_c": rows_c,
            "history_b": history_b, "history_c": history_c,
            "latest_b": latest_b, "saved_a": saved_a}


def test_sigkill_of_a_rank_names_it_and_resume_loses_only_the_steps_since_the_checkpoint(two_rank_job):
    a, b = two_rank_job["a"], two_rank_job["b"]
    assert a.returncode != 0
    # rank 0 died without a word; rank 1 says which rank and where to resume from, in one line
    # (DeepSpeed's launcher prints the command of the last rank it started: rank 1's, here)
    lines = [line for line in a.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, a.stderr[-3000:]
    assert lines[0].startswith("error: rank 1 stops: rank 0 (pid ")
    assert "ended while the job was running" in lines[0]
    assert lines[0].endswith("checkpoints/step_00000004; rerun with --resume to continue from it")
    assert "Traceback" not in a.stderr
    steps_a = [r["step"] for r in two_rank_job["rows_a"]]
    assert steps_a == list(range(1, 8))  # killed in the middle of step 8
    saved = CheckpointManager(two_rank_job["saved_a"], 3)
    assert [p.name for p in saved.complete_checkpoints()] == ["step_00000004"]
    assert saved.latest().name == "step_00000004" and not list(two_rank_job["saved_a"].glob("*.tmp"))
    # the resumed job starts at the last complete checkpoint and repeats the lost steps exactly
    assert f"resumed from {two_rank_job['run'] / 'checkpoints' / 'step_00000004'} at step 4" in b.stdout
    ref, again = _by_step(two_rank_job["rows_a"]), _by_step(two_rank_job["rows_b"])
    assert sorted(again) == [5] and again[5][0] == ref[5][0]
    # metrics.jsonl holds one history: A's steps 6-7 (trained again by B) were dropped, not mixed in
    assert [r["step"] for r in two_rank_job["history_b"]] == [1, 2, 3, 4, 5]
    assert "metrics.jsonl: dropped 3 records after step 4" in b.stdout


def test_sigterm_to_every_rank_saves_and_each_exits_zero_then_resume_is_bit_exact(two_rank_job):
    b, c = two_rank_job["b"], two_rank_job["c"]
    assert b.returncode == 0, b.stderr[-3000:]  # the launcher's code: 0 only when both ranks exit 0
    assert "faults.py: rank 0 exit code 0" in b.stderr and "faults.py: rank 1 exit code 0" in b.stderr
    assert "stop requested: saving a checkpoint at step 5" in b.stdout
    latest = two_rank_job["latest_b"]
    assert latest.name == "step_00000005"
    meta = verify_checkpoint(latest)
    assert meta["world_size"] == 2 and {"rank_state_00000.pt", "rank_state_00001.pt"} <= set(meta["files"])
    verify_contents(latest, 0), verify_contents(latest, 1)
    assert f"resumed from {latest} at step 5" in c.stdout
    ref, after = _by_step(two_rank_job["rows_a"]), _by_step(two_rank_job["rows_c"])
    assert sorted(after) == [6, 7]
    assert after[6][0] == ref[6][0] and after[7][0] == ref[7][0]  # loss and accuracy, to the bit


def test_nonfinite_loss_on_one_rank_is_skipped_counted_and_reported(two_rank_job):
    rows = two_rank_job["rows_a"]
    by_step = {r["step"]: r for r in rows}
    assert by_step[1]["skipped_steps"] == 0
    assert by_step[2]["skipped_steps"] == 1  # rank 1's NaN: both ranks skipped the same step
    assert all(by_step[s]["skipped_steps"] == 1 for s in range(3, 8))
    assert all(torch.isfinite(torch.tensor(by_step[s]["loss"])) for s in (1, *range(3, 8)))
    assert "step       2/12 | loss nan" in two_rank_job["a"].stdout and "skipped 1" in two_rank_job["a"].stdout


def test_nonfinite_loss_with_policy_stop_stops_every_rank_at_that_step(two_rank_job):
    c = two_rank_job["c"]
    assert c.returncode == 1
    lines = [line for line in c.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: non-finite loss at step 8 and train.nonfinite_policy=stop; lower optim.lr, use "
                     "precision.dtype=bf16, or set train.nonfinite_policy=skip"] * 2, c.stderr[-3000:]  # one per rank
    assert "Traceback" not in c.stderr
    assert "faults.py: rank 0 exit code 1" in c.stderr and "faults.py: rank 1 exit code 1" in c.stderr
    assert CheckpointManager(two_rank_job["run"] / "checkpoints", 3).latest().name == "step_00000005"


def test_consecutive_skips_stop_with_a_message():
    """The skip policy's limit (the real NaN path is above; this is the counting rule)."""
    from linformer_train.config import load_config
    from linformer_train.train.trainer import Trainer, TrainingError

    t = Trainer.__new__(Trainer)
    t.cfg = load_config([], ["train.max_consecutive_skips=3"])
    t.skipped_steps = t.consecutive_skips = t.step = 0
    t.optimizer = object()
    for step, applied in enumerate([False, False, True, False, False], 1):
        t.step = step
        t._account_skip(applied, nonfinite=not applied)
    assert (t.skipped_steps, t.consecutive_skips) == (4, 2)
    t.step = 6
    with pytest.raises(TrainingError, match=r"^3 optimizer steps in a row were skipped .* up to step 6"):
        t._account_skip(False, nonfinite=True)


# ----------------------------------------------------------------------------------- write failures


def test_checkpoint_folder_made_unwritable_mid_run(prepared_data, tmp_path):
    """A real run whose checkpoints folder refuses writes after the first save (mode 0555, and the
    immutable flag where the tests run as root): one line, exit 2, the first checkpoint intact."""
    run = tmp_path / "run"
    try:
        res = run_cli([sys.executable, "tests/helpers/faults.py", "--unwritable-after-save", "1", "--",
                       *tiny_overrides(prepared_data, run, "train.max_steps=6", "train.eval_every=0",
                                       "checkpoint.save_every=3")])
    finally:
        if (run / "checkpoints").exists():
            make_writable(run / "checkpoints")
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith(f"error: saving checkpoint step_00000006 in {run / 'checkpoints'} failed (")
    assert "the previous checkpoint is intact" in lines[0]
    assert any(reason in lines[0] for reason in ("Operation not permitted", "Permission denied"))
    latest = CheckpointManager(run / "checkpoints", 3).latest()
    assert latest.name == "step_00000003"
    verify_contents(latest, 0)


class DiskFullEngine:
    """Writes like DeepSpeed (torch.save into <root>/<tag>/), but the model file is /dev/full:
    the kernel's ENOSPC reaches torch.save, which reports it as a RuntimeError."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").symlink_to("/dev/full")
        torch.save({"weights": torch.zeros(4096), "client": client_state}, d / "mp_rank_00_model_states.pt")


class GoodEngine:
    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True)
        torch.save({"weights": torch.zeros(16), **client_state}, d / "mp_rank_00_model_states.pt")


def test_disk_full_during_a_save_is_one_clear_error(tmp_path):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep_last=2)
    manager.save(GoodEngine(), 1, {"step": 1}, {"rng": 1})
    with pytest.raises(CheckpointError, match=r"^saving checkpoint step_00000002 in .* failed \(.+\); the "
                                              r"previous checkpoint is intact"):
        manager.save(DiskFullEngine(), 2, {"step": 2}, {"rng": 2})
    assert manager.latest().name == "step_00000001"
    verify_contents(manager.latest(), 0)
    manager.save(GoodEngine(), 2, {"step": 2}, {"rng": 2})  # space again: the debris is replaced
    assert manager.latest().name == "step_00000002" and not list(root.glob("*.tmp"))


# ------------------------------------------------------------------- damaged or mismatched artefacts


@pytest.fixture
def real_entry(monkeypatch):
    """launch/pretrain.py's main in this process, with a real one-rank process group; DeepSpeed's
    engine is never built (deepspeed.initialize answers `accepted`), so every case must be refused
    by the checks that run before it, i.e. before any training step."""
    import deepspeed

    from linformer_train.train.entry import pretrain

    monkeypatch.setattr(deepspeed, "initialize", accept)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # torch wraps it at every init
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def run(argv):
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        return call(pretrain, argv)

    return run


def _trunc(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _damage(path: Path, at: float = 0.6) -> None:
    """Overwrite 64 bytes inside the file: same size, bad content."""
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * at))
        f.write(b"\xff" * 64)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _other_tokenizer(tmp: Path) -> Path:
    from linformer_train.config import load_config
    from linformer_train.data.pipeline import train_tokenizer

    cfg = load_config([], ["data.max_documents=150", "data.tokenizer_vocab_size=400", "model.vocab_size=512"])
    return Path(train_tokenizer(cfg.data, tmp / "other_tokenizer", 400))


DATA_CASES = {  # name -> (damage to a copy of the prepared set, extra overrides, words of the line)
    "train.bin truncated": (lambda d, t: _trunc(d / "train.bin", 1000), [], ["train.bin has 1000 bytes"]),
    "train.bin empty": (lambda d, t: _trunc(d / "train.bin", 0), [], ["train.bin has 0 bytes"]),
    "validation.bin missing": (lambda d, t: (d / "validation.bin").unlink(), [], ["validation.bin has no file"]),
    "manifest truncated": (lambda d, t: _trunc(d / "manifest.json", 100), [], ["manifest.json is not valid JSON"]),
    "manifest not an object": (lambda d, t: (d / "manifest.json").write_text("[1, 2]"), [], ["manifest.json is not valid JSON"]),
    "manifest block count": (lambda d, t: _edit_json(d / "manifest.json", lambda m: m["splits"]["train"].update(blocks=99999)),
                             [], ["but the manifest says"]),
    "manifest dtype": (lambda d, t: _edit_json(d / "manifest.json", lambda m: m.update(dtype="uint32")), [], ["but the manifest says"]),
    "manifest dtype unknown": (lambda d, t: _edit_json(d / "manifest.json", lambda m: m.update(dtype="float99")),
                               [], ["manifest.json is damaged"]),
    "manifest without splits": (lambda d, t: _edit_json(d / "manifest.json", lambda m: m.pop("splits")), [], ["manifest.json is damaged"]),
    "manifest blocks not a count": (lambda d, t: _edit_json(d / "manifest.json", lambda m: m["splits"]["train"].update(blocks="many")),
                                    [], ["manifest.json is damaged"]),
    "manifest for another n": (lambda d, t: _edit_json(d / "manifest.json", lambda m: m.update(seq_len=128)), [], ["prepared with n=128"]),
    "manifest format version": (lambda d, t: _edit_json(d / "manifest.json", lambda m: m.update(format_version=99)), [], ["format version 99"]),
    "manifest inputs changed": (lambda d, t: _edit_json(d / "manifest.json", lambda m: m["inputs"].update(validation_fraction=0.3)),
                                [], ["prepared from other inputs"]),
    "tokenizer truncated": (lambda d, t: _trunc(d / "tokenizer" / "tokenizer.model", 1000), [], ["is not a sentencepiece model"]),
    "tokenizer record damaged": (lambda d, t: (d / "tokenizer" / "tokenizer.json").write_text("{"), [], ["tokenizer.json is not a valid"]),
    "tokenizer record a list": (lambda d, t: (d / "tokenizer" / "tokenizer.json").write_text("[]"), [], ["tokenizer.json is not a valid"]),
    "tokenizer ids swapped": (lambda d, t: _edit_json(d / "tokenizer" / "tokenizer.json",
                                                      lambda m: m.update(special_ids={"pad": 1, "bos": 0, "eos": 2, "unk": 3, "mask": 4})),
                              [], ["records special ids"]),
    "tokenizer from another run in the set": (lambda d, t: [shutil.copy(t / n, d / "tokenizer" / n) for n in ("tokenizer.model", "tokenizer.json")],
                                              [], ["tokenizer"]),
    "tokenizer from another run in the config": (lambda d, t: None, ["data.tokenizer={other}"], ["prepared from other inputs (tokenizer_sha256"]),
    "a model smaller than the tokenizer": (lambda d, t: None, ["data.tokenizer={data}/tokenizer/tokenizer.model",
                                                                "data.tokenizer_vocab_size=null", "model.vocab_size=300"],
                                           ["has 512 pieces but model.vocab_size=300"]),
}


def test_damaged_or_foreign_prepared_data_is_refused_before_training(prepared_data, tmp_path, real_entry):
    other = _other_tokenizer(tmp_path)
    bad = []
    for i, (name, (damage, extra, words)) in enumerate(DATA_CASES.items()):
        data = tmp_path / f"data{i}"
        shutil.copytree(prepared_data, data)
        damage(data, other.parent)
        argv = tiny_overrides(data, tmp_path / f"run{i}", "train.max_steps=3", "data.prefetch_batches=0",
                              *[e.format(other=other, data=data) for e in extra])
        out = real_entry(argv)
        if not out.one_line_error(*words):
            bad.append(f"{name}: exit {out.code}, {out.lines[-2:]}")
    control = real_entry(tiny_overrides(prepared_data, tmp_path / "control", "train.max_steps=3",
                                        "data.prefetch_batches=0"))
    assert control.code == "accepted", control.lines[-3:]  # the intact set gets to the engine
    assert not bad, "\n".join(bad)


def _ckpt_cases(two_rank: Path):
    step = "step_00000004"
    return {  # name -> (damage to a copy of the checkpoints folder, extra overrides, words of the line)
        "latest empty": (lambda c: (c / LATEST).write_text(""), [], ["latest is empty"]),
        "latest names a missing folder": (lambda c: (c / LATEST).write_text("step_00000099"), [], ["step_00000099 does not exist"]),
        "latest names a partial save": (lambda c: ((c / step).rename(c / f"{step}.tmp"), (c / f"{step}.tmp" / "complete.json").unlink(),
                                                   (c / LATEST).write_text(f"{step}.tmp")), [], ["is incomplete"]),
        "latest holds a path": (lambda c: (c / LATEST).write_text("../../etc\n\x00"), [], ["not the name of a checkpoint"]),
        "latest is a folder": (lambda c: ((c / LATEST).unlink(), (c / LATEST).mkdir()), [], ["latest cannot be read"]),
        "model states truncated": (lambda c: _trunc(c / step / "mp_rank_00_model_states.pt", 1000), [], ["has 1000 bytes"]),
        "model states damaged, same size": (lambda c: _damage(c / step / "mp_rank_00_model_states.pt"), [], ["fails its CRC check"]),
        "rank 0's ZeRO shard damaged": (lambda c: _damage(c / step / "zero_pp_rank_0_mp_rank_00_optim_states.pt", 0.5),
                                        [], ["fails its CRC check"]),
        "rank 1's ZeRO shard missing": (lambda c: (c / step / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
                                        [], ["is missing zero_pp_rank_1"]),
        "rank 1's state missing": (lambda c: (c / step / "rank_state_00001.pt").unlink(), [], ["is missing rank_state_00001.pt"]),
        "rank 0's state damaged": (lambda c: _damage(c / step / "rank_state_00000.pt", 0.1), [], ["rank_state_00000.pt is corrupt"]),
        "complete.json damaged": (lambda c: (c / step / "complete.json").write_text("{"), [], ["corrupt complete.json"]),
        "complete.json files a list": (lambda c: (c / step / "complete.json").write_text('{"files": [1]}'), [], ["corrupt complete.json"]),
        "checkpoint of another model": (lambda c: None, ["model.k=8"], ["has model.k=16 but the config says 8"]),
        "checkpoint of another n": (lambda c: None, ["model.max_seq_len=128", "model.k=16"], ["model.max_seq_len"]),
        "checkpoint.resume names a file": (lambda c: None, ["checkpoint.resume={ckpt}/latest"], ["does not exist"]),
        "2-rank ZeRO checkpoint on 1 rank": (lambda c: None, [], ["partitioned over 2 ranks but this job has 1"]),
    }


def test_damaged_or_mismatched_checkpoints_are_refused_before_training(prepared_data, tmp_path, two_rank_job, real_entry):
    """Resume from copies of the two-rank job's ZeRO-1 checkpoint (step 4), damaged one way each, on
    one rank: every case must be refused before the engine is built (the last one is the rank-count
    mismatch itself, which DeepSpeed used to report with a traceback after building everything)."""
    bad = []
    cases = _ckpt_cases(two_rank_job["saved_a"])
    for i, (name, (damage, extra, words)) in enumerate(cases.items()):
        run = tmp_path / f"run{i}"
        shutil.copytree(two_rank_job["saved_a"], run / "checkpoints")
        damage(run / "checkpoints")
        extra = [e.format(ckpt=run / "checkpoints") for e in extra]
        resume = [] if any(e.startswith("checkpoint.resume=") for e in extra) else ["--resume"]
        argv = tiny_overrides(prepared_data, run, *TWO_RANK, *resume, *extra)
        out = real_entry(argv)
        if not out.one_line_error(*words):
            bad.append(f"{name}: exit {out.code}, {out.lines[-2:]}")
    assert len(cases) >= 15
    assert not bad, "\n".join(bad)


def test_damaged_model_directories_are_refused_by_every_tool(two_rank_job, prepared_data, tmp_path, real_entry):
    """A model directory exported from the two-rank checkpoint, damaged one way each, given to
    convert resize, finetune predict, spectrum measure and pretraining's train.init_from."""
    from safetensors.torch import load_file, save_file

    from helpers.inprocess import load_tool
    from linformer_train.convert.entry import convert

    model = tmp_path / "model"
    exported = call(convert, ["export", str(two_rank_job["saved_a"] / "step_00000004"), str(model),
                              "--tokenizer", str(prepared_data / "tokenizer" / "tokenizer.model")])
    assert exported.code == 0, exported.lines[-3:]
    other = _other_tokenizer(tmp_path)

    def tensors(edit):
        def damage(d):
            t = load_file(d / "model.safetensors")
            edit(t)
            save_file(t, d / "model.safetensors")
        return damage

    first = "encoder.layers.0.attn.proj_k.weight"
    weights = ("resize", "spectrum", "init_from")
    cases = {  # name -> (damage, the uses that read it, words of the line: any of them)
        "safetensors truncated": (lambda d: _trunc(d / "model.safetensors", 5000), weights, ["cannot be read"]),
        "safetensors header cut": (lambda d: _trunc(d / "model.safetensors", 4), weights, ["cannot be read"]),
        "safetensors bytes damaged": (lambda d: _damage(d / "model.safetensors"), weights, ["non-finite"]),
        "a tensor missing": (tensors(lambda t: t.pop(first)), weights, ["missing key"]),
        "a tensor of the wrong shape": (tensors(lambda t: t.update({first: torch.zeros(3, 3)})), weights, ["has shape (3, 3)"]),
        "an unexpected tensor": (tensors(lambda t: t.update({"bogus.weight": torch.zeros(3)})), weights, ["unexpected key"]),
        "NaN weights": (tensors(lambda t: t.update({first: t[first] * float("nan")})), weights, ["non-finite"]),
        "config.yaml not YAML": (lambda d: (d / "config.yaml").write_text("model: [\n"), weights, ["not valid YAML"]),
        "config.yaml of another k": (lambda d: (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("k: 16", "k: 8")),
                                     weights, ["has shape (16, 64) but the config gives (8, 64)", "has model.k=8 but the config says 16"]),
        "model_info.json missing": (lambda d: (d / "model_info.json").unlink(), weights, ["no model_info.json"]),
        "model_info.json damaged": (lambda d: (d / "model_info.json").write_text("{"), weights, ["model_info.json is not valid JSON"]),
        "tokenizer from another run": (lambda d: shutil.copy(other, d / "tokenizer.model"), ("resize", "spectrum"),
                                       ["but the model was saved with tokenizer", "but the model's is"]),
        "tokenizer missing": (lambda d: (d / "tokenizer.model").unlink(), ("resize",), ["no tokenizer.model"]),
    }
    spectrum = load_tool("spectrum").main
    bad = []
    tried = 0
    for i, (name, (damage, used_by, words)) in enumerate(cases.items()):
        d = tmp_path / f"m{i}"
        shutil.copytree(model, d)
        damage(d)
        uses = {"resize": (convert, ["resize", str(d), str(tmp_path / f"r{i}"), "model.max_seq_len=128"]),
                "spectrum": (spectrum, ["measure", str(d), "--data", str(prepared_data), "--samples", "2",
                                        "--no-compare", "--out", str(tmp_path / f"s{i}")]),
                "init_from": (None, tiny_overrides(prepared_data, tmp_path / f"p{i}", f"train.init_from={d}",
                                                   "data.prefetch_batches=0"))}
        for use in used_by:
            main, argv = uses[use]
            tried += 1
            out = real_entry(argv) if main is None else call(main, argv)
            if not out.one_line_error(*words):
                bad.append(f"{name} via {use}: exit {out.code}, {out.lines[-2:]}")
    assert tried >= 35
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------- load


def test_short_soak_memory_checkpoints_and_tensorboard(prepared_data, tmp_path):
    """tools/soak.py for 150 steps (the record in docs/RELIABILITY.md runs for minutes): RSS flat
    after warm-up, never more than keep_last + 1 checkpoints on disk (keep_last at rest), event
    files readable."""
    out = tmp_path / "soak"
    res = run_cli([sys.executable, "tools/soak.py", "--steps", "150", "--interval", "0.1", "--save-every", "10",
                   "--eval-every", "25", "--keep-last", "2", "--out", str(out), "--prepared-dir", str(prepared_data)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "soak.json").read_text())
    checks = report["checks"]
    assert report["ok"] and report["steps"] >= 150
    assert checks["checkpoints"]["most_folders_seen"] <= 3 and len(checks["checkpoints"]["final"]) == 2
    assert checks["memory"]["rise_mib"] < 32 and len(report["samples"]) >= 20
    assert checks["tensorboard"]["train_loss_points"] == checks["tensorboard"]["train_logged_steps"] >= 15
    assert checks["tensorboard"]["eval_loss_points"] == 6  # steps 25, 50, ..., 150
