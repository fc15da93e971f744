"""End-to-end pretraining through launch/pretrain.py: learning, exact resume, preemption, crashes
mid-save, bad input; and 2 CPU ranks under the deepspeed launcher for ZeRO 1, 2 and 3."""

import json
import signal
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, deepspeed_run, pretrain, read_metrics, run_cli, tiny_overrides
from helpers import proc
from linformer_train.train.checkpoint import CheckpointManager, verify_checkpoint

pytestmark = pytest.mark.slow


def test_loss_falls_and_everything_is_written(prepared_data, tmp_path):
    run = tmp_path / "run"
    res = pretrain(tiny_overrides(prepared_data, run, "train.max_steps=60", "train.eval_every=30",
                                  "checkpoint.save_every=30", "logging.tensorboard=true",
                                  "logging.fill_mask_examples=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    # start-up says each phase once, in order, before the first step; DeepSpeed's chatter stays quiet
    out = res.stdout.splitlines()
    phases = ["config: ", "run: ", "data: ", "model: ", "engine: ", "training: ", "step "]
    at = [next(i for i, line in enumerate(out) if line.startswith(p)) for p in phases]
    assert at == sorted(at), out[:12]
    assert f"run: {run} | fresh start" in out
    assert "model: 113k parameters | 2 layers x 64 (4 heads, FFN 128) | n=64 | linformer k=16" in res.stdout
    assert "engine: DeepSpeed ZeRO-0 | fp32 | 1 rank(s) on cpu" in res.stdout
    for chatter in ("Setting accelerator to CPU", "built successfully", "[INFO]", "[WARNING]"):
        assert chatter not in res.stdout + res.stderr, chatter
    # the end: what was trained, the evaluation beside the unigram baseline, where everything is
    done = out.index(next(line for line in out if line.startswith("done: steps 1-60; ")))
    summary = "\n".join(out[done:])
    evals_logged = read_metrics(run, "eval")
    assert f"eval  (validation, step 60): loss {evals_logged[-1]['loss']:.4f}" in summary
    unigram = float(summary.split("unigram baseline perplexity ")[1].split()[0])
    assert 1 < unigram < 512  # the frequency model of a 512-piece vocabulary (its maths: test_train_units)
    assert f"checkpoint: {run / 'checkpoints' / 'step_00000060'}" in summary
    assert f"metrics: {run}/metrics.jsonl | TensorBoard: {run}/tensorboard | config: {run}/config.yaml" in summary
    assert summary.count("      guesses: ") == 2 and summary.count(" <mask> ") == 2
    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [30, 60] and evals[1]["loss"] < evals[0]["loss"]
    row = read_metrics(run)[-1]
    for key in ("accuracy", "perplexity", "lr", "tokens_per_s", "samples_per_s", "mfu",
                "peak_memory_gib", "data_wait_fraction"):
        assert row[key] is not None and row[key] >= 0, key
    # MFU = this rank's model FLOPs / step time / the stated peak (train.peak_tflops=1.0): 8 sequences
    # of n=64 and the head at the masked positions (~15% of 512; half to 1.5 times that brackets it)
    from linformer_train.config import load_config
    from linformer_train.train.mfu import mlm_step_flops

    model, seconds = load_config([run / "config.yaml"]).model, 8 / row["samples_per_s"]
    low, high = (mlm_step_flops(model, 64, 8, share * 0.15 * 512) / seconds / 1e12 for share in (0.5, 1.5))
    assert low < row["mfu"] < high, (low, row["mfu"], high)
    assert (run / "config.yaml").is_file() and list((run / "tensorboard").iterdir())
    manager = CheckpointManager(run / "checkpoints", keep_last=3)
    assert manager.latest().name == "step_00000060"
    assert [p.name for p in manager.complete_checkpoints()] == ["step_00000030", "step_00000060"]
    assert "step      60/60 | loss" in res.stdout


def test_resume_is_bit_exact(prepared_data, tmp_path):
    # dropout on, so the restored RNG state matters too
    common = ["train.max_steps=16", "train.eval_every=0", "checkpoint.save_every=0",
              "model.dropout=0.1", "model.attention_dropout=0.1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert pretrain(tiny_overrides(prepared_data, straight, *common)).returncode == 0
    first = pretrain(tiny_overrides(prepared_data, split, *common, "train.stop_after=7"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = pretrain(tiny_overrides(prepared_data, split, *common) + ["--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step_00000007" in second.stdout
    a = [(r["step"], r["loss"], r["accuracy"]) for r in read_metrics(straight)]
    b = [(r["step"], r["loss"], r["accuracy"]) for r in read_metrics(split)]
    assert [s for s, _, _ in b] == list(range(1, 17))
    assert a == b  # to the bit: JSON floats round-trip exactly


def test_sigterm_saves_a_checkpoint_and_exits_zero(prepared_data, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "launch/pretrain.py",
            *tiny_overrides(prepared_data, run, "train.max_steps=100000", "train.eval_every=0",
                            "checkpoint.save_every=0")]
    with proc.start(args, cwd=ROOT, env=cli_env()) as child:
        metrics = run / "metrics.jsonl"  # complete lines only: the run is writing it
        child.wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3,
                         "three steps were logged")
        child.send_signal(signal.SIGTERM)
        res = child.wait()
    out, err = res.stdout, res.stderr
    assert res.returncode == 0, err[-3000:]
    latest = CheckpointManager(run / "checkpoints", 3).latest()
    steps = [r["step"] for r in read_metrics(run)]
    assert latest is not None and int(latest.name.split("_")[1]) >= steps[-1] >= 3
    assert "stop requested: saving a checkpoint" in out


@pytest.mark.parametrize("stage", ["files_written", "before_latest"])
def test_kill_during_save_keeps_previous_checkpoint(prepared_data, tmp_path, stage):
    run = tmp_path / "run"
    overrides = tiny_overrides(prepared_data, run, "train.max_steps=6", "train.eval_every=0",
                               "checkpoint.save_every=3")
    res = run_cli([sys.executable, "tests/helpers/crash_during_save.py", stage, "2", *overrides])
    assert res.returncode == 17, res.stderr[-3000:]
    manager = CheckpointManager(run / "checkpoints", 3)
    # killed before its rename, step 6 is debris; killed after it (before `latest`), step 6 is
    # complete and newer than the pointer: resume takes it and loses nothing
    expected = "step_00000003" if stage == "files_written" else "step_00000006"
    assert manager.latest().name == expected
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"
    verify_checkpoint(manager.latest())
    again = pretrain(overrides + ["--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / expected}" in again.stdout
    assert manager.latest().name == "step_00000006"


@pytest.mark.parametrize("overrides,message", [
    (["model.k=4096"], "error: model.k for layer 0 is 4096 > model.max_seq_len=64; k must not exceed n"),
    (["train.micro_batch_size=two"], "error: config: train.micro_batch_size: Value 'two' of type 'str' "
                                     "could not be converted to Integer"),
    (["checkpoint.resume=/nonexistent/step_1"], "error: checkpoint /nonexistent/step_1 does not exist"),
    (["--bogus-flag"], "error: pretrain: unrecognized arguments: --bogus-flag"),
])
def test_bad_input_is_one_line(prepared_data, tmp_path, overrides, message):
    res = pretrain(tiny_overrides(prepared_data, tmp_path / "run") + overrides)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), res.stderr[-2000:]


def test_partial_checkpoint_named_for_resume_is_refused(prepared_data, tmp_path):
    run = tmp_path / "run"
    partial = run / "checkpoints" / "step_00000005.tmp"
    partial.mkdir(parents=True)
    res = pretrain(tiny_overrides(prepared_data, run, f"checkpoint.resume={partial}"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "is incomplete (no complete.json: its save never finished)" in res.stderr


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_bf16_zero(prepared_data, tmp_path, stage):
    """Loss falls, replicas agree; activation checkpointing with a layerwise-shared projection and
    a per-layer k schedule (the combination DeepSpeed #988/#2103 broke under ZeRO-2/3)."""
    run = tmp_path / f"zero{stage}"
    res = deepspeed_run("tests/helpers/train_and_report.py", tiny_overrides(
        prepared_data, run, "precision.dtype=bf16", f"zero.stage={stage}",
        "train.max_steps=24", "train.eval_every=12", "checkpoint.save_every=12",
        "model.sharing=layerwise", "model.k=[32,16]", "train.activation_checkpointing=true",
        "train.micro_batch_size=4"))
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == 24 and sum(losses[-4:]) < sum(losses[:4]) - 2.0, losses
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 24
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert CheckpointManager(run / "checkpoints", 3).latest().name == "step_00000024"
    # only rank 0 speaks
    assert res.stdout.count(f"engine: DeepSpeed ZeRO-{stage} | bf16 | 2 rank(s) on cpu") == 1, res.stdout[-3000:]
    assert res.stdout.count("model: ") == 1 and res.stdout.count("done: steps 1-24") == 1
    if stage == 2:
        # resume on ONE rank (micro-batch 8 keeps 8 samples per step) through a universal checkpoint
        ckpt = run / "checkpoints" / "step_00000024"
        universal = run / "checkpoints" / "step_00000024_universal"
        conv = run_cli([sys.executable, "tools/convert.py", "universal", str(ckpt), str(universal)])
        assert conv.returncode == 0, conv.stderr[-3000:]
        assert f"resume with checkpoint.resume={universal} checkpoint.universal=true" in conv.stdout
        res = pretrain(tiny_overrides(
            prepared_data, run, "precision.dtype=bf16", "zero.stage=2", "train.max_steps=28",
            "train.eval_every=0", "checkpoint.save_every=0", "model.sharing=layerwise", "model.k=[32,16]",
            "train.activation_checkpointing=true", "train.micro_batch_size=8",
            f"checkpoint.resume={universal}", "checkpoint.universal=true"))
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"resumed from {universal} at step 24" in res.stdout
        after = [r["loss"] for r in read_metrics(run)][24:]
        assert [r["step"] for r in read_metrics(run)][24:] == [25, 26, 27, 28]
        assert max(after) < losses[0] - 0.5  # carries on from the trained weights, not from scratch


def test_init_from_an_exported_model_directory(prepared_data, tmp_path):
    first = tmp_path / "first"
    common = ["train.eval_every=0", "checkpoint.save_every=0"]
    assert pretrain(tiny_overrides(prepared_data, first, "train.max_steps=40", *common)).returncode == 0
    model_dir = tmp_path / "exported"
    exp = run_cli([sys.executable, "tools/convert.py", "export", str(first), str(model_dir)])
    assert exp.returncode == 0, exp.stderr[-3000:]
    second = tmp_path / "second"
    res = pretrain(tiny_overrides(prepared_data, second, "train.max_steps=3", f"train.init_from={model_dir}", *common))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"initialised from {model_dir}" in res.stdout
    trained_start = read_metrics(second)[0]["loss"]
    fresh_start = read_metrics(first)[0]["loss"]
    assert trained_start < fresh_start - 1.0
    bad = pretrain(tiny_overrides(prepared_data, tmp_path / "third", "model.k=8", f"train.init_from={model_dir}"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"error: {model_dir} has model.k=16 but the config says 8" in bad.stderr
