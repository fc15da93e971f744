"""n = 65536: a training step in bounded memory (no hidden n x n buffer), the projections' init scale,
uint16 token blocks through packer and loader, and the shipped base-65536 config against the
profiler's estimate."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import proc
from linformer_train.config import k_schedule, load_config
from linformer_train.data.loader import MLMLoader
from linformer_train.data.masking import IGNORE_INDEX, MLMMasker
from linformer_train.data.prepare import BlockSet, Packer
from linformer_train.data.tokenizer import BOS_ID, EOS_ID, SPECIAL_IDS
from linformer_train.model.attention import LinearProjection

ROOT = Path(__file__).resolve().parent.parent
N = 65536
GIB = 1 << 30

# One MLM step of the tiny preset (2 layers, 64 wide, 4 heads) on one sequence of 65536 tokens, a
# third of it padding. Measured on the development machine: 1.12 GiB of peak RSS growth for
# headwise k=64 with dropout (CPU SDPA then keeps the (B, H, L, k) probabilities), 0.56 GiB for
# layerwise k=[64, 32] with activation checkpointing; activations are linear in n, ~0.14 GiB at
# n=8192. An n x n buffer anywhere would cost 4 GiB as bool, 16 GiB per head in fp32.
STEP_BOUND_GIB = 2.0


def test_training_step_at_65536_stays_within_memory_bound():
    models = [
        {"vocab_size": 1024, "k": 64},  # headwise, window init, masks of reached slots, dropout on
        {"vocab_size": 1024, "sharing": "layerwise", "k": [64, 32], "activation_checkpointing": True},
    ]
    res = proc.run([sys.executable, str(ROOT / "tests/helpers/long_step.py"), str(N), "3",
                    *map(json.dumps, models)])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(models)
    for row in rows:
        assert row["grads_finite"] and row["no_grad"] == [], row
        assert 6.0 < row["loss"] < 8.0, row  # ~ln(1024) = 6.9 at init: the model ran on real numbers
        assert 0 < row["peak_growth_bytes"] < STEP_BOUND_GIB * GIB, row
    # recomputing blocks keeps less than storing their inner activations
    assert rows[1]["peak_growth_bytes"] < rows[0]["peak_growth_bytes"]


def test_dense_projection_init_keeps_slot_scale_at_65536():
    """E.K sums over n tokens: the N(0, 1/n) draw keeps a slot at the scale of one token at any n
    (std 1/sqrt(k) would grow it 11x at n=65536, k=512)."""
    torch.manual_seed(0)
    proj = LinearProjection(512, N, init="normal", short_input_scaling="sqrt")
    x = torch.randn(1, 1, N, 16)
    y, _ = proj(x, 512, None)                                  # (1, 1, 512, 16)
    assert 0.9 < y.std().item() < 1.1
    assert proj.weight.std().item() == pytest.approx(N ** -0.5, rel=0.05)


def test_window_projection_init_is_a_mean_over_n_over_k_tokens_at_65536():
    proj = LinearProjection(512, N, init="window")
    w = proj.weight
    assert torch.equal((w > 0).sum(0), torch.ones(N, dtype=torch.long))   # every position in one window
    assert torch.equal((w > 0).sum(1), torch.full((512,), N // 512))     # windows of 128 tokens
    assert torch.allclose(w.sum(1), torch.ones(512))                     # a mean: constants keep scale
    x = torch.arange(N, dtype=torch.float32).view(1, 1, N, 1)
    y, _ = proj(x, 512, None)
    starts = torch.arange(512) * 128
    assert torch.allclose(y.view(-1), starts + 63.5)                     # slot s = mean of window s


def test_uint16_blocks_at_65536_reach_the_model_exactly(tmp_path):
    """The largest uint16 id (65535, vocab 65536) survives packing, the pread of a 128 KiB block
    and masking, and a batch holds B x n int64 ids and labels only (no n x n mask)."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 1 << 16, size=int(s)).astype(np.uint16) for s in rng.integers(20_000, 90_000, 8)]
    docs[0][:3] = 65535
    packer = Packer(tmp_path, N, np.dtype(np.uint16), 0.2, bos_id=BOS_ID, eos_id=EOS_ID,
                    allow_uneven_split=True)
    packer.add(np.concatenate(docs), np.array([len(d) for d in docs], dtype=np.int64))
    counts = packer.finish(tmp_path, "test corpus")
    blocks = counts["splits"]["train"]["blocks"]
    assert blocks >= 2 and (tmp_path / "train.bin").stat().st_size == blocks * N * 2
    train = BlockSet(tmp_path / "train.bin", N, "uint16", blocks)
    raw = np.fromfile(tmp_path / "train.bin", dtype=np.uint16).reshape(blocks, N)
    assert raw.max() == 65535
    masker = MLMMasker(vocab_size=1 << 16, special_ids=SPECIAL_IDS, seed=0)
    loader = MLMLoader(train, masker, micro_batch_size=2, shuffle=False, prefetch=0)
    batch = next(loader)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (2, N) and ids.dtype == labels.dtype == torch.int64
    kept = labels == IGNORE_INDEX
    want = torch.from_numpy(raw[:2].astype(np.int64))
    assert torch.equal(ids[kept], want[kept])                 # unmasked ids are the file's, unwrapped
    assert torch.equal(labels[~kept], want[~kept])            # labels hold the originals
    assert (want == 65535).any() and ids.max() <= 65535
    held = sum(t.numel() * t.element_size() for t in batch.values())
    assert held <= 3 * 2 * N * 8


def test_base_65536_config_loads_and_fits_its_estimate(tmp_path):
    cfg = load_config([ROOT / "configs/base-65536-layerwise.yaml"])
    m, t = cfg.model, cfg.train
    ks = k_schedule(m)
    assert m.max_seq_len == N and m.sharing == "layerwise" and max(ks) <= 512 and len(ks) == m.num_layers
    assert t.activation_checkpointing
    out = tmp_path / "estimate.json"
    res = proc.run([sys.executable, str(ROOT / "tools/profile.py"), "estimate",
                    "--config", str(ROOT / "configs/base-65536-layerwise.yaml"), "-n", str(N),
                    "--micro-batch", str(t.micro_batch_size), "--gpus", "8", "--gpu-mem-gib", "80",
                    "--activation-checkpointing", "--json", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    est = json.loads(out.read_text())["estimate"]
    assert [s["zero_stage"] for s in est["stages"]] == [0, 1, 2, 3]
    for stage in est["stages"]:  # whichever ZeRO stage: model states are small next to activations
        assert stage["fits"] and stage["total_bytes"] < 40 * GIB, stage  # room on an 80 GiB GPU
    assert est["seq_len"] == N and est["activation_checkpointing"]
