"""Attention spectra: how low-rank each layer's and head's softmax attention is, and the k it suggests.

The Linformer paper's case (its Figure 1) is that P = softmax(Q K^T / sqrt(Dh)) is approximately low
rank: a few singular values carry most of the spectrum. This module measures that on a user's model
and data and turns it into a per-layer ``model.k`` schedule. The code behind ``tools/spectrum.py``,
one concern a module: :mod:`.maths` (one matrix), :mod:`.measuring` (hooks over a model),
:mod:`.result` (what is kept, saved and loaded), :mod:`.schedule` (ranks to k), :mod:`.inputs`
(the model and the samples), :mod:`.plots` and :mod:`.runs` (loss curves of study runs).

How it measures. The encoder runs on one sequence of n real tokens at a time (eval mode, no grad). A
forward hook on every attention module takes the layer's input x, recomputes Q and K with the
module's own ``split_heads`` (``FullSelfAttention`` uses SDPA and never materialises P, and the
model's hot path is left untouched), forms P for a few heads at a time in fp32, and reduces it at once
to its singular values (``torch.linalg.svdvals``, fp32 or fp64). Only small summaries survive a
sample: the normalised cumulative spectrum c_r = (s_1 + ... + s_r) / sum(s) at a fixed set of ranks,
the rank needed to reach each share of a grid, and the effective rank. Peak memory is one layer's
activations plus ``head_chunk`` (n, n) matrices, so n of a few thousand fits a laptop.

Spectra of a Linformer model are those of the full softmax its own Q and K would give (projections
removed); for such a model the hook also compares the layer's real (projected) output with the
full-attention output of the same weights.

Recommendation. For a target share (0.9 by default) layer l gets
k_l = max over heads of the ``quantile`` (0.9) over samples of the rank needed, i.e. the k that
covers every head on 90% of the sequences; then rounded up to ``multiple_of``, capped at n, made
non-increasing with depth (optional: each layer takes the max of itself and the layers above), or
rescaled to a fixed total sum of k (equal parameters and FLOPs to a uniform k).
"""

from linformer_train.spectrum.inputs import (
    LoadedModel,
    evenly_spaced,
    load_model,
    load_samples,
    packed_blocks,
    reservoir,
)
from linformer_train.spectrum.maths import (
    MAX_CURVE_POINTS,
    SHARE_GRID,
    attention_probabilities,
    curve_ranks,
    effective_rank,
    normalised_cumulative,
    rank_needed,
)
from linformer_train.spectrum.measuring import attention_modules, heads_per_chunk, measure_spectrum
from linformer_train.spectrum.plots import plot_cumulative, plot_loss_curves, plot_rank_heatmap
from linformer_train.spectrum.result import SpectrumError, SpectrumResult
from linformer_train.spectrum.runs import final_losses, pair_with_baseline, read_metrics
from linformer_train.spectrum.schedule import KSchedule, check_schedule_yaml, recommend_k, schedule_yaml

__all__ = [
    "KSchedule", "LoadedModel", "MAX_CURVE_POINTS", "SHARE_GRID", "SpectrumError", "SpectrumResult",
    "attention_modules", "attention_probabilities", "check_schedule_yaml", "curve_ranks",
    "effective_rank", "evenly_spaced", "final_losses", "heads_per_chunk", "load_model", "load_samples",
    "measure_spectrum", "normalised_cumulative", "packed_blocks", "pair_with_baseline",
    "plot_cumulative", "plot_loss_curves", "plot_rank_heatmap", "rank_needed", "read_metrics",
    "recommend_k", "reservoir", "schedule_yaml",
]
