#!/usr/bin/env python
"""Memory and speed profiling of Linformer encoders: choose k and n for your hardware.

Subcommands (docs/PROFILING.md has the walk-through):
  sweep      time and peak memory over n, k, batch, sharing, projection, attention kind and mode,
             with speed-up / memory saved against full attention (naive O(n^2) and SDPA)
  max-batch  the largest batch that fits a memory budget, per n and attention kind
  estimate   no run: parameters, gradients, optimizer states and activations per GPU by ZeRO stage
  peak       the measured matmul peak of this device (and, on a listed GPU, the datasheet peak
             MFU is relative to)

Examples:
  python tools/profile.py sweep --preset base --layers 1 -n 512 1024 2048 --k 128 256 \\
      --attention linformer full naive --mode backward
  python tools/profile.py max-batch --preset base -n 1024 4096 --device cuda --dtype bf16 --budget-gib 16
  python tools/profile.py estimate --preset base -n 8192 --k 256 --zero-stage 2 --gpus 8 --gpu-mem-gib 40
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

# This file is named like the standard library's `profile` (which cProfile, and so torch._dynamo,
# import): drop tools/ from the path so that name resolves to the standard library.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line on stderr and exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, help="tiny | small | base | large")
    g.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="config file(s) whose model section is used (repeatable)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="dotlist override, e.g. model.dropout=0 (repeatable)")
    g.add_argument("--layers", type=int, default=None,
                   help="override num_layers (e.g. 1 to measure one block of a big model)")


def _run_args(p: argparse.ArgumentParser, max_batch: bool = False) -> None:
    g = p.add_argument_group("sweep")
    g.add_argument("-n", "--seq-len", type=int, nargs="+", required=True, help="sequence lengths n")
    g.add_argument("--k", nargs="+", default=["128"],
                   help="k values: 128, a per-layer list '[256,128]' or a rule '{first: 256, last: 64}'")
    g.add_argument("--attention", nargs="+", default=["linformer", "full", "naive"],
                   help="linformer | full (SDPA) | naive (written-out O(n^2))")
    g.add_argument("--projection", nargs="+", default=["linear"], help="linear | mean | conv")
    g.add_argument("--sharing", nargs="+", default=["headwise"], help="none | headwise | kv | layerwise")
    if not max_batch:
        g.add_argument("--batch-size", "-b", type=int, nargs="+", default=[1])
    g.add_argument("--mode", nargs="+", default=["backward"],
                   help="forward (inference) | backward (forward + backward) | train (+ AdamW step)")
    g.add_argument("--target", default="auto",
                   help="encoder | mlm | layer (one attention layer) | auto (mlm for train, else encoder)")
    g.add_argument("--impl", nargs="+", default=["project"],
                   help="project | pypi (lucidrains' linformer package; --target layer)")
    g.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    g.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    g.add_argument("--clock", default="wall",
                   help="wall | cpu (process CPU time; with --threads 1, robust on a shared CPU)")
    g.add_argument("--malloc", default="tensor",
                   help="CPU workers: tensor (fixed glibc mmap threshold: RSS follows live tensors) | "
                        "default (glibc as is: the timing users see)")
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--mask-prob", type=float, default=0.15)
    g.add_argument("--budget-gib", type=float, default=None,
                   help="peak memory allowed (CPU: process RSS; CUDA: allocated). Default: CPU 90%% of "
                        "available RAM, CUDA the device")
    g.add_argument("--no-isolate", action="store_true",
                   help="run CPU cases in this process (faster, but its RSS peak is not trustworthy)")
    g.add_argument("--timeout", type=float, default=None, help="seconds per case (isolated runs)")
    g.add_argument("--wait-idle", type=float, nargs=2, default=None, metavar=("BUSY", "SECONDS"),
                   help="before each CPU case wait up to SECONDS for machine CPU use below BUSY (0-1), "
                        "e.g. 0.3 120 on a shared machine")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU; unset: the GPU's dense datasheet peak for the dtype, "
                        "else a measured matmul")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="directory for results.json/.csv and plots "
                                               "(default runs/profile/<time>)")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--title", default="", help="title for the table and plots")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tools/profile.py", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("sweep", help="time and memory over a grid of configurations")
    _model_args(s)
    _run_args(s)

    m = sub.add_parser("max-batch", help="largest batch within a memory budget")
    _model_args(m)
    _run_args(m, max_batch=True)
    m.add_argument("--max-batch-limit", type=int, default=4096)
    m.add_argument("--no-refine", action="store_true", help="stop at powers of two (no bisection)")
    m.add_argument("--refine-tolerance", type=float, default=0.0,
                   help="stop bisecting when the bracket is within this share of the last fit")

    e = sub.add_parser("estimate", help="memory per GPU by ZeRO stage, without a run")
    _model_args(e)
    e.add_argument("-n", "--seq-len", type=int, required=True)
    e.add_argument("--k", default=None, help="k (as in sweep); default: the config's")
    e.add_argument("--attention", default=None, help="linformer | full | naive; default: the config's")
    e.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward")
    e.add_argument("--dtype", default="bf16")
    e.add_argument("--zero-stage", type=int, nargs="+", default=[0, 1, 2, 3])
    e.add_argument("--gpus", type=int, default=1, help="GPUs in total (data-parallel ranks)")
    e.add_argument("--gpus-per-node", type=int, default=None)
    e.add_argument("--gpu-mem-gib", type=float, default=None, help="memory of one GPU")
    e.add_argument("--activation-checkpointing", action="store_true")
    e.add_argument("--reserve-gib", type=float, default=2.0,
                   help="CUDA context + allocator slack counted on top (default 2)")
    e.add_argument("--mask-prob", type=float, default=0.15)
    e.add_argument("--json", default=None, help="also write the estimate here")

    k = sub.add_parser("peak", help="measured matmul peak of a device")
    k.add_argument("--device", default="auto")
    k.add_argument("--dtype", default="fp32")
    k.add_argument("--size", type=int, default=None)
    k.add_argument("--threads", type=int, default=None)
    k.add_argument("--clock", default="wall", help="wall | cpu")
    return p


# --------------------------------------------------------------------------------------------------


def _console():
    """rich console; wide tables when the output is a file or a pipe (no terminal width to fit)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _device(name: str) -> str:
    import torch

    from linformer_train.config import ConfigError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for but torch sees no CUDA device")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"--device {name!r} is not cpu, cuda, cuda:N or auto")
    return name


def _base_model(args) -> dict:
    from linformer_train import profiling as prof

    overrides = list(args.overrides)
    if args.layers is not None:
        overrides.append(f"model.num_layers={args.layers}")
    for o in overrides:
        if "=" in o and not o.split("=", 1)[0].startswith("model."):
            from linformer_train.config import ConfigError

            raise ConfigError(f"--set {o!r}: the profiler reads only the model section (model.*)")
    return prof.model_section(args.preset, args.config, overrides)


def _cases(args, device: str, budget: int | None):
    from linformer_train import profiling as prof

    if args.dtype not in prof.DTYPES:
        from linformer_train.config import ConfigError

        raise ConfigError(f"--dtype {args.dtype!r} is not allowed; choose one of {', '.join(prof.DTYPES)}")
    base = _base_model(args)
    ks = [prof.parse_k(k) for k in args.k]
    return prof.build_cases(
        base, seq_lens=args.seq_len, attentions=args.attention, ks=ks, projections=args.projection,
        sharings=args.sharing, batch_sizes=getattr(args, "batch_size", [1]), modes=args.mode,
        target=args.target, impls=args.impl, num_layers=args.layers, dtype=args.dtype,
        device=device, warmup=args.warmup, repeats=args.repeats, mask_prob=args.mask_prob,
        budget_bytes=budget, threads=args.threads, clock=args.clock, malloc=args.malloc)


def _peak(args, device: str):
    """The peak MFU divides by (linformer_train/train/mfu.py): --peak-tflops, else the GPU's
    datasheet number, else a matmul measured with the sweep's clock and threads."""
    from linformer_train.train.mfu import device_peak

    return device_peak(device, args.dtype, args.peak_tflops, clock=args.clock, threads=args.threads)


def _out_dir(args) -> Path:
    if args.out:
        return Path(args.out)
    return Path("runs/profile") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


# A CPU step keeps at least one thread busy all the time, so undisturbed it gets at least one core's
# worth of CPU time per second of wall time (cpu_share >= 1 / threads). Below 0.8 of that, the step
# was off the CPU for a fifth of its wall time or more: other processes had the cores.
LOW_CORE_SHARE = 0.8


def low_cpu_share(row: dict) -> bool:
    """A wall-clock CPU timing taken while other processes took the cores (its time is inflated)."""
    share, threads = row.get("cpu_share"), row.get("threads")
    return (row.get("status") == "ok" and row.get("clock", "wall") == "wall" and share is not None
            and threads is not None and share * threads < LOW_CORE_SHARE)


def _share_warning(r: dict) -> str:
    load = f", load average {r['loadavg_1m']:.1f}" if r.get("loadavg_1m") is not None else ""
    return (f"warning: {r['label']} {r['mode']} n={r['n']} b={r['batch']}: CPU share {r['cpu_share']:.2f} "
            f"with {r['threads']} thread(s), {r['cpu_share'] * r['threads']:.2f} core-seconds of CPU per "
            f"second{load}: other processes took the cores, so its {r['time_ms']:.1f} ms is inflated")


def _budget(args, device: str, console) -> int:
    """--budget-gib, capped at what the device has (a budget the machine cannot give would only
    have the search allocate until the kernel kills it)."""
    from linformer_train import profiling as prof

    have = prof.default_budget_bytes(device)
    if not args.budget_gib:
        return have
    asked = int(args.budget_gib * prof.GIB)
    if asked > have:
        console.print(f"[yellow]note: --budget-gib {args.budget_gib:g} is more than {device} has "
                      f"({have / prof.GIB:.1f} GiB usable); using {have / prof.GIB:.1f} GiB[/yellow]")
        return have
    return asked


# --------------------------------------------------------------------------------------------------
# Console tables (the library writes JSON, CSV and plots; what is printed is the command line's)
# --------------------------------------------------------------------------------------------------


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
    table = Table(title=f"max batch within {budget_bytes / 2**30:.1f} GiB")
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


def cmd_sweep(args) -> int:
    from linformer_train import profiling as prof

    console = _console()
    device = _device(args.device)
    budget = _budget(args, device, console)
    cases = _cases(args, device, budget)
    peak = _peak(args, device)
    console.print(f"[dim]{len(cases)} cases on {device}; MFU against {peak.describe()}; "
                  f"budget {budget / prof.GIB:.1f} GiB[/dim]", highlight=False)

    out = _out_dir(args)
    meta = prof.machine_info(device)
    meta.update(peak_flops=peak.flops, peak_source=peak.source, budget_bytes=budget,
                isolated=not args.no_isolate or device != "cpu")
    done: list[dict] = []

    def on_row(r):
        done.append(r)  # a partial file survives an interrupted sweep
        prof.write_json(out / "results.json", {"kind": "sweep", "machine": meta, "rows": done,
                                               "partial": True})
        what = (f"{r['time_ms']:.1f} ms, {r['mem_step_mib']:.0f} MiB"
                + (f", cpu share {r['cpu_share']:.2f}" if r.get("cpu_share") else "") if r["status"] == "ok"
                else f"{r['status']}: {r['reason']}")
        console.print(f"  {r['label']:<22} {r['mode']:<8} n={r['n']:<6} b={r['batch']:<4} {what}")
        if low_cpu_share(r):
            print(_share_warning(r), file=sys.stderr, flush=True)

    rows = prof.run_sweep(cases, isolate=False if args.no_isolate else None, peak_flops=peak.flops,
                          on_row=on_row, timeout=args.timeout,
                          idle_wait=tuple(args.wait_idle) if args.wait_idle else None)
    prof.write_json(out / "results.json", {"kind": "sweep", "machine": meta, "rows": rows})
    prof.write_csv(out / "results.csv", rows)
    plots = [] if args.no_plots else prof.plot_rows(rows, out, args.title)
    print_table(rows, args.title, console)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.csv'}"
                  + "".join(f", {p}" for p in plots))
    low = [r for r in rows if low_cpu_share(r)]
    if low:  # said again after the table, where the numbers are read
        worst = min(low, key=lambda r: r["cpu_share"] * r["threads"])
        print(f"warning: {len(low)} of {len(rows)} cases ran while other processes took the cores "
              f"(lowest CPU share {worst['cpu_share']:.2f}: {worst['label']} n={worst['n']}); their "
              f"times are inflated and not comparable with the others'. Rerun on an idle machine, "
              f"with --wait-idle 0.3 120, or compare with --threads 1 --clock cpu", file=sys.stderr, flush=True)
    return 0


def cmd_max_batch(args) -> int:
    from linformer_train import profiling as prof

    console = _console()
    device = _device(args.device)
    budget = _budget(args, device, console)
    args.batch_size = [1]
    cases = _cases(args, device, budget)
    peak = _peak(args, device)
    out = _out_dir(args)
    meta = prof.machine_info(device)
    meta.update(peak_flops=peak.flops, peak_source=peak.source, budget_bytes=budget)
    results = []
    for case in cases:
        if args.wait_idle and device == "cpu":
            prof.wait_for_idle_cpu(*args.wait_idle)
        res = prof.find_max_batch(case, budget, limit=args.max_batch_limit, refine=not args.no_refine,
                                  tolerance=args.refine_tolerance,
                                  runner=lambda c: prof.measure_case(
                                      c, isolate=False if args.no_isolate else None,
                                      peak_flops=peak.flops, timeout=args.timeout))
        res.update(label=case.label, attention=case.model["attention"], impl=case.impl,
                   mode=case.mode, n=case.seq_len)
        why = "" if res["fail"] is None else f" (b={res['fail']['batch']}: {res['fail']['reason']})"
        console.print(f"  {case.label:<22} {case.mode:<8} n={case.seq_len:<6} max batch "
                      f"{res['max_batch']}{why}")
        results.append(res)
        prof.write_json(out / "max_batch.json", {"kind": "max-batch", "machine": meta,
                                                 "results": results, "partial": True})
    prof.add_batch_ratios(results)
    prof.write_json(out / "max_batch.json", {"kind": "max-batch", "machine": meta, "results": results})
    flat = [dict(r["fit"], max_batch=r["max_batch"]) for r in results if r.get("fit")]
    prof.write_csv(out / "max_batch.csv", flat)
    print_max_batch(results, budget, console)
    console.print(f"wrote {out / 'max_batch.json'}, {out / 'max_batch.csv'}")
    return 0


def cmd_estimate(args) -> int:
    from rich.table import Table

    from linformer_train import profiling as prof
    from linformer_train.config import config_from_dict

    base = _base_model(args)
    base.update(max_seq_len=max(args.seq_len, 1), preset=None)
    if args.k is not None:
        base["k"] = prof.parse_k(args.k)
    if args.attention is not None:
        base["attention"] = args.attention
    cfg = config_from_dict({"model": base}).model
    est = prof.estimate(cfg, args.seq_len, args.micro_batch, dtype=args.dtype,
                        zero_stages=args.zero_stage, num_gpus=args.gpus,
                        gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem_gib,
                        activation_checkpointing=args.activation_checkpointing,
                        reserve_gib=args.reserve_gib, mask_prob=args.mask_prob)
    G = prof.GIB
    console = _console()
    title = (f"{est['params'] / 1e6:.1f}M params, n={args.seq_len}, {cfg.attention}"
             + (f" k={prof.format_k(cfg.k)}" if cfg.attention == "linformer" else "")
             + f", micro-batch {args.micro_batch}, {args.dtype}, {args.gpus} GPU(s)"
             + (", activation checkpointing" if args.activation_checkpointing else ""))
    t = Table(title=f"memory per GPU (GiB): {title}")
    cols = ["ZeRO", "params", "grads", "optimizer", "model states", "DeepSpeed est.",
            "activations", f"+ reserve {args.reserve_gib:g}", "total"]
    if args.gpu_mem_gib:
        cols += [f"fits {args.gpu_mem_gib:g} GiB", "max micro-batch"]
    for c in cols:
        t.add_column(c, justify="right")
    for st in est["stages"]:
        ds = st["deepspeed_model_states_bytes"]
        row = [str(st["zero_stage"]), f"{st['params_bytes'] / G:.2f}", f"{st['grads_bytes'] / G:.2f}",
               f"{st['optimizer_bytes'] / G:.2f}", f"{st['model_states_bytes'] / G:.2f}",
               "-" if ds is None else f"{ds / G:.2f}", f"{st['activation_bytes'] / G:.2f}",
               f"{args.reserve_gib:.2f}", f"{st['total_bytes'] / G:.2f}"]
        if args.gpu_mem_gib:
            row += ["yes" if st["fits"] else "NO", str(st["max_micro_batch"])]
        t.add_row(*row)
    console.print(t)
    if args.gpu_mem_gib:
        for st in est["stages"]:
            verdict = "fits" if st["fits"] else "does NOT fit"
            console.print(f"ZeRO-{st['zero_stage']} on {args.gpus} x {args.gpu_mem_gib:g} GiB: {verdict} "
                          f"at micro-batch {args.micro_batch} ({st['total_bytes'] / G:.1f} GiB per GPU); "
                          f"largest micro-batch that fits: {st['max_micro_batch']}")
    a = est["activations"]
    console.print(f"activations: {a['per_layer'] / G:.3f} GiB per layer (largest), layers "
                  f"{a['layers'] / G:.2f}, embeddings {a['embeddings'] / G:.2f}, MLM head "
                  f"{a['head'] / G:.2f}, backward transient {a['transient'] / G:.2f}; "
                  f"{est['activation_bytes_per_sequence'] / G:.3f} GiB per sequence")
    if args.json:
        prof.write_json(Path(args.json), {"kind": "estimate", "estimate": est,
                                          "machine": prof.machine_info("cpu")})
    return 0


def cmd_peak(args) -> int:
    from linformer_train import profiling as prof

    device = _device(args.device)
    if args.dtype not in prof.DTYPES:
        from linformer_train.config import ConfigError

        raise ConfigError(f"--dtype {args.dtype!r} is not allowed; choose one of {', '.join(prof.DTYPES)}")
    import torch

    from linformer_train.train.mfu import datasheet_peak, matmul_dtype, measure_matmul_peak

    peak = measure_matmul_peak(device, args.dtype, args.size, clock=args.clock, threads=args.threads)
    print(f"{device} {args.dtype} matmul peak: {peak / 1e12:.3f} TFLOP/s "
          f"({args.clock} clock, {torch.get_num_threads()} threads)")
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        sheet = datasheet_peak(name, matmul_dtype(args.dtype))
        print(f"{name}: " + (f"{sheet[0]} dense {matmul_dtype(args.dtype)} datasheet peak "
                             f"{sheet[1] / 1e12:.3g} TFLOP/s (what MFU divides by)" if sheet else
                             "not in the datasheet table; MFU divides by the measured peak"))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from linformer_train.config import ConfigError

    handlers = {"sweep": cmd_sweep, "max-batch": cmd_max_batch, "estimate": cmd_estimate,
                "peak": cmd_peak}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
