"""Plots: the paper's Figure 1 (cumulative spectrum per layer), a rank heat map, loss curves of runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from linformer_train.spectrum.result import SpectrumResult
from linformer_train.spectrum.runs import pair_with_baseline, read_metrics



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
