"""Classification metrics from predictions and gold labels: accuracy, F1 and MCC.

F1 is the positive class's (label index 1) for two labels, as GLUE reports it for QQP and MRPC,
and the macro average over classes otherwise. MCC is Matthews' correlation (Gorodkin's
multi-class form, which reduces to the binary one), 0 when undefined.
"""

from __future__ import annotations

import math

import numpy as np


def confusion(preds: np.ndarray, golds: np.ndarray, num_labels: int) -> np.ndarray:
    """(num_labels, num_labels) counts, rows = gold, columns = predicted."""
    return np.bincount(golds * num_labels + preds, minlength=num_labels * num_labels).reshape(
        num_labels, num_labels).astype(np.float64)


def _f1(tp: float, fp: float, fn: float) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def classification_metrics(preds, golds, num_labels: int) -> dict[str, float]:
    preds = np.asarray(preds, dtype=np.int64)
    golds = np.asarray(golds, dtype=np.int64)
    c = confusion(preds, golds, num_labels)
    total = c.sum()
    tp = np.diag(c)
    fp = c.sum(0) - tp
    fn = c.sum(1) - tp
    if num_labels == 2:
        f1 = _f1(tp[1], fp[1], fn[1])
    else:
        f1 = float(np.mean([_f1(tp[i], fp[i], fn[i]) for i in range(num_labels)]))
    t = c.sum(1)  # true counts per class
    p = c.sum(0)  # predicted counts per class
    correct = tp.sum()
    num = correct * total - float(t @ p)
    den = math.sqrt(max(total ** 2 - float(p @ p), 0.0) * max(total ** 2 - float(t @ t), 0.0))
    mcc = num / den if den > 0 else 0.0
    return {"accuracy": float(correct / total) if total else 0.0, "f1": float(f1), "mcc": float(mcc)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
