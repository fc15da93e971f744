"""Loss histories of study runs (metrics.jsonl): final losses, and pairing runs with a baseline by seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from linformer_train.spectrum.result import SpectrumError



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
