"""Measuring cases: time (median of repeats, synchronised) and step memory, in process or in a
fresh worker process per case, and a sweep over many cases."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from linformer_train.config import ModelConfig, k_schedule
from linformer_train.profiling.build import _is_oom, _sync, build_step, warm_runtime
from linformer_train.profiling.cases import GIB, MIB, Case, case_flops, check_case, format_k
from linformer_train.profiling.estimate import estimate_case_bytes
from linformer_train.profiling.machine import wait_for_idle_cpu
from linformer_train.profiling.memory import RssWatch, current_rss, peak_rss, reset_peak_rss
from linformer_train.profiling.ratios import add_ratios
from linformer_train.train.mfu import mfu

_RESULT_MARK = "@@PROFILE_RESULT@@ "
_OVER_BUDGET_EXIT = 3


def _row_base(case: Case, cfg: Optional[ModelConfig]) -> dict:
    m = case.model
    ks = k_schedule(cfg) if cfg is not None and cfg.attention == "linformer" else None
    return {
        "label": case.label, "impl": case.impl, "attention": m.get("attention"),
        "k": format_k(m.get("k")) if m.get("attention") == "linformer" else "",
        "k_schedule": ks, "projection": m.get("projection") if m.get("attention") == "linformer" else "",
        "sharing": m.get("sharing") if m.get("attention") == "linformer" else "",
        "target": case.target, "mode": case.mode, "dtype": case.dtype, "device": case.device,
        "n": case.seq_len, "batch": case.batch_size, "layers": m.get("num_layers"),
        "hidden": m.get("hidden_size"), "heads": m.get("num_heads"), "ffn": m.get("ffn_size"),
        "vocab": m.get("vocab_size"), "dropout": m.get("dropout"),
        "attention_dropout": m.get("attention_dropout"),
        "warmup": case.warmup, "repeats": case.repeats,
        "status": "ok", "reason": "",
    }


def run_case(case: Case, peak_flops: Optional[float] = None, watch: Optional[RssWatch] = None) -> dict:
    """Build and measure one case in this process. Returns a row (status ok | oom | error)."""
    cfg = check_case(case)
    row = _row_base(case, cfg)
    device = torch.device(case.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if case.threads and torch.get_num_threads() != case.threads:
        torch.set_num_threads(case.threads)
    torch.manual_seed(0)
    failure: Optional[BaseException] = None
    module = step = optimizer = None
    times: list[float] = []
    try:
        if device.type == "cuda":
            if case.budget_bytes is not None:
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, case.budget_bytes / total), device)
            gc.collect()
            torch.cuda.empty_cache()
            base_alloc = torch.cuda.memory_allocated(device)
        warm_runtime(device)
        module, step, optimizer = build_step(case, cfg, device)
        row["params"] = sum(p.numel() for p in module.parameters())
        gc.collect()
        if device.type == "cuda":
            _sync(device)
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            row["mem_method"] = "cuda.max_memory_allocated"
        else:
            baseline = current_rss()
            exact = reset_peak_rss()
            if watch is not None:
                watch.reset()
            row["mem_method"] = "rss_hwm" if exact else ("rss_sampled" if watch else "rss_now")
        cpu_times: list[float] = []
        for i in range(case.warmup + case.repeats):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            if i >= case.warmup:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
        if device.type == "cpu":
            # Our threads' CPU time over wall time x threads: well under 1 means other processes
            # took cores from us while timing (the number to read before trusting a CPU timing).
            row["cpu_share"] = sum(cpu_times) / (sum(times) * torch.get_num_threads())
            row["loadavg_1m"] = os.getloadavg()[0]
            row["threads"] = torch.get_num_threads()
            row["wall_ms"] = statistics.median(times) * 1e3
            row["cpu_ms"] = statistics.median(cpu_times) * 1e3
            if case.clock == "cpu":
                times = cpu_times
        if device.type == "cuda":
            peak_total = torch.cuda.max_memory_allocated(device)
            row["mem_baseline_mib"] = (baseline - base_alloc) / MIB
        else:
            hwm = peak_rss() if row["mem_method"] == "rss_hwm" else None
            peak_total = hwm if hwm is not None else (watch.max_rss if watch else current_rss())
            row["mem_baseline_mib"] = baseline / MIB
        row["mem_peak_mib"] = peak_total / MIB
        row["mem_step_mib"] = max(peak_total - baseline, 0) / MIB
    except Exception as exc:  # noqa: BLE001 - an OOM or a failure becomes the row's status
        failure = exc
    if failure is not None:
        row["status"] = "oom" if _is_oom(failure) else "error"
        first = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
        if row["status"] == "oom":  # keep "CUDA out of memory. Tried to allocate X GiB."
            first = ". ".join(first.split(". ")[:2]).rstrip(".") + "."
        row["reason"] = f"{type(failure).__name__}: {first[:300]}"
        failure.__traceback__ = None
    del module, step, optimizer, failure
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if case.budget_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    if row["status"] == "ok":
        if case.budget_bytes is not None and row["mem_peak_mib"] * MIB > case.budget_bytes:
            row["status"] = "over_budget"
            row["reason"] = (f"peak {row['mem_peak_mib'] / 1024:.2f} GiB > budget "
                             f"{case.budget_bytes / GIB:.2f} GiB")
        _fill_speed(row, case, cfg, times, peak_flops)
    return row


def _fill_speed(row: dict, case: Case, cfg: ModelConfig, times: list[float],
                peak_flops: Optional[float]) -> None:
    med = statistics.median(times)
    flops = case_flops(case, cfg)
    row.update({
        "time_ms": med * 1e3, "time_min_ms": min(times) * 1e3, "time_max_ms": max(times) * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "tokens_per_s": case.batch_size * case.seq_len / med,
        "clock": case.clock, "flops": flops, "tflops": flops / med / 1e12,
        "mfu": mfu(flops, med, peak_flops) if peak_flops else None,
    })


def _worker_main() -> None:
    """``python -m linformer_train.profiling --worker``: one case from stdin, one result line out."""
    spec = json.loads(sys.stdin.read())
    case = Case(**spec["case"])
    if case.threads:
        torch.set_num_threads(case.threads)

    def over_budget(rss: int) -> None:
        row = _row_base(case, None)
        row.update(status="over_budget", mem_peak_mib=rss / MIB, mem_method="rss_watchdog",
                   reason=f"RSS reached {rss / GIB:.2f} GiB > budget {case.budget_bytes / GIB:.2f} GiB; "
                          f"stopped")
        sys.stdout.write(_RESULT_MARK + json.dumps(row) + "\n")
        sys.stdout.flush()
        os._exit(_OVER_BUDGET_EXIT)

    with RssWatch(case.budget_bytes, on_exceed=over_budget) as watch:
        row = run_case(case, spec.get("peak_flops"), watch)
    sys.stdout.write(_RESULT_MARK + json.dumps(row) + "\n")
    sys.stdout.flush()


def run_case_isolated(case: Case, peak_flops: Optional[float] = None,
                      timeout: Optional[float] = None) -> dict:
    """Run a case in a fresh Python process (the honest way to read a CPU peak); never raises for
    a failure inside the case: the row's status says what happened."""
    check_case(case)
    spec = {"case": dataclasses.asdict(case), "peak_flops": peak_flops}
    env = dict(os.environ)
    # glibc raises its mmap threshold after each free (up to 32 MiB), after which freed tensors stay
    # in the heap and RSS depends on the allocation history (+-100 MiB at n=8192). A fixed threshold
    # maps every block >= 128 KiB on its own and returns it on free: RSS then follows live tensors.
    if case.malloc == "tensor":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "linformer_train.profiling", "--worker"],
                              input=json.dumps(spec), capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        row = _row_base(case, None)
        row.update(status="error", reason=f"timed out after {timeout:.0f} s")
        return row
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    row = _row_base(case, None)
    if proc.returncode < 0:
        sig = -proc.returncode
        why = "the kernel's OOM killer" if sig == 9 else "a signal"
        row.update(status="oom" if sig == 9 else "error",
                   reason=f"worker killed by signal {sig} (likely {why})")
    else:
        tail = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1:] or ["no output"]
        row.update(status="error", reason=f"worker exited {proc.returncode}: {tail[0][:300]}")
    return row


def measure_case(case: Case, *, isolate: Optional[bool] = None, peak_flops: Optional[float] = None,
                 precheck: bool = True, timeout: Optional[float] = None) -> dict:
    """Run a case the right way for its device (CPU: isolated subprocess; CUDA: in process), after
    skipping it without a run when the analytic estimate is far over the budget."""
    if precheck and case.budget_bytes is not None:
        need = estimate_case_bytes(case)
        if need > 1.5 * case.budget_bytes:
            row = _row_base(case, check_case(case))
            row.update(status="over_budget", est_mib=need / MIB,
                       reason=f"not run: estimated {need / GIB:.1f} GiB > budget "
                              f"{case.budget_bytes / GIB:.1f} GiB")
            return row
    if isolate is None:
        isolate = not case.device.startswith("cuda")
    if isolate:
        return run_case_isolated(case, peak_flops, timeout)
    return run_case(case, peak_flops)


def run_sweep(cases: Sequence[Case], *, isolate: Optional[bool] = None,
              peak_flops: Optional[float] = None, on_row: Optional[Callable[[dict], None]] = None,
              timeout: Optional[float] = None, idle_wait: Optional[tuple[float, float]] = None
              ) -> list[dict]:
    """Measure every case (in order), then add the ratios against the baselines. ``idle_wait``
    = (max_busy, timeout): before each CPU case, wait for the machine to be that idle."""
    rows = []
    for case in cases:
        busy = None
        if idle_wait is not None and case.device == "cpu":
            busy = wait_for_idle_cpu(*idle_wait)
        row = measure_case(case, isolate=isolate, peak_flops=peak_flops, timeout=timeout)
        if busy is not None:
            row["cpu_busy_before"] = busy
        rows.append(row)
        if on_row is not None:
            on_row(row)
    add_ratios(rows)
    return rows
