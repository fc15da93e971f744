"""Documents longer than n: overlapping windows of n tokens, and the aggregation of their outputs.

A text of T tokens is cut into windows of ``size = max_length - 2`` content tokens (each laid out
``<s> ... </s>`` as one input), starting every ``stride`` tokens (default ``size // 2``: each
token is seen by two windows); the last window ends at the last token, so the tail is never
dropped and no window is shorter than it must be. A text that fits is one window, laid out exactly
as truncation lays it out, so short inputs give the same outputs either way.

The windows run as ordinary batch rows; ``doc`` maps each row to its document, and
``aggregate`` reduces the rows of each document to one value: the mean of window vectors (an
embedding, or classification logits) or their max (logits: "the strongest evidence anywhere").
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

LONG_INPUTS = ("truncate", "windows")
AGGREGATES = ("mean", "max")


def window_spans(length: int, size: int, stride: Optional[int] = None) -> list[tuple[int, int]]:
    """[start, end) spans of ``size`` tokens, ``stride`` apart, covering ``range(length)``."""
    if size < 1:
        raise ValueError(f"window size {size} must be positive")
    stride = stride or max(1, size // 2)
    if not 1 <= stride <= size:
        raise ValueError(f"window stride {stride} must lie in [1, {size}] (the window's length): a larger "
                         f"stride would skip tokens")
    if length <= size:
        return [(0, length)]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return [(s, s + size) for s in starts]


def layout_windows(tokens: Sequence[int], max_length: int, bos: int, eos: int,
                   stride: Optional[int] = None) -> list[np.ndarray]:
    """``<s> window </s>`` inputs of at most ``max_length`` tokens covering ``tokens``."""
    return [np.asarray([bos, *tokens[s:e], eos], dtype=np.int64)
            for s, e in window_spans(len(tokens), max_length - 2, stride)]


def aggregate(values: torch.Tensor, doc: torch.Tensor | np.ndarray, num_docs: int,
              how: str = "mean") -> torch.Tensor:
    """Reduce rows (W, ...) to documents (num_docs, ...): the mean or max of each document's rows.
    Every document must own at least one row."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate {how!r} is unknown; choose one of {', '.join(AGGREGATES)}")
    doc = torch.as_tensor(doc, dtype=torch.long, device=values.device)
    shape = (num_docs, *values.shape[1:])
    if how == "mean":
        total = torch.zeros(shape, dtype=values.dtype, device=values.device).index_add_(0, doc, values)
        count = torch.bincount(doc, minlength=num_docs).to(values.dtype)
        return total / count.clamp(min=1).view(-1, *([1] * (values.dim() - 1)))
    index = doc.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    out = torch.full(shape, float("-inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, index, values, "amax", include_self=True)
