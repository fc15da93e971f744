"""What TensorBoard shows for a run, per precision (the list in the README): the gradient norm in
every precision (DeepSpeed reports none for fp32 at ZeRO stage 0; the trainer measures it there),
the loss scale only where it moves (fp16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import pretrain, tiny_overrides

pytestmark = pytest.mark.slow

TRAIN = {"loss", "accuracy", "perplexity", "lr", "grad_norm", "skipped_steps", "tokens_per_s",
         "samples_per_s", "mfu", "peak_memory_gib", "data_wait_fraction", "eta_s"}
EVAL = {"loss", "perplexity", "accuracy"}


def scalars(run: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fp32_runs_log_the_gradient_norm_before_clipping_and_no_loss_scale(prepared_data, tmp_path):
    # a clip far below the gradients' norm: a norm measured after clipping would read 0.01
    common = ["train.max_steps=2", "train.eval_every=2", "checkpoint.save_every=0",
              "logging.tensorboard=true", "optim.grad_clip=0.01"]
    tags = {}
    for stage in (0, 1):
        run = tmp_path / f"zero{stage}"
        res = pretrain(tiny_overrides(prepared_data, run, *common, f"zero.stage={stage}"))
        assert res.returncode == 0, res.stderr[-3000:]
        tags[stage] = scalars(run)
    for stage in (0, 1):
        assert set(tags[stage]) == {f"train/{t}" for t in TRAIN} | {f"eval/{t}" for t in EVAL}, stage
        assert len(tags[stage]["train/grad_norm"]) == 2
    # the same first step: ZeRO-1's norm is DeepSpeed's (before its clipping), ZeRO-0's the trainer's
    ours, deepspeeds = tags[0]["train/grad_norm"][0], tags[1]["train/grad_norm"][0]
    assert ours == pytest.approx(deepspeeds, rel=1e-4)
    assert ours > 0.1
