"""What survives a measurement (:class:`SpectrumResult`), its persistence, and the tool's error."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from linformer_train.cli import UsageError



class SpectrumError(UsageError):
    """A user's input to the spectrum tool is wrong (path, share, length, data); one line."""



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
