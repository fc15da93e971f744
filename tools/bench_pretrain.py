#!/usr/bin/env python
"""Training throughput sweep: tokens/s, MFU and data-wait fraction of real pretraining runs.

Each configuration runs `launch/pretrain.py` in its own process (the same code path a user runs),
for --steps optimizer steps; the first --warmup logged steps are dropped and the medians of the
rest are reported. Configurations of one sweep alternate in the same session, so compare them as
ratios.

    python tools/bench_pretrain.py --preset tiny small --n 512 2048 8192 --attention linformer full \
        --steps 12 --micro-batch 4 --out bench.json -- precision.dtype=fp32
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from linformer_train.cli import make_parser, run_main  # noqa: E402


def _median(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


def bench_one(overrides: list[str], run_dir: Path, launcher: list[str], timeout: float) -> dict:
    cmd = [*launcher, str(ROOT / "launch/pretrain.py"), *overrides, f"train.run_dir={run_dir}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if res.returncode < 0:  # killed: on a CPU box almost always the kernel's OOM killer
        return {"error": f"killed by signal {-res.returncode} (out of memory?)"}
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"rows": [r for r in rows if r["split"] == "train"]}


def main(argv) -> int:
    parser = make_parser("bench_pretrain", __doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="base YAML (default: the schema's defaults)")
    parser.add_argument("--preset", nargs="+", default=["tiny"])
    parser.add_argument("--n", nargs="+", type=int, default=[512])
    parser.add_argument("--k", type=int, default=None, help="projected length (default: n/4, at most 256)")
    parser.add_argument("--attention", nargs="+", default=["linformer", "full"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="logged steps dropped before the medians")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=1, help="ranks through the deepspeed launcher")
    parser.add_argument("--data-dir", default=None, help="reuse prepared data (one subfolder per n)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    if args.ranks < 1:
        parser.error(f"--ranks {args.ranks} must be at least 1")

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
    print(f"{'preset':>6} {'attn':>9} {'n':>5} {'k':>4} {'tok/s':>9} {'MFU %':>6} {'wait %':>6} {'peak GiB':>8}")
    for preset, n, attention, k, overrides in plans:
        run_dir = work / f"{preset}-{attention}-{n}"
        out = bench_one(overrides, run_dir, launcher, args.timeout)
        row = {"preset": preset, "attention": attention, "n": n, "k": k if attention == "linformer" else None}
        if "error" in out:
            row["error"] = out["error"]
            print(f"{preset:>6} {attention:>9} {n:>5} {'':>4} failed: {out['error']}")
        else:
            steady = out["rows"][args.warmup:]
            row.update(tokens_per_s=_median(steady, "tokens_per_s"), mfu=_median(steady, "mfu"),
                       data_wait_fraction=_median(steady, "data_wait_fraction"),
                       peak_memory_gib=max(r["peak_memory_gib"] for r in steady),
                       final_loss=steady[-1]["loss"])
            print(f"{preset:>6} {attention:>9} {n:>5} {row['k'] or '':>4} {row['tokens_per_s']:>9.0f} "
                  f"{100 * row['mfu']:>6.1f} {100 * row['data_wait_fraction']:>6.2f} "
                  f"{row['peak_memory_gib']:>8.2f}", flush=True)
        results.append(row)
    by_key = {(r["preset"], r["n"], r["attention"]): r for r in results}
    for (preset, n, attention), r in by_key.items():
        full = by_key.get((preset, n, "full"))
        if attention == "linformer" and full and "tokens_per_s" in r and "tokens_per_s" in full:
            r["speedup_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
            print(f"{preset} n={n}: linformer / full tokens/s = {r['speedup_vs_full']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"error: {len(failed)} of {len(results)} configurations failed (first: {failed[0]['error']})",
              file=sys.stderr)
    return 1 if failed and len(failed) == len(results) else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
