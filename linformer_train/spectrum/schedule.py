"""From ranks to a per-layer k schedule, and the YAML snippet the config loader accepts."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from linformer_train.spectrum.result import SpectrumError, SpectrumResult



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
