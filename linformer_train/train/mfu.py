"""One MFU definition, used by the trainer, the profiler and the docs: model FLOPs over the device's peak.

MFU = model FLOPs per second / the peak FLOP/s of one device, where

* model FLOPs come from :mod:`linformer_train.model.flops` (matrix multiplies only, backward = two
  forwards, the MLM head at the positions actually predicted: :func:`mlm_step_flops`);
* the peak is, in this order: the one the user states (``train.peak_tflops``, ``--peak-tflops``);
  the GPU's dense datasheet number for the dtype its matmuls run in (:data:`DATASHEET_TFLOPS`, found
  by ``torch.cuda.get_device_name``); else a measured matmul peak (:func:`measure_matmul_peak`:
  CPUs, and GPUs not in the table). :func:`device_peak` returns the number with its source, which
  every log line that shows an MFU names.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Optional

import torch

from linformer_train.config import ModelConfig
from linformer_train.model.flops import encoder_flops, mlm_head_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no structured sparsity) tensor-core peaks in TFLOP/s per GPU, from NVIDIA's datasheets;
# "tf32" is fp32 training with TF32 matmuls allowed, "fp32" without. Matched in this order on
# torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3" is the SXM part). The A10G (AWS) and
# other parts are not listed: they get a measured peak.
DATASHEET_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}),
    (r"\bH100\b", "H100 SXM", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}),
    (r"\bH200\b", "H200 SXM", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    (r"\bA100\b", "A100", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    (r"\bL40S\b", "L40S", {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6}),
    (r"\bL4\b", "L4", {"bf16": 121, "fp16": 121, "tf32": 60, "fp32": 30.3}),
    (r"\bA10\b", "A10", {"bf16": 125, "fp16": 125, "tf32": 62.5, "fp32": 31.2}),
)


@dataclass(frozen=True)
class Peak:
    """A device peak in FLOP/s and where it came from (said next to every MFU)."""

    flops: float
    source: str

    def describe(self) -> str:
        return f"{self.flops / 1e12:.3g} TFLOP/s ({self.source})"


def matmul_dtype(dtype: str) -> str:
    """The datasheet column of a training dtype: fp32 runs its matmuls in TF32 when torch allows it."""
    if dtype == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return dtype


def datasheet_peak(device_name: str, dtype: str) -> Optional[tuple[str, float]]:
    """(part, FLOP/s) of a GPU name and a dtype (bf16, fp16, tf32, fp32); None when not listed."""
    for pattern, part, peaks in DATASHEET_TFLOPS:
        if re.search(pattern, device_name) and dtype in peaks:
            return part, peaks[dtype] * 1e12
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: str | torch.device = "cpu", dtype: str = "fp32",
                        size: Optional[int] = None, repeats: int = 5, clock: str = "wall",
                        threads: Optional[int] = None) -> float:
    """Best achieved FLOP/s of a few GEMMs: the peak MFU is measured against where no datasheet
    number applies (use the same clock and thread count as the timings it divides).

    CUDA: one 8192^3 product. CPU: the best of a square and two transformer-shaped products (a CPU
    BLAS peaks at different shapes: 89-96 GFLOP/s a core here, the transformer shapes highest),
    about a second on two cores. ``size`` measures one square product instead."""
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    now = time.process_time if clock == "cpu" else time.perf_counter
    dt = DTYPES[dtype]
    if size:
        shapes = [(size, size, size)]
    elif dev.type == "cuda":
        shapes = [(8192, 8192, 8192)]
    else:
        shapes = [(2048, 2048, 2048), (2048, 768, 2304), (2048, 3072, 768)]
    best_rate = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=dev).to(dt)
        b = torch.randn(k, n, device=dev).to(dt)
        best = math.inf
        reps = repeats * (10 if dev.type == "cuda" else 1)
        for i in range(2 + reps):  # two warm-ups
            _sync(dev)
            t0 = now()
            torch.matmul(a, b)
            _sync(dev)
            if i >= 2:
                best = min(best, now() - t0)
        best_rate = max(best_rate, 2 * m * k * n / best)
    return best_rate


def device_peak(device: str | torch.device, dtype: str, stated_tflops: Optional[float] = None,
                clock: str = "wall", threads: Optional[int] = None) -> Peak:
    """The peak MFU divides by: stated, else the datasheet's (CUDA), else measured here."""
    if stated_tflops:
        return Peak(stated_tflops * 1e12, "stated")
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        column = matmul_dtype(dtype)
        found = datasheet_peak(name, column)
        if found is not None:
            part, flops = found
            return Peak(flops, f"{part} dense {column} datasheet")
        measured = measure_matmul_peak(dev, dtype, clock=clock, threads=threads)
        return Peak(measured, f"measured {dtype} matmul on {name}, not in the datasheet table")
    measured = measure_matmul_peak(dev, dtype, clock=clock, threads=threads)
    return Peak(measured, f"measured {dtype} matmul, {torch.get_num_threads()} CPU thread(s)")


def mlm_step_flops(cfg: ModelConfig, seq_len: int, sequences: int, predicted: int) -> float:
    """Model FLOPs of training on ``sequences`` sequences of ``seq_len`` tokens with ``predicted``
    masked positions in all (the head runs at those only): 3 x (encoder + head) forwards."""
    return 3.0 * (sequences * encoder_flops(cfg, seq_len) + mlm_head_flops(cfg, predicted))


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of one device: ``flops`` done in ``seconds`` over its peak."""
    return flops / seconds / peak_flops
