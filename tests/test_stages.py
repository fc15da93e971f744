"""Sequence length as a schedule: `stages:` in the config, the model resized in memory at each
boundary with its optimizer state, and runs that resume exactly inside a stage and across one."""

import json
import sys

import pytest

from conftest import deepspeed_run, pretrain, read_metrics, run_cli, tiny_overrides
from linformer_train.config import ConfigError, load_config, stage_config, stage_index

STAGES = ["train.max_steps=12", "model.max_seq_len=64", "model.k=16"]


def staged(tmp_path, *extra):
    """A two-stage config (n=32, k=8 for steps 1-6, then n=64, k=16) as a YAML file."""
    path = tmp_path / "staged.yaml"
    path.write_text(
        "stages:\n"
        "  - until_step: 6\n"
        "    model: {max_seq_len: 32, k: 8}\n"
        "    train: {micro_batch_size: 8}\n"
        "  - model: {max_seq_len: 64, k: 16}\n"
        "    train: {micro_batch_size: 4, global_batch_size: 8}\n"
        "    optim: {lr: 2.0e-3}\n" + "".join(f"{line}\n" for line in extra))
    return path


def staged_run(prepared_data, tmp_path, run_dir, *extra):
    """CLI arguments of a tiny staged run that reuses the session's tokenizer (no training)."""
    return ["--config", str(staged(tmp_path)), *tiny_overrides(prepared_data, run_dir, *STAGES, *extra),
            f"data.prepared_dir={tmp_path / 'data'}", f"data.tokenizer={prepared_data / 'tokenizer'}"]


# ------------------------------------------------------------------------------------ config


def test_each_stage_resolves_over_the_sections(tmp_path):
    cfg = load_config([staged(tmp_path)], ["train.max_steps=12", "train.run_dir=/r", "optim.lr=1e-3"])
    first, second = stage_config(cfg, 0, world_size=2), stage_config(cfg, 1, world_size=2)
    assert (first.model.max_seq_len, first.model.k, first.train.micro_batch_size, first.optim.lr) == (32, 8, 8, 1e-3)
    assert (second.model.max_seq_len, second.model.k, second.train.micro_batch_size, second.optim.lr) == (64, 16, 4, 2e-3)
    assert second.train.grad_accum_steps == 1  # 8 sequences = 4 x 1 x 2 ranks
    assert stage_config(cfg, 1, world_size=1).train.grad_accum_steps == 2
    # one prepared set per n, one tokenizer for all
    assert first.data.prepared_dir == "/r/data/n32" and second.data.prepared_dir == "/r/data/n64"
    assert second.data.tokenizer == "/r/data/n32/tokenizer"
    assert not first.stages and not second.stages
    # a checkpoint at a boundary holds the next stage
    assert [stage_index(cfg, s) for s in (0, 5, 6, 7, 12)] == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("overrides, message", [
    (["stages.0.until_step=12"], "stages[0].until_step=12 must lie after the previous stage's end (0) and "
                                 "before train.max_steps=12"),
    (["stages.1.until_step=10"], "stages[1].until_step=10: the last stage runs to train.max_steps=12"),
    (["stages.1.model.k=128"], "stages[1]: model.k for layer 0 is 128 > model.max_seq_len=64"),
    (["stages.0.train.micro_batch_size=0"], "stages[0]: train.micro_batch_size=0"),
    (["stages.1.optim.lr=-1"], "stages[1]: optim.lr=-1"),
    (["stages.2.model.k=8"], "the config has 2 stages (stages.0 to stages.1)"),
    (["stages.0.model.dropout=0.5"], "unknown key; StageModel takes max_seq_len, k"),
    (["model.projection=conv", "stages.1.model.k=32"], "stages[1]: projection=conv keeps its kernel (n / k = 4) only when n / k stays the same; stage 1 gives 2"),
])
def test_a_broken_stage_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config([staged(tmp_path)], STAGES + overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_stage_batch_arithmetic_is_checked_before_any_work(prepared_data, tmp_path):
    run = tmp_path / "run"
    res = pretrain(staged_run(prepared_data, tmp_path, run, "stages.1.train.global_batch_size=6"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "stages[1]: train.global_batch_size=6 but micro_batch_size=4" in res.stderr
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------------- training


def test_a_staged_run_resumes_exactly_inside_a_stage_and_at_its_boundary(prepared_data, tmp_path):
    """Dropout on, so the restored random state matters; the split runs stop before the boundary
    (the resumed run then crosses it) and exactly at it (the checkpoint holds the next stage)."""
    common = ["train.eval_every=0", "checkpoint.save_every=0", "model.dropout=0.1",
              "model.attention_dropout=0.1", "checkpoint.keep_last=5"]
    straight = tmp_path / "straight"
    res = pretrain(staged_run(prepared_data, tmp_path, straight, *common))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage 1/2 (n=32, k=8, micro-batch 8 x 1" in res.stdout
    assert "stage 2/2 from step 7: n 32 -> 64, k 8 -> 16, micro-batch 8 -> 4, accumulation 1 -> 2, lr 0.003 -> 0.002" \
        in res.stdout
    assert (straight / "checkpoints" / "step_00000006").is_dir()  # the boundary is saved
    assert (tmp_path / "data" / "n32" / "train.bin").is_file() and (tmp_path / "data" / "n64" / "train.bin").is_file()
    expected = [(r["step"], r["loss"], r["accuracy"]) for r in read_metrics(straight)]
    assert [s for s, _, _ in expected] == list(range(1, 13))
    done = [line for line in res.stdout.splitlines() if line.startswith("done:")]
    assert done == ["done: steps 1-12; " + done[0].split("; ", 1)[1]]
    assert "4.61k tokens" in done[0]  # each stage at its own n: 6 x 8 x 32 + 6 x 8 x 64 = 4,608

    for stop in (4, 6):
        split = tmp_path / f"split{stop}"
        first = pretrain(staged_run(prepared_data, tmp_path, split, *common, f"train.stop_after={stop}"))
        assert first.returncode == 0, first.stderr[-3000:]
        second = pretrain(staged_run(prepared_data, tmp_path, split, *common) + ["--resume"])
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"step_{stop:08d} at step {stop}" in second.stdout
        assert ("stage 2/2 (n=64" in second.stdout) == (stop == 6)
        got = [(r["step"], r["loss"], r["accuracy"]) for r in read_metrics(split)]
        assert got == expected, stop  # to the bit: JSON floats round-trip exactly


@pytest.mark.parametrize("dtype, zero", [("fp32", 0), ("bf16", 0), ("bf16", 2)])
def test_the_optimizer_state_crosses_a_boundary(prepared_data, tmp_path, dtype, zero):
    """Each way DeepSpeed keeps the state (the torch optimizer itself; fp32 copies beside bf16
    weights; ZeRO-1/2's flat partitions, here ZeRO-2; ZeRO-3 in the two-rank test below): unchanged
    parameters keep their fp32 weights and moments exactly and the step count; a resized one restarts
    its first moment and seeds its second at the old mean."""
    run = tmp_path / "run"
    res = run_cli([sys.executable, "tests/helpers/stage_carry.py", *staged_run(
        prepared_data, tmp_path, run, f"precision.dtype={dtype}", f"zero.stage={zero}", "train.eval_every=0",
        "checkpoint.save_every=0", "train.max_steps=8")])
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    record = json.loads((run / "carry.json").read_text())
    assert record["step"] == 6
    assert record["adam_step_before"] == record["adam_step_after"] > 0
    params = record["params"]
    resized = {name for name, p in params.items() if p["resized"]}
    # n and k change: the position table and every E/F (headwise: one pair per layer)
    assert resized == {"encoder.positions.weight", *(f"encoder.layers.{i}.attn.proj_{kv}.weight"
                                                    for i in (0, 1) for kv in "kv")}
    for name, p in params.items():
        if p["resized"]:
            assert p["exp_avg_max"] == 0.0
            lo, hi = p["exp_avg_sq"]
            assert lo == hi == pytest.approx(p["old_exp_avg_sq_mean"], rel=1e-6) and lo > 0
        else:
            assert p["weight_diff"] == p["exp_avg_diff"] == p["exp_avg_sq_diff"] == 0.0, name


def test_two_ranks_zero3_cross_a_boundary_together(prepared_data, tmp_path):
    """The gathers at a boundary are collective: two ranks, ZeRO-3, the state carried as on one."""
    run = tmp_path / "run"
    res = deepspeed_run("tests/helpers/stage_carry.py", staged_run(
        prepared_data, tmp_path, run, "precision.dtype=bf16", "zero.stage=3", "train.eval_every=4",
        "checkpoint.save_every=0", "train.max_steps=8", "stages.1.train.global_batch_size=16"))
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert res.stdout.count("stage 2/2 from step 7") == 1  # rank 0 speaks
    record = json.loads((run / "carry.json").read_text())
    assert record["adam_step_before"] == record["adam_step_after"] == 6.0
    params = record["params"].values()
    unchanged = [p for p in params if not p["resized"]]
    assert unchanged and all(p["weight_diff"] == p["exp_avg_diff"] == p["exp_avg_sq_diff"] == 0.0 for p in unchanged)
    resized = [p for p in params if p["resized"]]
    assert len(resized) == 5 and all(p["exp_avg_max"] == 0.0 and p["exp_avg_sq"][0] == p["exp_avg_sq"][1] ==
                                     pytest.approx(p["old_exp_avg_sq_mean"], rel=1e-6) for p in resized)
    assert [r["step"] for r in read_metrics(run, "eval")] == [4, 8]
