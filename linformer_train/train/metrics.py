"""One small metrics logger: console line + TensorBoard on rank 0; throughput, MFU and peak memory.

MFU is defined once, in :mod:`linformer_train.train.mfu`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from linformer_train.train.run_dir import write_failure


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """``should_log(step)`` and ``log(metrics, step)``; only rank 0 writes anything."""

    def __init__(self, run_dir: str | Path, log_every: int, tensorboard: bool, enabled: bool,
                 max_steps: int, purge_step: Optional[int] = None):
        self.log_every = log_every
        self.enabled = enabled
        self.max_steps = max_steps
        self.writer = None
        self.jsonl = None
        self.failed = False
        self.path = Path(run_dir) / "metrics.jsonl"
        if enabled:
            try:
                Path(run_dir).mkdir(parents=True, exist_ok=True)
                self.jsonl = open(self.path, "a")  # machine-readable history
            except OSError as exc:
                raise write_failure(self.path, exc) from None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, TensorBoard hides the events of the steps that are trained again
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.max_steps

    def log(self, metrics: dict[str, float], step: int, prefix: str = "train") -> None:
        if not self.enabled:
            return
        where = self.path
        try:
            if self.writer is not None:
                where = self.writer.log_dir
                for key, value in metrics.items():
                    if value is not None and math.isfinite(value):
                        self.writer.add_scalar(f"{prefix}/{key}", value, step)
                self.writer.flush()
            where = self.path
            # one write of a whole line (a full disk cuts at most the last line, which resume repairs)
            self.jsonl.write(json.dumps({"split": prefix, "step": step, **metrics}) + "\n")
            self.jsonl.flush()
        except OSError as exc:
            self.failed = True
            raise write_failure(where, exc) from None
        print(self._line(metrics, step, prefix), file=sys.stdout, flush=True)

    def text(self, tag: str, value: str) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, value)

    def _line(self, m: dict, step: int, prefix: str) -> str:
        if prefix != "train":
            body = " | ".join(f"{k} {v:.4g}" for k, v in m.items())
            return f"{prefix:>5} step {step:>7} | {body}"
        parts = [f"step {step:>7}/{self.max_steps}", f"loss {m['loss']:.4f}", f"acc {m['accuracy']:.3f}",
                 f"lr {m['lr']:.2e}", f"{m['tokens_per_s'] / 1e3:.1f}k tok/s"]
        if m.get("mfu") is not None:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        if m.get("skipped_steps"):
            parts.append(f"skipped {int(m['skipped_steps'])}")
        parts.append(f"eta {_fmt_duration(m.get('eta_s', float('nan')))}")
        return " | ".join(parts)

    def close(self) -> None:
        """Close the files; after a failed write, quietly (the failure was already reported)."""
        for f in (self.jsonl, self.writer):
            if f is None:
                continue
            try:
                f.close()
            except OSError as exc:
                if not self.failed:
                    self.failed = True
                    raise write_failure(self.path, exc) from None
        self.jsonl = self.writer = None
