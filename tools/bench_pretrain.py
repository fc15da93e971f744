#!/usr/bin/env python
"""Training throughput sweep: tokens/s, MFU and data-wait fraction of real pretraining runs.

Each configuration runs `launch/pretrain.py` in its own process (the same code path a user runs),
for --steps optimizer steps; the first --warmup logged steps are dropped and the medians of the
rest are reported. Configurations of one sweep alternate in the same session, so compare them as
ratios. Progress goes to stderr, the table to stdout; the exit code is 1 when any configuration
failed (its row says why).

--breakdown runs each configuration once more under the torch profiler and splits its steps into
forward, backward, optimizer, data and other (linformer_train/profiling/steps.py says how), printed
after the table and written with the rows.

    python tools/bench_pretrain.py --preset tiny small --n 512 2048 8192 --attention linformer full \
        --steps 12 --micro-batch 4 --breakdown --out bench.json -- precision.dtype=fp32
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# tools/ holds a profile.py, which would shadow the standard library's profile (cProfile, and so
# torch._dynamo, import it) in the breakdown worker: keep tools/ off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "tools"]
sys.path.insert(0, str(ROOT))

from linformer_train.cli import make_parser, run_main  # noqa: E402


def _median(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


def bench_one(overrides: list[str], run_dir: Path, launcher: list[str], timeout: float) -> dict:
    cmd = [*launcher, str(ROOT / "launch/pretrain.py"), *overrides, f"train.run_dir={run_dir}"]
    # its own session: a timeout or Ctrl-C here ends the launcher and every rank it started
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"still running after {timeout:g} s (--timeout); stopped"}
    finally:
        _kill_group(proc)
    if proc.returncode < 0:  # killed: on a CPU box almost always the kernel's OOM killer
        return {"error": f"killed by signal {-proc.returncode} (out of memory?)"}
    if proc.returncode != 0:
        tail = (err.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the engine line names the peak MFU divides by: "... | MFU against 989 TFLOP/s (H100 SXM dense ...)"
    peak = next((line.split("| MFU against ", 1)[1] for line in out.splitlines()
                 if line.startswith("engine: ") and "| MFU against " in line), None)
    return {"rows": [r for r in rows if r["split"] == "train"], "mfu_peak": peak}


def breakdown_one(overrides: list[str], run_dir: Path, skip: int, timeout: float) -> dict:
    """The step breakdown of one configuration, from its own process (the same steps as the timed
    run, under the torch profiler); {'breakdown': {...}} or {'error': ...}."""
    out = run_dir.with_name(run_dir.name + "-breakdown.json")
    config = [o for o in overrides if o.startswith("--config=")]
    rest = [o for o in overrides if not o.startswith("--config=")]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--breakdown-worker", str(out),
           "--warmup", str(skip), *config, "--", *rest, f"train.run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"breakdown still running after {timeout:g} s (--timeout); stopped"}
    finally:
        _kill_group(proc)
    if proc.returncode != 0 or not out.is_file():
        tail = (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"error": f"breakdown: {tail}"}
    return {"breakdown": json.loads(out.read_text())}


def _breakdown_worker(args) -> int:
    """--breakdown-worker OUT: train the overrides' configuration under the profiler, write OUT."""
    from linformer_train.config import load_config
    from linformer_train.profiling.steps import profile_training

    cfg = load_config([args.config] if args.config else [], args.overrides)
    result = profile_training(cfg, skip=args.warmup)
    Path(args.breakdown_worker).write_text(json.dumps(result, indent=1))
    return 0


def print_breakdown(results: list[dict]) -> None:
    rows = [r for r in results if r.get("breakdown")]
    if not rows:
        return
    clock = rows[0]["breakdown"]["clock"]
    print(f"\nstep breakdown, ms per step (torch profiler; {clock}; a profiled step runs slower):")
    print(f"{'preset':>6} {'attn':>9} {'n':>5} {'step':>8} {'forward':>8} {'backward':>8} {'optim':>8} "
          f"{'data':>8} {'other':>8}   shares fwd/bwd/opt/data/other")
    for r in rows:
        b = r["breakdown"]
        shares = "/".join(f"{100 * b['shares'][p]:.0f}" for p in ("forward", "backward", "optimizer", "data", "other"))
        print(f"{r['preset']:>6} {r['attention']:>9} {r['n']:>5} {b['step_ms']:>8.1f} {b['forward_ms']:>8.1f} "
              f"{b['backward_ms']:>8.1f} {b['optimizer_ms']:>8.1f} {b['data_ms']:>8.2f} {b['other_ms']:>8.1f}   "
              f"{shares} %")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the run's process group (nothing, after a clean exit)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def build_parser():
    parser = make_parser("bench_pretrain", __doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="base YAML (default: the schema's defaults)")
    parser.add_argument("--preset", nargs="+", default=["tiny"], help="model presets to run: tiny small base large (default: tiny)")
    parser.add_argument("--n", nargs="+", type=int, default=[512], help="sequence lengths, model.max_seq_len (default: 512)")
    parser.add_argument("--k", type=int, default=None, help="projected length (default: n/4, at most 256)")
    parser.add_argument("--attention", nargs="+", default=["linformer", "full"],
                        help="attention kinds to compare: linformer full naive (default: linformer full)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="logged steps dropped before the medians (default: %(default)s)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per step (default: %(default)s)")
    parser.add_argument("--ranks", type=int, default=1, help="ranks, through the deepspeed launcher when more than 1 (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="reuse prepared data (one subfolder per n)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds one configuration may run before it is stopped and counted as failed "
                             "(default: %(default)s)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also split each configuration's steps into forward, backward, optimizer, data and "
                             "other with the torch profiler (one more run per configuration, one rank)")
    parser.add_argument("--breakdown-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run (key=value)")
    return parser


def main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.breakdown_worker:
        return _breakdown_worker(args)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    if args.ranks < 1:
        parser.error(f"--ranks {args.ranks} must be at least 1")
    if args.breakdown and args.ranks != 1:
        parser.error("--breakdown profiles one rank; use it with --ranks 1")
    if args.breakdown and args.steps < args.warmup + 2:
        parser.error("--breakdown needs --steps >= --warmup + 2 (a step is timed to the next one's start)")

    launcher = [sys.executable] if args.ranks == 1 else [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks)]
    work = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    data_root = Path(args.data_dir) if args.data_dir else work / "data"
    results = []
    plans = []
    for preset, n, attention in itertools.product(args.preset, args.n, args.attention):
        k = args.k or min(256, max(16, n // 4))
        overrides = ([f"--config={args.config}"] if args.config else []) + [
            f"model.preset={preset}", f"model.max_seq_len={n}", f"model.k={k}",
            f"model.attention={attention}", f"train.max_steps={args.steps}",
            f"train.micro_batch_size={args.micro_batch}", "train.eval_every=0",
            "checkpoint.save_every=0", "logging.log_every=1", "logging.tensorboard=false",
            f"data.prepared_dir={data_root / f'n{n}'}", *args.overrides]
        # no final checkpoint: a benchmark measures steps, not saves
        overrides.append(f"train.stop_after={args.steps}")
        plans.append((preset, n, attention, k, overrides))
    from linformer_train.config import load_config

    for *_, overrides in plans:  # a mistake in the config is one line now, not a table of failed runs
        load_config([args.config] if args.config else [], [o for o in overrides if not o.startswith("--config=")])
    print(f"{'preset':>6} {'attn':>9} {'n':>5} {'k':>4} {'tok/s':>9} {'MFU %':>6} {'wait %':>6} {'peak GiB':>8}",
          flush=True)
    for i, (preset, n, attention, k, overrides) in enumerate(plans, 1):
        what = f"{preset} {attention} n={n}" + (f" k={k}" if attention == "linformer" else "")
        # progress on stderr, so that stdout stays the table
        print(f"[{i}/{len(plans)}] {what}: {args.steps} steps ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        run_dir = work / f"{preset}-{attention}-{n}"
        out = bench_one(overrides, run_dir, launcher, args.timeout)
        row = {"preset": preset, "attention": attention, "n": n, "k": k if attention == "linformer" else None,
               "wall_s": time.monotonic() - t0}
        if "error" in out:
            row["error"] = out["error"]
            print(f"{preset:>6} {attention:>9} {n:>5} {'':>4} failed: {out['error']}", flush=True)
        else:
            steady = out["rows"][args.warmup:]
            row.update(tokens_per_s=_median(steady, "tokens_per_s"), mfu=_median(steady, "mfu"),
                       data_wait_fraction=_median(steady, "data_wait_fraction"),
                       peak_memory_gib=max(r["peak_memory_gib"] for r in steady),
                       final_loss=steady[-1]["loss"], mfu_peak=out.get("mfu_peak"))
            print(f"{preset:>6} {attention:>9} {n:>5} {row['k'] or '':>4} {row['tokens_per_s']:>9.0f} "
                  f"{100 * row['mfu']:>6.1f} {100 * row['data_wait_fraction']:>6.2f} "
                  f"{row['peak_memory_gib']:>8.2f}", flush=True)
            if args.breakdown:
                print(f"[{i}/{len(plans)}] {what}: step breakdown ...", file=sys.stderr, flush=True)
                got = breakdown_one(overrides, work / f"{preset}-{attention}-{n}-profiled", args.warmup,
                                    args.timeout)
                row.update(got if "breakdown" in got else {"breakdown_error": got["error"]})
        results.append(row)
    by_key = {(r["preset"], r["n"], r["attention"]): r for r in results}
    for (preset, n, attention), r in by_key.items():
        full = by_key.get((preset, n, "full"))
        if attention == "linformer" and full and "tokens_per_s" in r and "tokens_per_s" in full:
            r["speedup_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
            print(f"{preset} n={n}: linformer / full tokens/s = {r['speedup_vs_full']:.2f}x")
    peaks = sorted({r["mfu_peak"] for r in results if r.get("mfu_peak")})
    if peaks:
        print(f"MFU against {'; '.join(peaks)}")
    print_breakdown(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    failed = [r for r in results if "error" in r or "breakdown_error" in r]
    if failed:  # a sweep with a hole is not a result: say so in the exit code too
        first = failed[0].get("error") or failed[0]["breakdown_error"]
        print(f"error: {len(failed)} of {len(results)} configurations failed (first: {first})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
