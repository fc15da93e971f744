"""Attention spectra: how low-rank each layer's and head's softmax attention is, and the k it suggests.

The Linformer paper's case (its Figure 1) is that P = softmax(Q K^T / sqrt(Dh)) is approximately low
rank: a few singular values carry most of the spectrum. This module measures that on a user's model
and data and turns it into a per-layer ``model.k`` schedule.

How it measures. The encoder runs on one sequence of n real tokens at a time (eval mode, no grad). A
forward hook on every attention module takes the layer's input x, recomputes Q and K from the
module's own ``qkv`` projection (``FullSelfAttention`` uses SDPA and never materialises P, and the
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

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linformer_train.cli import UsageError

SHARE_GRID: tuple[float, ...] = tuple(round(0.5 + 0.01 * i, 2) for i in range(50)) + (0.995, 0.999)
"""Shares whose rank-needed is kept per sample, so recommendations at any of them need no re-run."""
MAX_CURVE_POINTS = 512
"""Above this many ranks, cumulative curves are kept at geometrically spaced ranks only."""


class SpectrumError(UsageError):
    """A user's input to the spectrum tool is wrong (path, share, length, data); one line."""


# --------------------------------------------------------------------------------------------------
# The maths on one matrix
# --------------------------------------------------------------------------------------------------


def normalised_cumulative(svals: torch.Tensor) -> torch.Tensor:
    """(..., m) singular values, descending -> (..., m) cumulative share c_r = sum_{i<=r} s_i / sum s."""
    svals = svals.clamp(min=0)
    cum = svals.cumsum(-1)
    return cum / cum[..., -1:].clamp(min=torch.finfo(cum.dtype).tiny)


def rank_needed(cumulative: torch.Tensor, shares: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Smallest r (1-based) with c_r >= share, for each share: (..., m) x (G,) -> (..., G) int64.

    A share is reached up to 1e-6 (fp32 cumulative sums of a rank-r matrix land at 1 - 1e-7)."""
    shares = torch.as_tensor(shares, dtype=cumulative.dtype, device=cumulative.device)
    target = (shares - 1e-6).expand(*cumulative.shape[:-1], shares.numel()).contiguous()
    idx = torch.searchsorted(cumulative.contiguous(), target)  # first index with c >= target
    return (idx + 1).clamp(max=cumulative.shape[-1])


def effective_rank(svals: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli's effective rank exp(H(s / sum s)): 1 for rank one, m for a flat spectrum."""
    p = svals.clamp(min=0)
    p = p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    entropy = -(p * torch.log(p.clamp(min=torch.finfo(p.dtype).tiny))).sum(-1)
    return entropy.exp()


def curve_ranks(m: int, max_points: int = MAX_CURVE_POINTS) -> np.ndarray:
    """Ranks (1-based) at which a cumulative curve of m values is kept: all, or geometric when long."""
    if m <= max_points:
        return np.arange(1, m + 1)
    return np.unique(np.geomspace(1, m, max_points).round().astype(np.int64))


def _split_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V of an attention module from its own fused projection: 3 x (B, H, L, Dh)."""
    B, L, _ = x.shape
    H, Dh = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).view(B, L, 3, H, Dh)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
    return q, k, v


def attention_probabilities(q: torch.Tensor, k: torch.Tensor,
                            key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """P = softmax(Q K^T / sqrt(Dh)) in fp32: (..., L, Dh) x (..., L, Dh) -> (..., L, L).

    ``key_mask`` (..., L), True = real token, drops padded keys as the model's SDPA call does."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[..., None, :].bool(), float("-inf"))
    return torch.softmax(scores, dim=-1)


# --------------------------------------------------------------------------------------------------
# Collecting over a model and a stream of sequences
# --------------------------------------------------------------------------------------------------


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


@dataclass
class SpectrumResult:
    """What survives a measurement: per (sample, layer, head) rank-needed and effective rank, mean
    and spread of the cumulative curves, and, for Linformer models, output closeness per layer."""

    seq_len: int
    num_layers: int
    num_heads: int
    attention: str                     # linformer | full | naive
    model_k: list[int]                 # the model's own per-layer k (n for full attention)
    shares: np.ndarray                 # (G,) the share grid
    ranks: np.ndarray                  # (S, layers, heads, G) int32: rank needed per share
    effective_ranks: np.ndarray        # (S, layers, heads) float32
    curve_ranks: np.ndarray            # (R,) 1-based ranks the curves are kept at
    cumulative_mean: np.ndarray        # (layers, heads, R) mean over samples
    cumulative_min: np.ndarray         # (layers, heads, R) min over samples
    cumulative_max: np.ndarray         # (layers, heads, R) max over samples
    linformer_rel_error: Optional[np.ndarray] = None  # (S, layers): ||y_lin - y_full|| / ||y_full||
    linformer_cosine: Optional[np.ndarray] = None     # (S, layers): mean per-token cosine
    info: dict = field(default_factory=dict)          # model / data description, timings

    @property
    def num_samples(self) -> int:
        return int(self.ranks.shape[0])

    def share_index(self, share: float) -> int:
        hits = np.flatnonzero(np.isclose(self.shares, share, atol=1e-9))
        if hits.size == 0:
            have = ", ".join(f"{s:g}" for s in self.shares)
            raise SpectrumError(f"share {share:g} was not measured; choose one of {have} or measure "
                                f"again with --share {share:g}")
        return int(hits[0])

    def ranks_at(self, share: float) -> np.ndarray:
        """(S, layers, heads) rank needed to reach ``share``."""
        return self.ranks[..., self.share_index(share)]

    def layer_mean_curve(self) -> np.ndarray:
        """(layers, R) the paper's per-layer curve: mean over heads and samples."""
        return self.cumulative_mean.mean(axis=1)

    def summary(self, share: float) -> list[dict]:
        """Per layer: rank-needed statistics at ``share`` over samples, per head and pooled."""
        r = self.ranks_at(share).astype(np.float64)            # (S, layers, heads)
        out = []
        for layer in range(self.num_layers):
            rl = r[:, layer, :]                                  # (S, heads)
            entry = {
                "layer": layer,
                "model_k": self.model_k[layer],
                "rank_needed_median_per_head": np.median(rl, axis=0).tolist(),
                "rank_needed_p90_per_head": np.quantile(rl, 0.9, axis=0).tolist(),
                "rank_needed_min": float(rl.min()),
                "rank_needed_median": float(np.median(rl)),
                "rank_needed_p90": float(np.quantile(rl, 0.9)),
                "rank_needed_max": float(rl.max()),
                "effective_rank_mean": float(self.effective_ranks[:, layer].mean()),
            }
            if self.linformer_rel_error is not None:
                entry["linformer_rel_error_mean"] = float(self.linformer_rel_error[:, layer].mean())
                entry["linformer_cosine_mean"] = float(self.linformer_cosine[:, layer].mean())
            out.append(entry)
        return out

    # -- persistence: a readable JSON summary plus an .npz with every array -----------------------

    def save(self, out_dir: str | Path, share: float) -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        npz = out_dir / "spectrum.npz"
        np.savez_compressed(npz, **arrays)
        meta = {
            "seq_len": self.seq_len, "num_layers": self.num_layers, "num_heads": self.num_heads,
            "attention": self.attention, "model_k": self.model_k, "num_samples": self.num_samples,
            "info": self.info, "share": share,
            "layers": self.summary(share),
            "layer_mean_curve": {"ranks": self.curve_ranks.tolist(),
                                 "cumulative": np.round(self.layer_mean_curve(), 5).tolist()},
        }
        js = out_dir / "spectrum.json"
        js.write_text(json.dumps(meta, indent=1))
        return js, npz

    @classmethod
    def load(cls, directory: str | Path) -> "SpectrumResult":
        directory = Path(directory)
        js, npz = directory / "spectrum.json", directory / "spectrum.npz"
        if not js.is_file() or not npz.is_file():
            raise SpectrumError(f"{directory} holds no spectrum.json + spectrum.npz; run "
                                f"`tools/spectrum.py measure ... --out {directory}` first")
        meta = json.loads(js.read_text())
        with np.load(npz) as data:
            arrays = {k: data[k] for k in data.files}
        return cls(seq_len=meta["seq_len"], num_layers=meta["num_layers"],
                   num_heads=meta["num_heads"], attention=meta["attention"],
                   model_k=list(meta["model_k"]), info=meta.get("info", {}), **arrays)


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
        q, k, v = _split_heads(module, x)                       # (1, H, n, Dh)
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


# --------------------------------------------------------------------------------------------------
# From ranks to a k schedule
# --------------------------------------------------------------------------------------------------


@dataclass
class KSchedule:
    """A recommended per-layer k and how it was derived."""

    k: list[int]
    raw: list[float]          # per layer: max over heads of the quantile over samples (unrounded)
    share: float
    quantile: float
    multiple_of: int
    monotone: bool
    seq_len: int
    total: Optional[int] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(value / multiple - 1e-9)) * multiple)


def _allocate_total(raw: Sequence[float], total: int, multiple: int, cap: int) -> list[int]:
    """Multiples of ``multiple`` in [multiple, cap] proportional to ``raw`` summing to ``total``
    (water-filling for the caps, largest remainder for the rounding; ties go to the lower layer,
    so a non-increasing ``raw`` stays non-increasing)."""
    L = len(raw)
    units, hi = total // multiple, cap // multiple
    if total % multiple:
        raise SpectrumError(f"--total {total} is not a multiple of --multiple-of {multiple}")
    if not L <= units <= L * hi:
        raise SpectrumError(f"--total {total} cannot be split over {L} layers in multiples of "
                            f"{multiple} between {multiple} and {cap}: use {L * multiple}..{L * hi * multiple}")
    w = np.maximum(np.asarray(raw, dtype=np.float64), 1e-9)

    def fill(c: float) -> np.ndarray:
        return np.clip(c * w, 1.0, hi)

    lo_c, hi_c = 0.0, hi / w.min() + 1.0
    for _ in range(200):                                         # sum(fill(c)) rises with c
        mid = 0.5 * (lo_c + hi_c)
        if fill(mid).sum() < units:
            lo_c = mid
        else:
            hi_c = mid
    share = fill(hi_c)
    base = np.clip(np.floor(share + 1e-9), 1, hi).astype(np.int64)
    left = units - int(base.sum())
    order = sorted(range(L), key=lambda i: (-(share[i] - base[i]), i))
    for i in order:
        if left <= 0:
            break
        if base[i] < hi:
            base[i] += 1
            left -= 1
    while left < 0:                                              # floors of clipped values overshot
        i = max((j for j in range(L) if base[j] > 1), key=lambda j: (base[j] - share[j], j))
        base[i] -= 1
        left += 1
    return [int(u) * multiple for u in base]


def recommend_k(result: SpectrumResult, share: float = 0.9, quantile: float = 0.9,
                multiple_of: int = 16, monotone: bool = True, total: Optional[int] = None
                ) -> KSchedule:
    """The per-layer k covering every head on ``quantile`` of the samples at ``share`` of the
    spectrum, rounded up to ``multiple_of`` and capped at n; non-increasing with depth if
    ``monotone``; rescaled to sum to ``total`` if given (same parameters and FLOPs as a uniform
    k = total / layers for linear projections)."""
    if not 0.0 < quantile <= 1.0:
        raise SpectrumError(f"quantile {quantile:g} must lie in (0, 1]")
    if multiple_of < 1:
        raise SpectrumError(f"multiple_of {multiple_of} must be a positive int")
    n = result.seq_len
    cap = n // multiple_of * multiple_of
    if cap < multiple_of:
        raise SpectrumError(f"multiple_of {multiple_of} exceeds n={n}; choose a smaller multiple")
    r = result.ranks_at(share).astype(np.float64)                      # (S, layers, heads)
    raw = np.quantile(r, quantile, axis=0, method="higher").max(axis=-1)  # (layers,)
    shape = raw.copy()
    if monotone:
        shape = np.maximum.accumulate(shape[::-1])[::-1]                # k_l >= k_{l+1}
    if total is None:
        k = [min(cap, _round_up(v, multiple_of)) for v in shape]
    else:
        k = _allocate_total(shape, total, multiple_of, cap)
    return KSchedule(k=k, raw=[float(v) for v in raw], share=share, quantile=quantile,
                     multiple_of=multiple_of, monotone=monotone, seq_len=n, total=total)


def schedule_yaml(schedule: KSchedule, num_layers: int) -> str:
    """A YAML snippet for the config loader: ``model.k`` with the fields it is validated against.
    Loads on its own or layered over the model's config (``--config model.yaml --config this``)."""
    ks = ", ".join(str(v) for v in schedule.k)
    how = (f"max over heads of the p{schedule.quantile * 100:g} over samples of the rank reaching "
           f"{schedule.share:g} of the attention spectrum, multiples of {schedule.multiple_of}"
           + (", non-increasing" if schedule.monotone else "")
           + (f", rescaled to a total of {schedule.total}" if schedule.total else ""))
    return (f"# k schedule from tools/spectrum.py: {how}\n"
            f"model:\n"
            f"  attention: linformer\n"
            f"  num_layers: {num_layers}\n"
            f"  max_seq_len: {schedule.seq_len}\n"
            f"  k: [{ks}]\n")


def check_schedule_yaml(text: str, base_model: Optional[dict] = None):
    """Prove the snippet is a valid config: ``load_config`` it alone and, when the model's own
    model section is known, layered over it (the way a user will). Returns the layered Config."""
    import yaml

    from linformer_train.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        snippet = Path(tmp) / "k_schedule.yaml"
        snippet.write_text(text)
        cfg = load_config([snippet])
        if base_model is not None:
            base = Path(tmp) / "model.yaml"
            base.write_text(yaml.safe_dump({"model": base_model}, sort_keys=False))
            cfg = load_config([base, snippet])
    return cfg


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _save_png(fig, path: str | Path) -> None:
    """Save a figure as a small PNG: rendered, then quantised to a 256-colour palette (plots use a
    few colours; the palette PNG is several times smaller than matplotlib's RGBA one)."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(256).save(path, optimize=True)


def plot_cumulative(result: SpectrumResult, path: str | Path, share: Optional[float] = None,
                    title: Optional[str] = None) -> Path:
    """The paper's Figure 1 (left): normalised cumulative singular value against rank, one curve
    per layer (mean over heads and samples), shaded between the lowest and highest head mean.
    Left panel on a linear rank axis as in the paper, right panel on a log axis (the knee sits at
    small ranks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = result.curve_ranks
    mean = result.layer_mean_curve()                      # (layers, R)
    lo = result.cumulative_mean.min(axis=1)               # (layers, R) lowest head
    hi = result.cumulative_mean.max(axis=1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9), dpi=110)
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, result.num_layers))
    for ax, log in zip(axes, (False, True)):
        for layer in range(result.num_layers):
            ax.plot(x, mean[layer], color=colors[layer], lw=1.6, label=f"layer {layer}")
            ax.fill_between(x, lo[layer], hi[layer], color=colors[layer], alpha=0.15, lw=0)
        if share is not None:
            ax.axhline(share, color="grey", ls=":", lw=1)
        if log:
            ax.set_xscale("log")
        ax.set_xlim(1, result.seq_len)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("rank r (singular values, largest first)" + (", log axis" if log else ""))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalised cumulative singular value")
    axes[1].legend(fontsize=8, loc="lower right", ncol=1 + result.num_layers // 8)
    fig.suptitle(title or f"Attention spectrum per layer: n={result.seq_len}, "
                          f"{result.num_samples} samples, {result.attention} attention"
                          + (f", dotted line at {share:g}" if share is not None else ""), fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)
    return Path(path)


def plot_rank_heatmap(result: SpectrumResult, path: str | Path, share: float,
                      title: Optional[str] = None) -> Path:
    """Layers x heads: median (over samples) rank needed to reach ``share``, values written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = np.median(result.ranks_at(share), axis=0)        # (layers, heads)
    L, H = med.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * max(H, 4), 1.4 + 0.45 * max(L, 3)), dpi=110)
    im = ax.imshow(med, cmap="magma_r", aspect="auto", vmin=0)
    if L * H <= 400:
        for i in range(L):
            for j in range(H):
                ax.text(j, i, f"{med[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if med[i, j] > 0.6 * med.max() else "black")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or f"rank for {share:g} of the spectrum (median, n={result.seq_len})",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    _save_png(fig, path)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Loss curves of study runs (metrics.jsonl)
# --------------------------------------------------------------------------------------------------


def read_metrics(run_dir: str | Path) -> dict[str, list[dict]]:
    """A run's metrics.jsonl grouped by split (train, eval, ...), each list ordered by step; a
    resumed run's repeated steps keep their last record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SpectrumError(f"{path} does not exist; pass a run directory written by launch/pretrain.py")
    by_split: dict[str, dict[int, dict]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise SpectrumError(f"{path}:{lineno} is not JSON") from None
        by_split.setdefault(rec.get("split", "train"), {})[int(rec["step"])] = rec
    return {s: [recs[k] for k in sorted(recs)] for s, recs in by_split.items()}


def pair_with_baseline(runs: Sequence[tuple[str, str | Path]], baseline: str
                       ) -> dict[str, list[tuple[Path, Path]]]:
    """Pair each setting's runs with the baseline's, in the order given (the i-th run of every
    label is the same seed): label -> [(run, baseline run), ...]. Same-seed runs see the same
    batches, masks and validation masks, so their difference is the paired, lower-noise one."""
    by_label: dict[str, list[Path]] = {}
    for label, run in runs:
        by_label.setdefault(label, []).append(Path(run))
    if baseline not in by_label:
        raise SpectrumError(f"--baseline {baseline!r} names no run; labels are {', '.join(by_label)}")
    base = by_label[baseline]
    out = {}
    for label, dirs in by_label.items():
        if label == baseline:
            continue
        if len(dirs) > len(base):
            raise SpectrumError(f"{label!r} has {len(dirs)} runs but the baseline {baseline!r} only "
                                f"{len(base)}; give the baseline one run per seed, in the same order")
        out[label] = list(zip(dirs, base))
    return out


def _final(metrics: dict, split: str, key: str, last: int) -> float:
    recs = [r[key] for r in metrics.get(split, []) if r.get(key) is not None]
    recs = recs[-last:] if split == "train" else recs[-1:]
    return sum(recs) / len(recs) if recs else float("nan")


def final_losses(run_dir: str | Path, key: str = "loss", last: int = 10) -> tuple[float, float]:
    """(mean train ``key`` over the last ``last`` logs, last validation ``key``) of a run."""
    m = read_metrics(run_dir)
    return _final(m, "train", key, last), _final(m, "eval", key, 1)


def plot_loss_curves(runs: Sequence[tuple[str, str | Path]], path: str | Path,
                     key: str = "loss", title: Optional[str] = None, from_step: int = 0,
                     baseline: Optional[str] = None) -> Path:
    """Train (left) and validation (middle) ``key`` against step, one line per (label, run_dir);
    runs sharing a label (seeds of one setting) share a colour. ``from_step`` hides the first steps,
    whose large losses would flatten the differences that matter. With ``baseline`` (a label), a
    third panel shows each setting's validation ``key`` minus the baseline's of the same seed
    (thin: each seed, thick: their mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if baseline else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), dpi=110)
    colors: dict[str, str] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for label, run_dir in runs:
        metrics = read_metrics(run_dir)
        first = label not in colors
        color = colors.setdefault(label, cycle[len(colors) % len(cycle)])
        for ax, split in zip(axes, ("train", "eval")):
            recs = [r for r in metrics.get(split, []) if r.get(key) is not None and r["step"] >= from_step]
            if recs:
                ax.plot([r["step"] for r in recs], [r[key] for r in recs], color=color,
                        label=label if first else None, marker="o" if split == "eval" else None,
                        ms=3, lw=1.2 if split == "eval" else 0.9, alpha=0.9)
    names = ["train", "validation"]
    if baseline:
        ax = axes[2]
        for label, pairs in pair_with_baseline(runs, baseline).items():
            curves = []
            for run, base in pairs:
                mine = {r["step"]: r[key] for r in read_metrics(run).get("eval", []) if r.get(key) is not None}
                ref = {r["step"]: r[key] for r in read_metrics(base).get("eval", []) if r.get(key) is not None}
                steps = sorted(s for s in mine.keys() & ref.keys() if s >= from_step)
                curves.append((steps, [mine[s] - ref[s] for s in steps]))
                ax.plot(steps, curves[-1][1], color=colors[label], lw=0.7, alpha=0.45)
            common = sorted(set.intersection(*(set(st) for st, _ in curves))) if curves else []
            if common:
                mean = [np.mean([dict(zip(st, d))[s] for st, d in curves]) for s in common]
                ax.plot(common, mean, color=colors[label], lw=2, marker="o", ms=3,
                        label=f"{label} (mean of {len(curves)})")
        ax.axhline(0, color=colors.get(baseline, "grey"), lw=1.2, ls="--", label=baseline)
        names.append(f"validation, minus {baseline} of the same seed:")
    for ax, split in zip(axes, names):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{split} {key}" if not split.endswith(":") else f"delta validation {key}")
        if split.endswith(":"):
            ax.set_title(split.rstrip(":"), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Samples: n-token sequences from prepared blocks or from text
# --------------------------------------------------------------------------------------------------


def evenly_spaced(count: int, available: int) -> np.ndarray:
    """``count`` indices spread evenly over range(available) (all of them if fewer)."""
    if available <= 0:
        return np.zeros(0, dtype=np.int64)
    if count >= available:
        return np.arange(available)
    return np.unique(np.linspace(0, available - 1, count).round().astype(np.int64))


def packed_blocks(token_lists: Iterable[Sequence[int]], seq_len: int, bos: int, eos: int
                  ) -> Iterator[np.ndarray]:
    """Documents packed as the data pipeline packs them (``data/prepare.py``): a stream
    ``doc </s> doc </s> ...`` cut into rows of n - 1 tokens, each block ``<s>`` + one row. The tail
    that fills no block is dropped; empty documents are skipped."""
    row = seq_len - 1
    buf: list[int] = []
    for ids in token_lists:
        if len(ids) == 0:
            continue
        buf.extend(int(i) for i in ids)
        buf.append(eos)
        while len(buf) >= row:
            yield np.asarray([bos, *buf[:row]], dtype=np.int64)
            del buf[:row]


def reservoir(blocks: Iterable[np.ndarray], count: int, seed: int) -> list[np.ndarray]:
    """A uniform sample of ``count`` blocks from a stream (Algorithm R), kept in stream order."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, np.ndarray]] = []
    for i, block in enumerate(blocks):
        if len(kept) < count:
            kept.append((i, block))
        else:
            j = int(rng.integers(0, i + 1))
            if j < count:
                kept[j] = (i, block)
    return [b for _, b in sorted(kept, key=lambda t: t[0])]


# --------------------------------------------------------------------------------------------------
# Opening a model and a data source (the CLI's inputs)
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: nn.Module
    model_cfg: "object"                # linformer_train.config.ModelConfig
    tokenizer_path: Optional[Path]
    description: str


def _is_deepspeed_checkpoint(path: Path) -> bool:
    """A run directory (checkpoints/), a checkpoints directory (latest, step_*) or one step_* tag."""
    return ((path / "checkpoints").is_dir() or (path / "latest").is_file()
            or any(path.glob("step_*")) or any(path.glob("*model_states.pt")))


def load_model(path: str | Path) -> LoadedModel:
    """A model directory (``save_pretrained``: model.safetensors + config.yaml + tokenizer, also a
    RoBERTa warm start) or a run's DeepSpeed checkpoint (a run directory, its checkpoints/ or one
    step directory; read in memory through the conversion library), in eval mode on CPU."""
    from linformer_train.convert import ConversionError

    path = Path(path).expanduser()
    if not path.exists():
        raise SpectrumError(f"model {path} does not exist; pass a model directory (tools/convert.py) "
                            f"or a run's checkpoint directory")
    if not path.is_dir():
        raise SpectrumError(f"model {path} is not a directory; pass a model directory or a run's "
                            f"checkpoint directory")
    try:
        if (path / "model.safetensors").is_file():
            from linformer_train.convert import model_dir

            model = model_dir.from_pretrained(path)
            tok = path / model_dir.TOKENIZER_FILE
            return LoadedModel(model.eval(), model.cfg, tok if tok.is_file() else None,
                               f"model directory {path}")
        if _is_deepspeed_checkpoint(path):
            return _load_deepspeed(path)
    except ConversionError as exc:
        raise SpectrumError(str(exc)) from None
    raise SpectrumError(f"{path} is neither a model directory (no model.safetensors) nor a DeepSpeed "
                        f"checkpoint (no checkpoints/, latest or step_*); convert it with tools/convert.py")


def _load_deepspeed(path: Path) -> LoadedModel:
    """The fp32 weights of a DeepSpeed checkpoint (any ZeRO stage) in a model, without writing a
    model directory; the tokenizer is the run's (its prepared data or data.tokenizer)."""
    from linformer_train.config import config_from_dict
    from linformer_train.convert import ConversionError, export, model_dir

    state, client, step_dir = export.read_checkpoint(path)
    if not isinstance(client.get("config"), dict):
        raise SpectrumError(f"{step_dir} carries no linformer-train config; it was not saved by this "
                            f"project's trainer")
    cfg = config_from_dict(client["config"])
    model = model_dir.build_model(cfg.model, client.get("architecture", "mlm"))
    model_dir.check_state_dict(model_dir.expected_shapes(model), state, f"checkpoint {step_dir}",
                               "export it with the code that wrote it")
    model.load_state_dict(state, strict=True)
    try:
        tok: Optional[Path] = export.find_tokenizer(cfg, step_dir)
    except ConversionError:  # text data then needs --tokenizer; prepared data names its own
        tok = None
    return LoadedModel(model.eval(), cfg.model, tok,
                       f"DeepSpeed checkpoint {step_dir} (step {client.get('step')})")


def load_samples(sources: Sequence[str], seq_len: int, count: int, tokenizer_path: Optional[Path],
                 split: str = "validation", seed: int = 0, max_tokens: int = 5_000_000
                 ) -> tuple[list[np.ndarray], str, Optional[Path]]:
    """``count`` sequences of exactly ``seq_len`` tokens and a description of where they came from.

    ``sources``: one prepared directory (its ``split``, blocks spread evenly; cut to the first n
    tokens when prepared for a longer n), ``builtin`` (the built-in sample corpus), or text files,
    globs and directories (text, JSONL, Parquet). Text is tokenized with ``tokenizer_path`` (the
    model's) and packed like the data pipeline packs it; blocks are drawn uniformly (reservoir) from
    the first ``max_tokens`` tokens. Returns (samples, description, tokenizer used)."""
    from linformer_train.data import DataError

    if count < 1:
        raise SpectrumError(f"--samples {count} must be at least 1")
    try:
        if len(sources) == 1 and Path(sources[0]).is_dir() and _is_prepared(Path(sources[0])):
            return _prepared_samples(Path(sources[0]), seq_len, count, split, tokenizer_path)
        return _text_samples(sources, seq_len, count, tokenizer_path, seed, max_tokens)
    except DataError as exc:
        raise SpectrumError(str(exc)) from None


def _is_prepared(path: Path) -> bool:
    from linformer_train.data.prepare import MANIFEST_FILE

    return (path / MANIFEST_FILE).is_file()


def _prepared_samples(root: Path, seq_len: int, count: int, split: str,
                      tokenizer_path: Optional[Path]):
    from linformer_train.data.prepare import MANIFEST_FILE, open_prepared
    from linformer_train.data.tokenizer import load_tokenizer

    manifest = json.loads((root / MANIFEST_FILE).read_text())
    block_len = int(manifest["seq_len"])
    if seq_len > block_len:
        raise SpectrumError(f"{root} holds blocks of n={block_len} but -n {seq_len} was asked; "
                            f"measure at n <= {block_len} or prepare the data for n={seq_len}")
    prepared = open_prepared(root, block_len)
    if tokenizer_path is not None:
        want = load_tokenizer(tokenizer_path).sha256
        have = manifest["tokenizer"]["sha256"]
        if want != have:
            raise SpectrumError(f"{root} was tokenized with tokenizer {have[:12]} but the model's is "
                                f"{want[:12]} ({tokenizer_path}); prepare the data with the model's "
                                f"tokenizer")
    if split not in ("train", "validation"):
        raise SpectrumError(f"--split {split!r} must be train or validation")
    blocks = prepared.train if split == "train" else prepared.validation
    idx = evenly_spaced(count, len(blocks))
    samples = [np.asarray(blocks[int(i)][:seq_len], dtype=np.int64) for i in idx]
    desc = f"prepared {root} ({split}: {len(samples)} of {len(blocks)} blocks, evenly spaced)"
    return samples, desc, prepared.tokenizer_path


def _text_samples(sources: Sequence[str], seq_len: int, count: int, tokenizer_path: Optional[Path],
                  seed: int, max_tokens: int):
    from linformer_train.config import DataConfig
    from linformer_train.data.corpus import build_source
    from linformer_train.data.tokenizer import load_tokenizer

    if tokenizer_path is None:
        raise SpectrumError("text data needs a tokenizer and the model has none; pass --tokenizer "
                            "(a tokenizer.model or its directory)")
    tok = load_tokenizer(tokenizer_path)
    if list(sources) == ["builtin"]:
        cfg = DataConfig(source="builtin")
    else:
        cfg = DataConfig(source="files", paths=list(sources))
    source = build_source(cfg)

    def token_lists():  # documents tokenized 64 at a time, until max_tokens have been read
        seen, batch = 0, []
        for doc in source.documents():
            batch.append(doc)
            if len(batch) == 64:
                for ids in tok.encode(batch):
                    seen += len(ids) + 1
                    yield ids
                batch = []
                if seen >= max_tokens:
                    return
        yield from tok.encode(batch) if batch else ()

    samples = reservoir(packed_blocks(token_lists(), seq_len, tok.special_ids["bos"], tok.special_ids["eos"]),
                        count, seed)
    if not samples:
        raise SpectrumError(f"{source.description} holds fewer than {seq_len} tokens; give more text "
                            f"or a smaller -n")
    desc = f"{source.description}: {len(samples)} blocks of n={seq_len}, uniform over the first " \
           f"{max_tokens:,} tokens (seed {seed})"
    return samples, desc, tok.path
