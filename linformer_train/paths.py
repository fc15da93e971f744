"""Paths checked where they enter: an output never equals, contains or sits inside an input.

Every tool that writes calls ``check_output_apart(output, inputs)`` before any work, with each path
resolved (symlinks followed, ``..`` removed), so ``convert export RUN RUN --overwrite`` or
``predict --output`` equal to ``--input`` is refused instead of replacing what it reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional


class PathOverlapError(ValueError):
    """An output path would overwrite (or live inside) an input."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def overlap(output: str | os.PathLike, source: str | os.PathLike) -> Optional[str]:
    """How ``output`` overlaps ``source`` ('is', 'contains', 'is inside'), or None."""
    out, src = _resolved(output), _resolved(source)
    if out == src:
        return "is"
    if out in src.parents:
        return "contains"
    if src in out.parents:
        return "is inside"
    return None


def check_output_apart(output: str | os.PathLike, inputs: Mapping[str, Optional[str | os.PathLike]],
                       output_name: str = "the output") -> None:
    """Raise PathOverlapError when ``output`` overlaps any input (``{description: path}``; None
    entries are skipped)."""
    for name, source in inputs.items():
        if source is None or str(source) == "":
            continue
        how = overlap(output, source)
        if how is not None:
            raise PathOverlapError(
                f"{output_name} {output} {how} {name} {source}; writing it would replace what is being "
                f"read: choose an output path outside it")
