"""Trainer pieces without a process group: DeepSpeed config derivation, LR schedule, atomic saves."""

import json
from pathlib import Path

import pytest
import torch

from linformer_train.config import ConfigError, load_config
from linformer_train.train.checkpoint import (
    LATEST,
    CheckpointError,
    CheckpointManager,
    verify_checkpoint,
)
from linformer_train.train.ds_config import build_ds_config
from linformer_train.train.trainer import FiniteAdamW, lr_at


def cfg(*overrides):
    return load_config([], list(overrides))


def test_ds_config_is_derived_from_the_yaml():
    ds = build_ds_config(cfg("train.micro_batch_size=4", "train.grad_accum_steps=3", "precision.dtype=bf16",
                             "zero.stage=3", "zero.offload_optimizer=true",
                             "zero.offload_params=true", "optim.grad_clip=0.5"), world_size=2)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True} and "fp16" not in ds
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_fp16_loss_scaling_knobs():
    ds = build_ds_config(cfg("precision.dtype=fp16", "precision.initial_scale_power=12",
                             "precision.hysteresis=3"), world_size=1)
    assert ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["initial_scale_power"] == 12
    assert ds["fp16"]["hysteresis"] == 3 and "bf16" not in ds


def test_passthrough_merges_and_conflicts_are_errors():
    ds = build_ds_config(cfg("precision.deepspeed.zero_optimization.reduce_bucket_size=1000",
                             "precision.deepspeed.flops_profiler.enabled=true"), world_size=1)
    assert ds["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 1000}
    assert ds["flops_profiler"] == {"enabled": True}
    with pytest.raises(ConfigError, match=r"^precision.deepspeed.train_batch_size collides with "
                                          r"'train_batch_size', which is derived"):
        build_ds_config(cfg("precision.deepspeed.train_batch_size=64"), world_size=1)
    with pytest.raises(ConfigError, match=r"zero_optimization.stage collides"):
        build_ds_config(cfg("precision.deepspeed.zero_optimization.stage=2"), world_size=1)


def test_global_batch_checked_against_ranks():
    with pytest.raises(ConfigError, match=r"train.global_batch_size=64 but micro_batch_size=8 x "
                                          r"grad_accum_steps=1 x 4 ranks = 32"):
        build_ds_config(cfg("train.global_batch_size=64"), world_size=4)


def test_lr_schedule():
    kw = dict(lr=1.0, warmup=10, total=110, min_ratio=0.1)
    assert lr_at(0, decay="linear", **kw) == pytest.approx(0.1)
    assert lr_at(9, decay="linear", **kw) == pytest.approx(1.0)
    assert lr_at(60, decay="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, decay="linear", **kw) == pytest.approx(0.1)
    assert lr_at(60, decay="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(35, decay="cosine", **kw) > lr_at(35, decay="linear", **kw)
    assert lr_at(100, decay="constant", **kw) == 1.0
    assert lr_at(10, decay="linear", **kw) == pytest.approx(1.0)       # the first step after warmup: the peak
    for decay in ("linear", "cosine"):                                  # past the end: the floor, not below
        assert lr_at(150, decay=decay, **kw) == pytest.approx(0.1)
    assert lr_at(10, lr=1.0, warmup=10, total=10, decay="linear", min_ratio=0.1) == 1.0  # all warmup, no decay


def test_finite_adamw_skips_nonfinite_steps_on_the_device():
    p = torch.nn.Parameter(torch.ones(3))
    opt = FiniteAdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    # nothing moved: weights, moments, step count; the flag is a tensor, read by the trainer's one sync
    assert float(opt.found_inf) == 1.0 and torch.equal(p.data, torch.ones(3))
    assert float(opt.state[p]["step"]) == 0 and torch.equal(opt.state[p]["exp_avg"], torch.zeros(3))
    p.grad = torch.ones(3)
    opt.step()
    assert float(opt.found_inf) == 0.0 and (p.data < 1).all() and float(opt.state[p]["step"]) == 1


class FakeEngine:
    """Writes files the way DeepSpeed does: into <root>/<tag>/."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert save_latest is False
        d = Path(root) / tag
        d.mkdir(parents=True)
        torch.save({"client": client_state}, d / "mp_rank_00_model_states.pt")


class Crash(Exception):
    pass


def crash_at(stage):
    def hook(name):
        if name == stage:
            raise Crash(stage)
    return hook


@pytest.mark.parametrize("stage", ["before", "files_written", "before_rename", "before_latest"])
def test_crash_at_every_save_stage_keeps_previous_checkpoint(tmp_path, stage):
    root = tmp_path / "checkpoints"
    CheckpointManager(root, keep_last=2).save(FakeEngine(), 100, {"step": 100}, {"rng": 1})
    with pytest.raises(Crash):
        CheckpointManager(root, keep_last=2, on_stage=crash_at(stage)).save(FakeEngine(), 200, {"step": 200}, {})
    manager = CheckpointManager(root, keep_last=2)
    assert (root / "latest").read_text() == "step_00000100"  # the pointer never names an incomplete one
    latest = manager.latest()
    verify_checkpoint(latest)
    if stage == "before_latest":  # renamed but not yet pointed at: complete, found by listing, preferred
        assert [p.name for p in manager.complete_checkpoints()] == ["step_00000100", "step_00000200"]
        assert latest.name == "step_00000200"
    else:
        assert latest.name == "step_00000100"
    # the next save of the same step succeeds over the debris; a complete folder it replaces is
    # moved aside, never kept in place of the new one
    manager.save(FakeEngine(), 200, {"step": 200}, {"new": 1})
    assert manager.latest().name == "step_00000200"
    assert not list(root.glob("*.tmp"))
    assert len(list(root.glob("superseded-*/step_00000200"))) == (stage == "before_latest")


def test_keep_last_and_resume_resolution(tmp_path):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep_last=2)
    for step in (1, 2, 3):
        manager.save(FakeEngine(), step, {"step": step}, {})
    assert [p.name for p in manager.complete_checkpoints()] == ["step_00000002", "step_00000003"]
    assert manager.resolve_resume("none") is None
    assert manager.resolve_resume("auto").name == "step_00000003"
    assert manager.resolve_resume(str(root)).name == "step_00000003"
    assert manager.resolve_resume(str(root / "step_00000002")).name == "step_00000002"
    assert CheckpointManager(tmp_path / "empty", 1).resolve_resume("auto") is None


def test_bad_checkpoints_are_clear_errors(tmp_path):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep_last=3)
    path = manager.save(FakeEngine(), 5, {"step": 5}, {})
    with pytest.raises(CheckpointError, match=r"does not exist; check checkpoint.resume"):
        manager.resolve_resume(str(root / "step_00000099"))
    (root / "step_00000007.tmp").mkdir()
    with pytest.raises(CheckpointError, match=r"is incomplete \(no complete.json"):
        manager.resolve_resume(str(root / "step_00000007.tmp"))
    with open(path / "mp_rank_00_model_states.pt", "ab") as f:
        f.write(b"junk")
    with pytest.raises(CheckpointError, match=r"has \d+ bytes, \d+ were written; the file is corrupt"):
        manager.resolve_resume("auto")
    (root / LATEST).write_text("")
    with pytest.raises(CheckpointError, match=r"latest is empty"):
        manager.resolve_resume("auto")
    meta = json.loads((path / "complete.json").read_text())
    (path / next(iter(meta["files"]))).unlink()
    with pytest.raises(CheckpointError, match=r"is missing mp_rank_00_model_states.pt"):
        verify_checkpoint(path)


def test_failed_write_is_a_clear_error_and_keeps_previous(tmp_path):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep_last=3)
    manager.save(FakeEngine(), 1, {"step": 1}, {})

    class FullDisk(FakeEngine):
        def save_checkpoint(self, *a, **k):
            raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match=r"saving checkpoint step_00000002 .* failed \(No space left "
                                              r"on device\); the previous checkpoint is intact"):
        manager.save(FullDisk(), 2, {"step": 2}, {})
    assert manager.latest().name == "step_00000001"


def test_unigram_baseline_is_the_cross_entropy_of_token_frequencies(tmp_path):
    """Frequencies from the training blocks (add-one smoothed, specials excluded), scored at the
    masked positions only."""
    import math

    import numpy as np

    from linformer_train.data.prepare import BlockSet
    from linformer_train.train.report import unigram_log_probs, unigram_sums

    V, n = 8, 4
    rows = np.array([[1, 5, 5, 6], [1, 5, 7, 2], [1, 6, 5, 2]], dtype=np.uint16)  # 1, 2 special
    rows.tofile(tmp_path / "train.bin")
    log_p = unigram_log_probs(BlockSet(tmp_path / "train.bin", n, "uint16", 3), V, special_ids=[0, 1, 2])
    counts = {3: 1, 4: 1, 5: 5, 6: 3, 7: 2}  # add-one: 0, 0, 4, 2, 1 seen
    total = sum(counts.values())
    for token, c in counts.items():
        assert math.isclose(float(log_p[token]), math.log(c / total), rel_tol=1e-9)
    assert float(log_p[1].exp()) == 0.0 and float(log_p[2].exp()) == 0.0
    labels = torch.tensor([[-100, 5, -100, 7], [6, -100, -100, -100]])
    loss_sum, count = unigram_sums(log_p, [{"labels": labels}])
    assert count == 3 and math.isclose(loss_sum, -math.log(5 / 12) - math.log(2 / 12) - math.log(3 / 12))
