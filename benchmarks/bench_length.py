#!/usr/bin/env python
"""Cost per token against sequence length: Linformer vs full attention (SDPA) at the same tokens
per step, behind docs/PERFORMANCE.md ("Linear cost in n"); never run as a test.

For each n, an MLM model of ``--preset`` with max_seq_len = n takes training steps (MLM loss at 15%
of positions, backward, AdamW) on batches of ``--tokens-per-step / n`` sequences, so every n does
the same dense work per step and only attention's share changes: flat tokens/s is linear cost.

Each (n, attention) case runs in its own worker process (fresh allocator, its own peak-RSS counter)
built once and warmed up on a short input; the parent then asks the workers of one n for a step in
turn (Linformer, full, Linformer, full, ...), so a neighbour's load falls on both alike: compare the
ratios of one run, not absolute numbers across runs. On a CPU each step's time is the worker's CPU
seconds (``--threads 1``: what the step costs one core, robust to other jobs taking cores); wall
time and the CPU share are reported beside it. Memory per sequence = (peak RSS of the step - RSS
before it) / batch on a CPU, (max_memory_allocated - memory_allocated) / batch on a GPU.

Full attention stops, for this n and every larger one, when its step costs more than
``--slowdown-limit`` (default 10) times Linformer's at the same n (the worker is ended when its CPU
time passes that, so the slow step never runs to the end), or when it no longer fits
(``--budget-gib``, default 80% of the memory available at start; out of memory on a GPU).

  nice -n 10 python benchmarks/bench_length.py --preset small -n 2048 4096 8192 16384 32768 65536 \
      --tokens-per-step 65536 --k 256 --threads 1 --plot docs/figures/length_cpu_small.png
  python benchmarks/bench_length.py --preset base --device cuda --dtype bf16 --activation-checkpointing \
      -n 2048 4096 8192 16384 32768 65536 --tokens-per-step 131072 --k 256 --repeats 5 --warmup 2 \
      --warmup-len 0 --plot docs/figures/length_gpu_base.png
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

GIB = 1 << 30
ATTENTIONS = ("linformer", "full")


# --------------------------------------------------------------------------------------------------
# Memory of a process, from /proc
# --------------------------------------------------------------------------------------------------


def _status_kib(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def rss_bytes(pid: str = "self") -> int:
    return _status_kib("VmRSS", pid) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def trim_heap() -> None:
    """Give freed heap pages back to the kernel (glibc), so RSS before a step counts live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------------
# Worker: one (n, attention) case, driven over stdin/stdout
# --------------------------------------------------------------------------------------------------


def worker(spec: dict) -> None:
    import torch

    from linformer_train.config import config_from_dict
    from linformer_train.model import LinformerForMLM, apply_activation_checkpointing

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    n, batch = spec["n"], spec["batch"]
    model_section = dict(spec["model"], max_seq_len=n, attention=spec["attention"])
    if spec["attention"] == "linformer":
        model_section["k"] = spec["k"]
    cfg = config_from_dict({"model": model_section}).model
    torch.manual_seed(0)
    model = LinformerForMLM(cfg).to(device)
    if spec["activation_checkpointing"]:
        apply_activation_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec["dtype"] == "bf16"
                else torch.autocast(device.type, enabled=False))
    gen = torch.Generator().manual_seed(1)

    def make_batch(b: int, length: int):
        ids = torch.randint(5, cfg.vocab_size, (b, length), generator=gen)
        labels = torch.where(torch.rand(b, length, generator=gen) < 0.15, ids, torch.full_like(ids, -100))
        return ids.to(device), labels.to(device)

    def step(ids, labels) -> None:
        with autocast:
            out = model(ids, labels=labels)
        (out.loss_sum / out.num_predicted.clamp(min=1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: step memory = activations

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(spec["warmup"]):  # kernels, allocator, AdamW state: on a short input, cheaply
        if spec["warmup_len"] > 0:
            step(*make_batch(1, min(n, spec["warmup_len"])))
        else:  # the step itself (a GPU picks kernels per shape)
            step(*make_batch(batch, n))
    sync()
    params = sum(p.numel() for p in model.parameters())
    reply({"ready": True, "params": params, "rss": rss_bytes()})
    for line in sys.stdin:
        if line.strip() != "step":
            break
        ids, labels = make_batch(batch, n)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            trim_heap()
            reset_peak_rss()
            base = rss_bytes()
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            step(ids, labels)
            sync()
        except torch.OutOfMemoryError:
            reply({"status": "oom"})
            return
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else _status_kib("VmHWM") * 1024)
        del ids, labels
        trim_heap()  # the other worker steps next: hand back what this one freed
        reply({"status": "ok", "wall_s": wall, "cpu_s": cpu, "peak_bytes": peak,
               "step_bytes": peak - base})


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------------
# Parent: spawn, drive round-robin, stop full attention when it stops being worth it
# --------------------------------------------------------------------------------------------------


class Case:
    live: set = set()

    def __init__(self, args, n: int, attention: str):
        self.n, self.attention = n, attention
        self.batch = args.tokens_per_step // n
        spec = {"n": n, "attention": attention, "batch": self.batch, "k": min(args.k, n),
                "model": args.model, "threads": args.threads, "device": args.device,
                "dtype": args.dtype, "activation_checkpointing": args.activation_checkpointing,
                "warmup": args.warmup, "warmup_len": args.warmup_len}
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        Case.live.add(self)
        self.row = {"n": n, "attention": attention, "batch": self.batch, "k": spec["k"] if attention == "linformer" else None,
                    "steps": [], "status": "ok"}

    def read(self, deadline_cpu: float | None = None, budget: int | None = None) -> dict | None:
        """The worker's next reply; None (and the worker ended) past the CPU deadline or the budget."""
        start = cpu_seconds(self.proc.pid)
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    return {"status": "died", "returncode": self.proc.wait()}
                return json.loads(line)
            if deadline_cpu is not None and cpu_seconds(self.proc.pid) - start > deadline_cpu:
                self.stop()
                return {"status": "too_slow", "cpu_s_when_stopped": deadline_cpu}
            if budget is not None and rss_bytes(str(self.proc.pid)) > budget:
                self.stop()
                return {"status": "over_budget", "budget_bytes": budget}

    def ask_step(self, deadline_cpu=None, budget=None) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.read(deadline_cpu, budget)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        Case.live.discard(self)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        self.stop()


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def summarise(row: dict, tokens: int, clock: str) -> None:
    ok = [s for s in row["steps"] if s.get("status") == "ok"]
    if not ok:
        return
    t = median([s[clock] for s in ok])
    row.update(step_s=t, wall_s=median([s["wall_s"] for s in ok]), tokens_per_s=tokens / t,
               peak_gib=max(s["peak_bytes"] for s in ok) / GIB,
               mem_per_seq_gib=max(s["step_bytes"] for s in ok) / row["batch"] / GIB)
    if clock == "cpu_s":
        row["cpu_share"] = median([s["cpu_s"] / s["wall_s"] for s in ok])


def machine(device: str) -> dict:
    from linformer_train.profiling.machine import machine_info

    return {**machine_info(device), "load_average_start": os.getloadavg()}


def run(args) -> dict:
    clock = "cpu_s" if args.device == "cpu" else "wall_s"
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(args.device),
              "clock": clock, "tokens_per_step": args.tokens_per_step, "model": args.model, "rows": []}
    budget = int(args.budget_gib * GIB) if args.budget_gib else None
    full_stopped, stop_n = None, None  # full attention stops for every n above stop_n
    for n in args.seq_lens:  # in the order given: the lengths that matter most can go first
        skip_full = (stop_n is not None and n > stop_n) or (args.full_max_n is not None and n > args.full_max_n)
        attentions = [a for a in args.attention if a == "linformer" or not skip_full]
        if "full" in args.attention and skip_full:
            report["rows"].append({"n": n, "attention": "full", "batch": args.tokens_per_step // n,
                                   "status": "not run", "steps": []})
        cases = {a: Case(args, n, a) for a in attentions}
        for a, case in cases.items():
            info = case.read(budget=budget if args.device == "cpu" else None)
            if not info.get("ready"):
                case.row["status"] = info.get("status", "failed")
            else:
                case.row["params"] = info["params"]
        for r in range(args.repeats):  # round-robin: one step of each attention in turn
            for a, case in cases.items():
                if case.row["status"] != "ok":
                    continue
                deadline = None
                if a == "full" and args.device == "cpu" and cases.get("linformer"):
                    lin = [s[clock] for s in cases["linformer"].row["steps"] if s.get("status") == "ok"]
                    deadline = args.slowdown_limit * max(lin) if lin else None
                res = case.ask_step(deadline, budget if args.device == "cpu" else None)
                case.row["steps"].append(res)
                if res.get("status") != "ok":
                    case.row["status"] = res["status"]
                print(f"n={n} {a} step {r}: {json.dumps(res)}", file=sys.stderr, flush=True)
        for case in cases.values():
            case.close()
            summarise(case.row, args.tokens_per_step, clock)
            report["rows"].append(case.row)
        if "full" in cases:
            row, lin = cases["full"].row, cases.get("linformer")
            if lin is not None and "step_s" in lin.row and "step_s" in row:
                row["slowdown_vs_linformer"] = row["step_s"] / lin.row["step_s"]
                if row["slowdown_vs_linformer"] > args.slowdown_limit:
                    full_stopped = f"{row['slowdown_vs_linformer']:.1f}x slower than Linformer at n={n}"
            if row["status"] != "ok":
                full_stopped = f"{row['status']} at n={n}"
            if full_stopped and stop_n is None:
                stop_n = n
        report["full_stopped"] = full_stopped
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1))
    report["machine"]["load_average_end"] = os.getloadavg()
    lin = {r["n"]: r for r in report["rows"] if r["attention"] == "linformer" and "tokens_per_s" in r}
    if 8192 in lin:
        report["tokens_per_s_vs_n8192"] = {n: r["tokens_per_s"] / lin[8192]["tokens_per_s"] for n, r in lin.items()}
    return report


def markdown(report: dict) -> str:
    rows = {(r["n"], r["attention"]): r for r in report["rows"]}
    ns = sorted({r["n"] for r in report["rows"]})
    unit = "one core" if report["clock"] == "cpu_s" else "wall"
    out = [f"| n | batch | Linformer tok/s ({unit}) | full tok/s | Linformer / full | Linformer GiB per seq | "
           f"full GiB per seq | Linformer peak GiB | full peak GiB | Linformer tok/s vs n=8192 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    rel = report.get("tokens_per_s_vs_n8192", {})
    for n in ns:
        lin, full = rows.get((n, "linformer"), {}), rows.get((n, "full"), {})
        def cell(r, key, spec):
            return format(r[key], spec) if key in r else (r.get("status", "not run") if r else "not run")
        ratio = (f"{lin['tokens_per_s'] / full['tokens_per_s']:.2f}x"
                 if "tokens_per_s" in lin and "tokens_per_s" in full else "")
        out.append(f"| {n} | {lin.get('batch', full.get('batch', ''))} | {cell(lin, 'tokens_per_s', ',.0f')} | "
                   f"{cell(full, 'tokens_per_s', ',.0f')} | {ratio} | {cell(lin, 'mem_per_seq_gib', '.3f')} | "
                   f"{cell(full, 'mem_per_seq_gib', '.3f')} | {cell(lin, 'peak_gib', '.2f')} | "
                   f"{cell(full, 'peak_gib', '.2f')} | {format(rel[n], '.2f') if n in rel else ''} |")
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for attention, label, style in (("linformer", "Linformer", "o-"), ("full", "full attention (SDPA)", "s--")):
        rows = sorted((r for r in report["rows"] if r["attention"] == attention and "tokens_per_s" in r),
                      key=lambda r: r["n"])
        if not rows:
            continue
        if attention == "linformer":
            label += f" k={rows[0]['k']}"
        ns = [r["n"] for r in rows]
        ax1.plot(ns, [r["tokens_per_s"] for r in rows], style, label=label)
        ax2.plot(ns, [r["mem_per_seq_gib"] for r in rows], style, label=label)
    unit = "one core, CPU time" if report["clock"] == "cpu_s" else "wall clock"
    ax1.set(xscale="log", xlabel="n (sequence length)", ylabel=f"tokens/s ({unit})",
            title=f"{report['tokens_per_step']:,} tokens per step")
    ax2.set(xscale="log", yscale="log", xlabel="n (sequence length)", ylabel="step memory per sequence (GiB)",
            title="memory per sequence")
    for ax in (ax1, ax2):
        ax.set_xticks(sorted({r["n"] for r in report["rows"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_locator(matplotlib.ticker.NullLocator())
        ax.tick_params(axis="x", labelrotation=45)
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_ylim(bottom=0)
    fig.suptitle(f"{report['model'].get('preset')} preset, MLM training step: {report['machine'].get('gpu') or report['machine']['cpu']}",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("-n", "--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--attention", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another model setting (dropout defaults to 0 here: CPU SDPA has no dropout kernel)")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per case, round-robin")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps on a short input per case")
    p.add_argument("--warmup-len", type=int, default=512,
                   help="tokens of the warm-up input; 0: the timed step's own batch (use on a GPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--slowdown-limit", type=float, default=10.0)
    p.add_argument("--full-max-n", type=int, default=None,
                   help="run full attention only up to this n (its step time grows ~quadratically)")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="CPU: end a worker whose RSS passes this (default 80%% of MemAvailable)")
    p.add_argument("--json", default=None, help="report file (default runs/bench_length/<time>.json)")
    p.add_argument("--plot", default=None, help="write the figure here (PNG)")
    args = p.parse_args(argv)
    bad = [n for n in args.seq_lens if n <= 0 or args.tokens_per_step % n]
    if bad:
        p.error(f"--tokens-per-step {args.tokens_per_step} is not a positive multiple of n={bad[0]}")
    if args.k < 1:
        p.error(f"--k {args.k} must be positive")
    model = {"preset": args.preset, "dropout": 0.0, "attention_dropout": 0.0}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r} is not KEY=VALUE")
        import yaml

        model[key.removeprefix("model.")] = yaml.safe_load(value)
    args.model = model
    if args.budget_gib is None and args.device == "cpu":
        args.budget_gib = 0.8 * meminfo_bytes("MemAvailable") / GIB
    if args.json is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.json = f"runs/bench_length/{stamp}.json"
    return args


def meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/meminfo has no {field}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]))
        return 0
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the workers are ended too
    try:
        from linformer_train.config import ConfigError, config_from_dict

        for n in args.seq_lens:  # every case's config checked before anything runs
            config_from_dict({"model": dict(args.model, max_seq_len=n, k=min(args.k, n))})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = run(args)
    finally:  # an interrupted run leaves no worker behind
        for case in list(Case.live):
            case.stop()
    print(json.dumps(report, indent=1))
    print(markdown(report), file=sys.stderr)
    if args.plot:
        plot(report, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
