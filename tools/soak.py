#!/usr/bin/env python
"""Soak test: a long pretraining run with frequent checkpoints and evaluation, memory sampled over time.

Starts launch/pretrain.py (or the deepspeed launcher with --ranks 2) on a tiny model, samples the
resident memory of the whole process tree, the step, and the checkpoints on disk every --interval
seconds, sends every rank SIGTERM after --minutes (or at --steps), then checks that the run saved and
exited 0, and:

  * memory: RSS does not grow step over step. After a warm-up (the first --warmup-fraction of the
    samples), the least-squares slope of RSS against the step, times the steps of the window, must
    stay under --max-growth-mib, and so must the rise from the first to the last quarter's median;
  * checkpoints: at every sample at most checkpoint.keep_last + 1 step_* folders on disk (a save
    writes the new one, renames it into place, then prunes the oldest), keep_last once the run has
    stopped, and the last one loads (verify_checkpoint + its CRCs);
  * TensorBoard: every event file reads back, train/loss has one point per logged step and
    eval/loss one per evaluation, in order.

Writes <out>/soak.json (samples, checks, verdict) and prints a summary; exit 0 when every check
holds, 1 otherwise, 2 on a usage mistake.

    python tools/soak.py --minutes 5                          # the record in docs/RELIABILITY.md
    python tools/soak.py --minutes 30 --ranks 2 -- model.max_seq_len=256 model.k=64
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from linformer_train.cli import UsageError, make_parser, run_main  # noqa: E402

# a tiny model that steps fast on a CPU; checkpoints and evaluation much more often than usual
DEFAULTS = [
    "model.preset=tiny", "model.vocab_size=512", "model.max_seq_len=64", "model.k=16",
    "data.source=builtin", "data.max_documents=1500", "data.tokenizer_vocab_size=512",
    "data.validation_fraction=0.05", "data.num_proc=1", "precision.dtype=fp32",
    "train.micro_batch_size=8", "train.eval_batches=2", "train.peak_tflops=1.0",
    "train.max_steps=10000000", "optim.warmup_steps=20", "optim.lr=1e-3", "optim.decay=constant",
    "logging.log_every=10", "logging.tensorboard=true",
]


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (the ranks under a launcher)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def rank_pids(pid: int, ranks: int) -> list[int]:
    """The training processes: ``pid`` itself for one rank, else the launcher's rank children."""
    if ranks == 1:
        return [pid]
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)
            if any(a.startswith("--local_rank") for a in p.cmdline())]


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    step = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                step = max(step, int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                pass  # a line being written
    return step


def checkpoint_counts(root: Path) -> tuple[int, int, int]:
    """(complete checkpoints, all step_* folders, bytes of the checkpoints folder)."""
    if not root.is_dir():
        return 0, 0, 0
    complete = folders = size = 0
    for d in root.glob("step_*"):
        try:
            folders += 1
            complete += (d / "complete.json").is_file()
            size += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        except FileNotFoundError:
            pass  # pruned or renamed while counting
    return complete, folders, size


def memory_checks(samples: list[dict], warmup_fraction: float, max_growth_mib: float) -> dict:
    stepping = [s for s in samples if s["step"] > 0]
    steady = stepping[int(len(stepping) * warmup_fraction):]
    if len(steady) < 8:
        return {"ok": False, "reason": f"only {len(steady)} samples after warm-up; run longer"}
    xs = [s["step"] for s in steady]
    ys = [s["rss"] / 2**20 for s in steady]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    quarter = max(2, len(steady) // 4)
    rise = statistics.median(ys[-quarter:]) - statistics.median(ys[:quarter])
    span = xs[-1] - xs[0]
    trend = slope * span
    return {"ok": trend < max_growth_mib and rise < max_growth_mib, "steps": [xs[0], xs[-1]],
            "rss_mib_first_quarter": statistics.median(ys[:quarter]),
            "rss_mib_last_quarter": statistics.median(ys[-quarter:]), "rise_mib": rise,
            "slope_kib_per_step": slope * 1024, "trend_mib_over_window": trend,
            "rss_mib_min": min(ys), "rss_mib_max": max(ys), "limit_mib": max_growth_mib}


def tensorboard_checks(run_dir: Path, train_steps: list[int], eval_steps: list[int]) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    if not files:
        return {"ok": False, "reason": "no event files"}
    seen: dict[str, list[int]] = {"train/loss": [], "eval/loss": []}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in seen:
            if tag in acc.Tags()["scalars"]:
                seen[tag] += [e.step for e in acc.Scalars(tag)]
    train_ok = seen["train/loss"] == train_steps
    eval_ok = seen["eval/loss"] == eval_steps
    return {"ok": train_ok and eval_ok, "event_files": len(files),
            "train_loss_points": len(seen["train/loss"]), "train_logged_steps": len(train_steps),
            "eval_loss_points": len(seen["eval/loss"]), "evaluations": len(eval_steps)}


def soak(argv: Sequence[str]) -> int:
    parser = make_parser("soak", __doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="training time before SIGTERM")
    parser.add_argument("--steps", type=int, default=None, help="stop at this step instead (short runs)")
    parser.add_argument("--ranks", type=int, default=1, help="ranks (2+: the deepspeed launcher)")
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--max-growth-mib", type=float, default=32.0,
                        help="largest RSS rise allowed over the steady window")
    parser.add_argument("--out", default="runs/soak", help="run directory (emptied first)")
    parser.add_argument("--prepared-dir", default=None, help="reuse prepared data (data.prepared_dir)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides")
    args = parser.parse_args(argv)
    if args.ranks < 1 or args.interval <= 0 or args.minutes <= 0 or (args.steps is not None and args.steps < 1):
        raise UsageError("soak: --ranks, --interval, --minutes and --steps must be positive")

    import shutil

    from linformer_train.config import load_config

    out = Path(args.out)
    overrides = [*DEFAULTS, f"train.run_dir={out}", f"checkpoint.save_every={args.save_every}",
                 f"train.eval_every={args.eval_every}", f"checkpoint.keep_last={args.keep_last}",
                 *([f"data.prepared_dir={args.prepared_dir}"] if args.prepared_dir else []), *args.overrides]
    cfg = load_config([], overrides)  # a mistake is one line before anything starts
    if out.exists():
        shutil.rmtree(out)
    launcher = [sys.executable] if args.ranks == 1 else [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.ranks > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.ranks)))
    out.mkdir(parents=True)
    log = open(out / "soak.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([*launcher, str(ROOT / "launch/pretrain.py"), *overrides], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    samples, ckpt_root = [], out / "checkpoints"
    stop_at = t0 + 60 * args.minutes
    signalled = None
    while proc.poll() is None:
        step = last_step(out)
        complete, folders, size = checkpoint_counts(ckpt_root)
        samples.append({"t": round(time.monotonic() - t0, 2), "step": step, "rss": tree_rss(proc.pid),
                        "complete_checkpoints": complete, "checkpoint_folders": folders,
                        "checkpoint_bytes": size})
        if signalled is None and step > 0 and (time.monotonic() > stop_at
                                               or (args.steps is not None and step >= args.steps)):
            for pid in rank_pids(proc.pid, args.ranks):  # every rank, as torchrun or srun forward it
                os.kill(pid, signal.SIGTERM)
            signalled = step
        time.sleep(args.interval)
    code = proc.wait()
    log.close()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    eval_steps = [r["step"] for r in rows if r["split"] == "eval"]
    checks = {"exit": {"ok": code == 0 and signalled is not None, "code": code, "signalled_at_step": signalled}}
    keep = cfg.checkpoint.keep_last
    worst = max((s["complete_checkpoints"] for s in samples), default=0)
    worst_folders = max((s["checkpoint_folders"] for s in samples), default=0)
    from linformer_train.train.checkpoint import CheckpointError, CheckpointManager, verify_contents

    try:
        latest = CheckpointManager(ckpt_root, keep).latest()
        verify_contents(latest, 0)
        latest_ok = latest is not None
    except CheckpointError as exc:
        latest, latest_ok = None, False
        print(f"latest checkpoint: {exc}", file=sys.stderr)
    final = CheckpointManager(ckpt_root, keep).complete_checkpoints()
    # a save renames the new checkpoint into place before it prunes the oldest: K+1 folders at the peak
    checks["checkpoints"] = {"ok": worst_folders <= keep + 1 and len(final) <= keep and latest_ok,
                             "keep_last": keep, "most_complete_seen": worst, "most_folders_seen": worst_folders,
                             "final": [p.name for p in final], "latest": latest.name if latest else None,
                             "bytes_max": max((s["checkpoint_bytes"] for s in samples), default=0)}
    checks["memory"] = memory_checks(samples, args.warmup_fraction, args.max_growth_mib)
    checks["tensorboard"] = tensorboard_checks(out, train_steps, eval_steps)
    ok = all(c["ok"] for c in checks.values())
    report = {"ok": ok, "seconds": round(time.monotonic() - t0, 1), "steps": train_steps[-1] if train_steps else 0,
              "ranks": args.ranks, "overrides": overrides, "checks": checks, "samples": samples}
    (out / "soak.json").write_text(json.dumps(report, indent=1))

    m, c, tb = checks["memory"], checks["checkpoints"], checks["tensorboard"]
    print(f"soak: {report['steps']} steps in {report['seconds']} s on {args.ranks} rank(s), "
          f"{len(samples)} samples -> {out / 'soak.json'}")
    if "rise_mib" in m:
        print(f"  memory: RSS {m['rss_mib_first_quarter']:.0f} -> {m['rss_mib_last_quarter']:.0f} MiB "
              f"(rise {m['rise_mib']:+.1f} MiB, trend {m['slope_kib_per_step']:+.3f} KiB/step = "
              f"{m['trend_mib_over_window']:+.1f} MiB over steps {m['steps'][0]}-{m['steps'][1]}; "
              f"limit {m['limit_mib']:g}) {'ok' if m['ok'] else 'FAIL'}")
    else:
        print(f"  memory: {m['reason']} FAIL")
    print(f"  checkpoints: at most {c['most_complete_seen']} complete / {c['most_folders_seen']} folders "
          f"(keep_last {keep}), final {c['final']}, latest loads: {latest_ok} {'ok' if c['ok'] else 'FAIL'}")
    print(f"  tensorboard: {tb.get('event_files', 0)} event file(s), train/loss {tb.get('train_loss_points')}"
          f"/{tb.get('train_logged_steps')} points, eval/loss {tb.get('eval_loss_points')}/{tb.get('evaluations')} "
          f"{'ok' if tb['ok'] else 'FAIL'}")
    print(f"  exit code {code} after SIGTERM at step {signalled} {'ok' if checks['exit']['ok'] else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_main(soak))
