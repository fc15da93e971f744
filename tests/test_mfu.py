"""One MFU definition: the FLOP count by hand and against torch's own counter, the datasheet peaks,
the peak's source, and the trainer's window (exact masked positions; evaluations and saves left out)."""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from linformer_train.config import config_from_dict
from linformer_train.model import LinformerEncoder
from linformer_train.model.flops import encoder_flops, mlm_head_flops
from linformer_train.train import mfu as mfu_mod
from linformer_train.train.mfu import Peak, datasheet_peak, device_peak, matmul_dtype, mfu, mlm_step_flops


def small(**kw):
    model = dict(preset=None, hidden_size=64, num_heads=4, ffn_size=128, num_layers=2, max_seq_len=32,
                 k=8, vocab_size=512, dropout=0.0, attention_dropout=0.0)
    model.update(kw)
    return config_from_dict({"model": model}).model


# ------------------------------------------------------------------------------------- FLOP count


def test_flop_count_of_one_configuration_written_out_by_hand():
    # D=64, H=4, F=128, 2 layers, n=32, Linformer k=8 with linear projections; 2 FLOPs a multiply-add
    L, D, F, k = 32, 64, 128, 8
    qkv = 2 * L * D * (3 * D)            # 786,432
    out = 2 * L * D * D                  # 262,144
    ffn = 2 * (2 * L * D * F)            # 1,048,576
    e_f = 2 * (2 * k * L * D)            # E K and F V, every head: 65,536
    attn = 2 * (2 * L * k * D)           # Q (EK)^T and P (FV): 65,536
    per_layer = qkv + out + ffn + e_f + attn
    assert per_layer == 2_228_224
    assert encoder_flops(small(), 32) == 2 * per_layer == 4_456_448
    # full attention: keys are all n tokens, no projection
    assert encoder_flops(small(attention="full"), 32) == 2 * (qkv + out + ffn + 2 * (2 * L * L * D)) == 4_718_592
    # the MLM head at the predicted positions: dense D x D + tied decoder D x V
    assert mlm_head_flops(small(), 10) == 10 * (2 * D * D + 2 * D * 512) == 737_280
    # a training step: 2 sequences, 10 masked positions in all, backward = 2 forwards
    assert mlm_step_flops(small(), 32, 2, 10) == 3 * (2 * 4_456_448 + 737_280) == 28_950_528


_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
         lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v)}


@pytest.mark.parametrize("attention,projection,sharing", [
    ("linformer", "linear", "headwise"), ("linformer", "linear", "none"), ("linformer", "linear", "layerwise"),
    ("linformer", "conv", "headwise"), ("linformer", "mean", "headwise"), ("full", "linear", "headwise"),
    ("naive", "linear", "headwise")])
def test_flop_count_matches_torch_counting_the_real_forward(attention, projection, sharing):
    """torch's FlopCounterMode counts the matmuls the model really runs (SDPA's CPU kernel taught to
    it): the formula must agree exactly, E/F projections and all."""
    cfg = small(attention=attention, projection=projection, sharing=sharing, max_seq_len=64, k=16)
    torch.manual_seed(0)
    model = LinformerEncoder(cfg).eval()
    ids = torch.randint(5, 500, (2, 64))
    with FlopCounterMode(display=False, custom_mapping=_SDPA) as counter, torch.no_grad():
        model(ids)
    assert counter.get_total_flops() == 2 * encoder_flops(cfg, 64)


def test_training_flops_are_three_forwards_where_nothing_is_recomputed():
    cfg = small(attention="naive", max_seq_len=64)  # no SDPA: its backward recomputes the scores
    model = LinformerEncoder(cfg).train()
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(5, 500, (2, 64))).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * encoder_flops(cfg, 64)


# ------------------------------------------------------------------------------------------- peaks


@pytest.mark.parametrize("name,dtype,part,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", "H100 SXM", 989), ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756),
    ("NVIDIA H100 NVL", "fp16", "H100 NVL", 835), ("NVIDIA H200", "bf16", "H200 SXM", 989),
    ("NVIDIA A100-SXM4-80GB", "bf16", "A100", 312), ("NVIDIA A100 80GB PCIe", "tf32", "A100", 156),
    ("NVIDIA L40S", "bf16", "L40S", 362), ("NVIDIA L4", "fp32", "L4", 30.3), ("NVIDIA A10", "bf16", "A10", 125),
    ("NVIDIA H100 80GB HBM3", "fp32", "H100 SXM", 67)])
def test_datasheet_peaks_by_device_name_and_dtype(name, dtype, part, tflops):
    assert datasheet_peak(name, dtype) == (part, tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA L40", "Tesla V100-SXM2-16GB", "NVIDIA GeForce RTX 4090"])
def test_a_gpu_not_in_the_table_has_no_datasheet_peak(name):
    assert datasheet_peak(name, "bf16") is None


def test_fp32_reads_the_tf32_column_only_when_torch_allows_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert matmul_dtype("fp32") == "fp32" and matmul_dtype("bf16") == "bf16"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert matmul_dtype("fp32") == "tf32"


def test_the_peak_says_where_it_came_from(monkeypatch):
    measured = []
    monkeypatch.setattr(mfu_mod, "measure_matmul_peak",
                        lambda device, dtype, **kw: measured.append((str(device), dtype)) or 2.5e11)
    assert device_peak("cpu", "fp32", 1.5) == Peak(1.5e12, "stated")
    assert measured == []
    cpu = device_peak("cpu", "fp32")
    assert cpu.flops == 2.5e11 and cpu.source.startswith("measured fp32 matmul") and measured == [("cpu", "fp32")]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    h100 = device_peak("cuda", "bf16")
    assert h100 == Peak(989e12, "H100 SXM dense bf16 datasheet") and len(measured) == 1
    assert h100.describe() == "989 TFLOP/s (H100 SXM dense bf16 datasheet)"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    other = device_peak("cuda", "bf16")
    assert other.flops == 2.5e11 and "NVIDIA A10G, not in the datasheet table" in other.source


def test_measured_matmul_peak_is_a_rate_of_the_product_it_timed():
    rate = mfu_mod.measure_matmul_peak("cpu", "fp32", size=64, repeats=1, clock="cpu")
    assert 1e6 < rate < 1e14


# ------------------------------------------------------------------------------ the trainer's window


class _Clock:
    def __init__(self, t: float):
        self.t = t

    def perf_counter(self) -> float:
        return self.t


def test_window_mfu_uses_the_exact_masked_positions_and_leaves_evaluations_out(monkeypatch):
    from linformer_train.train import trainer as trainer_mod

    clock = _Clock(100.0)
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    cfg = types.SimpleNamespace(model=small(), precision=types.SimpleNamespace(dtype="fp32"))
    trainer = types.SimpleNamespace(
        cfg=cfg, global_batch=8, world_size=2, skipped_steps=0, device=torch.device("cpu"),
        peak=Peak(1e9, "stated"), engine=types.SimpleNamespace(get_global_grad_norm=lambda: None),
        optimizer=None)
    window = trainer_mod._Window()
    for predicted in (13, 17, 9):  # this rank's masked positions of three steps (none applied)
        window.add(None, None, None, 1e-3, applied=False, predicted=predicted)
    clock.t = 102.0
    with window.paused():          # an evaluation or a save: 8 s that are not training
        clock.t = 110.0
    clock.t = 111.0
    row = window.summary(trainer, eta=0.0)
    seconds = 3.0                  # 111 - 100 - 8
    assert row["samples_per_s"] == pytest.approx(3 * 8 / seconds)
    assert row["tokens_per_s"] == pytest.approx(3 * 8 * 32 / seconds)
    # this rank: 3 steps x 4 sequences (global batch 8 over 2 ranks), 39 masked positions
    flops = 3 * (12 * 4_456_448 + 39 * 73_728)
    assert row["mfu"] == pytest.approx(flops / seconds / 1e9, rel=1e-12)
    assert mfu(flops, seconds, 1e9) == row["mfu"]
