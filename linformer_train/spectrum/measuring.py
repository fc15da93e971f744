"""Collecting spectra over a model and a stream of sequences: forward hooks on every attention module."""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linformer_train.spectrum.maths import (
    SHARE_GRID,
    attention_probabilities,
    curve_ranks,
    effective_rank,
    normalised_cumulative,
    rank_needed,
)
from linformer_train.spectrum.result import SpectrumError, SpectrumResult



def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every encoder layer, in order (LinformerForMLM, a classifier or a
    bare LinformerEncoder)."""
    encoder = getattr(model, "encoder", model)
    layers = getattr(encoder, "layers", None)
    if layers is None:
        raise SpectrumError(f"{type(model).__name__} has no encoder layers; pass a model built by "
                            f"linformer_train.model")
    return [block.attn for block in layers]


def _is_linformer(attn: nn.Module) -> bool:
    from linformer_train.model.attention import LinformerSelfAttention

    return isinstance(attn, LinformerSelfAttention)



class _Accumulator:
    """Running statistics of one measurement; one ``add`` per (sample, layer, head chunk)."""

    def __init__(self, num_layers: int, num_heads: int, seq_len: int, shares: np.ndarray,
                 compare: bool):
        self.L, self.H, self.n = num_layers, num_heads, seq_len
        self.shares = torch.as_tensor(shares, dtype=torch.float64)
        self.curve_idx = torch.as_tensor(curve_ranks(seq_len) - 1)
        R = self.curve_idx.numel()
        self.sum = torch.zeros(num_layers, num_heads, R, dtype=torch.float64)
        self.min = torch.full((num_layers, num_heads, R), float("inf"), dtype=torch.float64)
        self.max = torch.zeros(num_layers, num_heads, R, dtype=torch.float64)
        self.ranks: list[torch.Tensor] = []          # per sample: (layers, heads, G)
        self.eff: list[torch.Tensor] = []            # per sample: (layers, heads)
        self.err: list[torch.Tensor] = [] if compare else None
        self.cos: list[torch.Tensor] = [] if compare else None
        self.count = 0

    def start_sample(self) -> None:
        self.ranks.append(torch.zeros(self.L, self.H, len(self.shares), dtype=torch.int32))
        self.eff.append(torch.zeros(self.L, self.H, dtype=torch.float32))
        if self.err is not None:
            self.err.append(torch.full((self.L,), float("nan")))
            self.cos.append(torch.full((self.L,), float("nan")))
        self.count += 1

    def add(self, layer: int, heads: slice, svals: torch.Tensor) -> None:
        svals = svals.to(torch.float64)                         # (h, n)
        cum = normalised_cumulative(svals)                       # (h, n)
        kept = cum[:, self.curve_idx]                            # (h, R)
        self.sum[layer, heads] += kept
        self.min[layer, heads] = torch.minimum(self.min[layer, heads], kept)
        self.max[layer, heads] = torch.maximum(self.max[layer, heads], kept)
        self.ranks[-1][layer, heads] = rank_needed(cum, self.shares).to(torch.int32)
        self.eff[-1][layer, heads] = effective_rank(svals).to(torch.float32)

    def add_comparison(self, layer: int, rel_err: float, cosine: float) -> None:
        self.err[-1][layer] = rel_err
        self.cos[-1][layer] = cosine

    def result(self, attention: str, model_k: list[int], info: dict) -> SpectrumResult:
        if self.count == 0:
            raise SpectrumError("no sequence was measured; the data source gave no sample")
        return SpectrumResult(
            seq_len=self.n, num_layers=self.L, num_heads=self.H, attention=attention,
            model_k=list(model_k), shares=self.shares.numpy(),
            ranks=torch.stack(self.ranks).numpy(), effective_ranks=torch.stack(self.eff).numpy(),
            curve_ranks=(self.curve_idx + 1).numpy(),
            cumulative_mean=(self.sum / self.count).numpy().astype(np.float32),
            cumulative_min=self.min.numpy().astype(np.float32),
            cumulative_max=self.max.numpy().astype(np.float32),
            linformer_rel_error=None if self.err is None else torch.stack(self.err).numpy(),
            linformer_cosine=None if self.cos is None else torch.stack(self.cos).numpy(),
            info=info,
        )


def heads_per_chunk(seq_len: int, num_heads: int, svd_dtype: torch.dtype,
                    memory_budget_bytes: int = 512 << 20) -> int:
    """Heads whose (n, n) matrices (P, its copy in ``svd_dtype`` and LAPACK's workspace, ~3 copies)
    fit the budget; at least one."""
    per_head = 3 * seq_len * seq_len * torch.finfo(svd_dtype).bits // 8
    return max(1, min(num_heads, memory_budget_bytes // max(1, per_head)))


def _layer_hook(acc: _Accumulator, layer: int, svd_dtype: torch.dtype, chunk: int,
                compare: bool) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        x = args[0] if args else kwargs["x"]
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        if x.shape[0] != 1:
            raise RuntimeError("the spectrum hooks expect one sequence per forward")
        q, k, v = module.split_heads(x)                       # (1, H, n, Dh)
        for start in range(0, module.num_heads, chunk):
            heads = slice(start, min(module.num_heads, start + chunk))
            p = attention_probabilities(q[0, heads], k[0, heads])  # (h, n, n) fp32
            acc.add(layer, heads, torch.linalg.svdvals(p.to(svd_dtype)))
            del p
        if compare:
            key_mask = None if mask is None else mask[:, None, None, :].bool()
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=key_mask)
            B, H, L, Dh = y.shape
            out = module.out                                      # never .float() the module: in place
            bias = None if out.bias is None else out.bias.float()
            full = F.linear(y.transpose(1, 2).reshape(B, L, H * Dh), out.weight.float(), bias)  # (1, n, D)
            got = output.float()
            rel = (got - full).norm() / full.norm().clamp(min=1e-12)
            cos = F.cosine_similarity(got, full, dim=-1).mean()
            acc.add_comparison(layer, float(rel), float(cos))

    return hook


@torch.no_grad()
def measure_spectrum(model: nn.Module, samples: Iterable[np.ndarray | torch.Tensor],
                     shares: Sequence[float] = SHARE_GRID, svd_dtype: torch.dtype = torch.float32,
                     compare_linformer: bool = True, memory_budget_bytes: int = 512 << 20,
                     progress: Optional[Callable[[int, float], None]] = None,
                     info: Optional[dict] = None) -> SpectrumResult:
    """Run ``model`` on each sample (a 1-D array of n token ids, all the same n) and collect the
    spectra of every layer's and head's softmax attention. Nothing of size (n, n) outlives a head
    chunk. ``progress(samples_done, seconds)`` is called after each sample."""
    attns = attention_modules(model)
    num_heads = attns[0].num_heads
    shares_arr = np.array(sorted(set(float(s) for s in shares)), dtype=np.float64)
    if shares_arr.size == 0 or shares_arr.min() <= 0 or shares_arr.max() >= 1:
        raise SpectrumError(f"shares must lie in (0, 1), got {list(shares)}")
    compare = compare_linformer and any(_is_linformer(a) for a in attns)
    encoder = getattr(model, "encoder", model)
    model_k = list(getattr(encoder, "k_schedule", [None] * len(attns)))
    attention = "linformer" if any(_is_linformer(a) for a in attns) else getattr(
        getattr(encoder, "cfg", None), "attention", "full")
    was_training = model.training
    model.eval()
    acc: Optional[_Accumulator] = None
    handles = []
    t0 = time.perf_counter()
    try:
        for sample in samples:
            ids = torch.as_tensor(np.asarray(sample), dtype=torch.long).reshape(1, -1)
            n = ids.shape[1]
            if acc is None:
                acc = _Accumulator(len(attns), num_heads, n, shares_arr, compare)
                chunk = heads_per_chunk(n, num_heads, svd_dtype, memory_budget_bytes)
                for i, attn in enumerate(attns):
                    handles.append(attn.register_forward_hook(
                        _layer_hook(acc, i, svd_dtype, chunk, compare and _is_linformer(attn)),
                        with_kwargs=True))
            elif n != acc.n:
                raise SpectrumError(f"samples differ in length ({acc.n} then {n}); every sample "
                                    f"must hold n tokens")
            acc.start_sample()
            encoder(ids)
            if progress is not None:
                progress(acc.count, time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if acc is None:
        raise SpectrumError("no sequence was measured; the data source gave no sample")
    meta = dict(info or {})
    meta.update(seconds=round(time.perf_counter() - t0, 2), svd_dtype=str(svd_dtype).replace("torch.", ""))
    if compare:
        meta["linformer_comparison"] = (
            "relative Frobenius error and mean per-token cosine between each layer's Linformer "
            "attention output and the full softmax attention of the same Q, K, V and output weights")
    return acc.result(attention, [k if k is not None else acc.n for k in model_k], meta)
