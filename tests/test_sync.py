"""Host syncs in a training step: one, documented (the per-step flags), and none added unnoticed.

On a GPU every read of a device tensor from Python (``.item()``, ``bool()``, ``float()``,
``.tolist()``) and every data-dependent shape (a boolean mask's ``nonzero``) makes the host wait for
the device. On CPU nothing waits, but the same calls happen: these tests count them in a real CPU
training step (in this process, one rank) and fail when one is added. DeepSpeed's own reads (its
overflow and grad-norm checks under ZeRO >= 1) are listed and counted too, as they cost the same.
The GPU sibling runs a step under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli, tiny_overrides, _free_port

def reads_in_one_step(prepared_data: Path, run: Path, *extra: str) -> dict[str, int]:
    """Reads of tensors from Python code in one CPU training step, by where they happen
    (tests/helpers/count_syncs.py, in its own process: DeepSpeed initialises once per process)."""
    res = run_cli([sys.executable, "tests/helpers/count_syncs.py",
                   *tiny_overrides(prepared_data, run, "train.max_steps=20", "logging.log_every=100",
                                   "train.eval_every=0", *extra)])
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(line for line in res.stdout.splitlines() if line.startswith("@@SYNCS "))
    return json.loads(line[len("@@SYNCS "):])


def test_fp32_step_reads_the_device_once(prepared_data, tmp_path):
    # the flags (stop request, non-finite loss, the optimizer's found_inf) in one tolist; the masked
    # positions come from the loader (no nonzero); FiniteAdamW skips on the device (no bool())
    assert reads_in_one_step(prepared_data, tmp_path / "run") == {"tolist trainer.py:train_step": 1}


def test_bf16_zero1_step_adds_only_deepspeeds_own_checks(prepared_data, tmp_path):
    seen = reads_in_one_step(prepared_data, tmp_path / "run", "precision.dtype=bf16", "zero.stage=1")
    ours = {k: v for k, v in seen.items() if "trainer.py" in k or k == "aten::nonzero"}
    theirs = {k: v for k, v in seen.items() if k not in ours}
    assert ours == {"tolist trainer.py:train_step": 1}, seen
    # DeepSpeed 0.19's ZeRO-1/2 step: its overflow check and its grad-norm validity checks
    assert {k.split()[1] for k in theirs} <= {"stage_1_and_2.py:has_overflow", "utils.py:is_invalid_grad_norm"}, theirs
    assert sum(theirs.values()) <= 4, theirs


def test_the_model_gathers_predicted_positions_without_a_boolean_mask():
    """The same loss and counts from the loader's flat positions as from the labels' mask."""
    from linformer_train.config import load_config
    from linformer_train.data.loader import mlm_batch
    from linformer_train.model import LinformerForMLM

    cfg = load_config([], ["model.preset=tiny", "model.vocab_size=64", "model.max_seq_len=16", "model.k=8"]).model
    torch.manual_seed(0)
    model = LinformerForMLM(cfg).eval()
    ids = torch.randint(5, 64, (3, 16))
    labels = torch.full((3, 16), -100)
    labels[0, 3], labels[1, 0], labels[2, 15], labels[2, 7] = 9, 10, 11, 12
    batch = mlm_batch(ids, labels)
    assert batch["predict_index"].tolist() == [3, 16, 39, 47]
    with torch.no_grad():
        gathered = model(ids, labels=labels, predict_index=batch["predict_index"])
        masked = model(ids, labels=labels)
    assert torch.equal(gathered.loss_sum, masked.loss_sum)
    assert int(gathered.num_predicted) == 4 and int(gathered.num_correct) == int(masked.num_correct)


@pytest.fixture
def one_rank(monkeypatch):
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.gpu
def test_a_cuda_step_syncs_once_in_our_code(prepared_data, tmp_path, one_rank):
    """CUDA's own sync detector, on the GPU sibling of the tests above: within our code, only the
    flags' tolist waits for the device."""
    import warnings

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (the CPU siblings above count the same reads)")
    from linformer_train.train.trainer import _Window

    from linformer_train.config import load_config
    from linformer_train.train.distributed import destroy_distributed, init_distributed
    from linformer_train.train.trainer import Trainer

    cfg = load_config([], tiny_overrides(prepared_data, tmp_path / "run", "train.max_steps=20",
                                         "precision.dtype=bf16", "zero.stage=1"))
    init_distributed()
    trainer = Trainer(cfg)
    try:
        window = _Window()
        trainer.train_step(window)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            trainer.train_step(window)
            torch.cuda.set_sync_debug_mode(0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        trainer.data.close()
        trainer._release()
        destroy_distributed()
    ours = [w for w in caught if "linformer_train" in w.filename]
    assert len(ours) == 1 and ours[0].filename.endswith("trainer.py"), [(w.filename, w.lineno) for w in ours]
