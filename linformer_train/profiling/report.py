"""Writing a profile: JSON, CSV, one plot per (mode, target, dtype, batch) and the console tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from linformer_train.profiling.cases import GIB

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


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


# (header, cell); listed in the order they are left out when the terminal is too narrow: the
# columns from _TABLE_KEEP always stay
_TABLE_COLUMNS: dict[str, Callable[[dict], str]] = {
    "label": lambda r: r["label"],
    "mode": lambda r: r["mode"],
    "n": lambda r: str(r["n"]),
    "batch": lambda r: str(r["batch"]),
    "time ms": lambda r: _fmt(r.get("time_ms")),
    "tok/s": lambda r: _fmt(r.get("tokens_per_s"), ".0f"),
    "TFLOP/s": lambda r: _fmt(r.get("tflops"), ".3f"),
    "MFU": lambda r: _pct(r.get("mfu")),
    "step MiB": lambda r: _fmt(r.get("mem_step_mib"), ".0f"),
    "peak MiB": lambda r: _fmt(r.get("mem_peak_mib"), ".0f"),
    "xnaive spd": lambda r: _fmt(r.get("speedup_vs_naive"), ".2f"),
    "xnaive mem": lambda r: _fmt(r.get("mem_saved_vs_naive"), ".1f"),
    "xsdpa spd": lambda r: _fmt(r.get("speedup_vs_sdpa"), ".2f"),
    "xsdpa mem": lambda r: _fmt(r.get("mem_saved_vs_sdpa"), ".1f"),
    "FLOP eff": lambda r: _pct(r.get("flop_efficiency_vs_sdpa")),
    "status": lambda r: r.get("status") or "-",
}
_TABLE_KEEP = ("label", "n", "time ms", "status")
_TABLE_DROP_ORDER = ("FLOP eff", "TFLOP/s", "xnaive mem", "xsdpa mem", "peak MiB", "tok/s", "MFU",
                     "batch", "mode", "xnaive spd", "xsdpa spd", "step MiB")


def print_table(rows: Sequence[dict], title: str = "", console=None) -> None:
    """The sweep's table, fitted to the console's width: columns without a value in any row are
    left out, then the least needed ones until it fits (a line says which; results.csv has all).
    Failure reasons are listed under the table, not in a cell."""
    from rich.cells import cell_len
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cells = {name: [cell(r) for r in rows] for name, cell in _TABLE_COLUMNS.items()}
    reasons = []
    for i, r in enumerate(rows):
        if r.get("status") != "ok" and r.get("reason"):
            reasons.append(f"[{len(reasons) + 1}] {r['label']} n={r['n']} b={r['batch']}: {r['reason']}")
            cells["status"][i] += f" [{len(reasons)}]"
    names = [n for n in _TABLE_COLUMNS if n in _TABLE_KEEP or any(c != "-" for c in cells[n])]

    def build(names: list[str]) -> Table:
        table = Table(title=title or None, show_lines=False)
        for name in names:
            table.add_column(name, justify="left" if name in ("label", "mode", "status") else "right",
                             no_wrap=True)
        for i in range(len(rows)):
            table.add_row(*(cells[name][i] for name in names))
        return table

    def width(names: list[str]) -> int:  # unwrapped: each column, its padding and borders
        return 1 + sum(3 + max(cell_len(c) for c in [name, *cells[name]]) for name in names)

    left_out = []
    for name in _TABLE_DROP_ORDER:
        if width(names) <= console.width:
            break
        if name in names:
            names.remove(name)
            same = set(cells[name])
            left_out.append(f"{name} ({same.pop()} in every row)" if len(same) == 1 else name)
    console.print(build(names))
    if left_out:
        console.print(f"left out to fit {console.width} columns: {', '.join(left_out)} (results.csv has them)")
    for line in reasons:
        console.print(line, markup=False, highlight=False)


def print_max_batch(results: Sequence[dict], budget_bytes: int, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"max batch within {budget_bytes / GIB:.1f} GiB")
    for c in ("label", "mode", "n", "max batch", "peak MiB at max", "tok/s at max",
              "x naive", "x sdpa", "first failure"):
        table.add_column(c, justify="left" if c in ("label", "mode", "first failure") else "right")
    for res in results:
        fit, fail = res.get("fit"), res.get("fail")
        why = "-" if fail is None else f"b={fail['batch']}: {fail['status']}"
        if res.get("limit_reached"):
            why = "limit reached"
        table.add_row(res["label"], res["mode"], str(res["n"]), str(res["max_batch"]),
                      _fmt(fit and fit.get("mem_peak_mib"), ".0f"),
                      _fmt(fit and fit.get("tokens_per_s"), ".0f"),
                      _fmt(res.get("batch_ratio_vs_naive"), ".1f"),
                      _fmt(res.get("batch_ratio_vs_sdpa"), ".1f"), why)
    console.print(table)
