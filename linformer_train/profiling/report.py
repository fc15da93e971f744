"""Writing a profile: JSON, CSV and one plot per (mode, target, dtype, batch). The console tables
are the command line's (tools/profile.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

CSV_FIELDS = ("label", "impl", "attention", "k", "projection", "sharing", "target", "mode", "dtype",
              "device", "n", "batch", "layers", "hidden", "heads", "ffn", "status", "reason",
              "clock", "threads", "time_ms", "wall_ms", "cpu_ms", "time_min_ms", "tokens_per_s", "flops", "tflops", "mfu", "mem_step_mib",
              "mem_peak_mib", "mem_baseline_mib", "mem_method", "speedup_vs_naive",
              "mem_saved_vs_naive", "speedup_vs_sdpa", "mem_saved_vs_sdpa", "flop_ratio_vs_sdpa",
              "flop_efficiency_vs_sdpa", "params", "cpu_share", "loadavg_1m", "cpu_busy_before")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def plot_rows(rows: Sequence[dict], out_dir: Path, title: str = "") -> list[Path]:
    """One PNG per (mode, target, dtype): time and step memory against n, log-log, one line per
    label. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault((r["mode"], r["target"], r["dtype"], r["batch"]), []).append(r)
    for (mode, target, dtype, batch), rs in sorted(groups.items()):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=90)
        for label in sorted({r["label"] for r in rs}):
            pts = sorted((r["n"], r["time_ms"], r["mem_step_mib"]) for r in rs if r["label"] == label)
            style = "--" if label in ("naive", "full (sdpa)") else "-"
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=label)
        clock = rs[0].get("clock", "wall")
        tlabel = "time per step (ms)" if clock == "wall" else f"{clock} time per step (ms, 1 core)" \
            if rs[0].get("threads") == 1 else f"{clock} time per step (ms)"
        for ax, ylabel in zip(axes, (tlabel, "step memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("n (sequence length)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{title} {target} {mode}, {dtype}, batch {batch}".strip(), fontsize=10)
        fig.tight_layout()
        path = out_dir / f"profile_{target}_{mode}_{dtype}_b{batch}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
