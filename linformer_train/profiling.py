"""Memory and speed profiling of the encoder: sweeps, max batch under a budget, and a no-run estimate.

The measuring code behind ``tools/profile.py``. One *case* is one configuration (model dims, n, k,
attention kind, batch, mode, dtype, device); :func:`run_case` builds it, warms it up, times the
median of repeats (synchronised with the device) and records the peak memory of the step:

* CUDA: ``torch.cuda.max_memory_allocated`` over the warm-up and the repeats; the step's memory is
  that peak minus what was allocated once the model, optimizer and inputs were built.
* CPU: each case runs in a fresh subprocess (:func:`run_case_isolated`), so no allocator cache of an
  earlier case hides memory. After the build, the kernel's peak-RSS counter is reset
  (``/proc/self/clear_refs`` = 5, Linux >= 4.0) and read back (``VmHWM``) after the last repeat: the
  step's memory is that peak minus the idle RSS after the build. Where the reset is refused, a
  thread samples RSS every 2 ms instead (``mem_method`` says which). A watchdog stops the
  subprocess cleanly when its RSS passes the budget, so an over-budget case is a skip, not a crash.

Ratios follow the paper's Table 3: a case's speed-up is baseline time / its time, memory saved is
baseline step memory / its step memory, against both full-attention baselines at the same n, batch,
mode and dims: ``naive`` (softmax(QK^T)V written out, the paper's O(n^2) baseline) and ``full``
(torch SDPA, today's baseline).

FLOPs come from :mod:`linformer_train.model.flops` (the formula the trainer's MFU uses).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from linformer_train.config import ConfigError, ModelConfig, config_from_dict, k_schedule, load_config
from linformer_train.model.flops import encoder_flops, mlm_head_flops, mlm_train_flops

MODES = ("forward", "backward", "train")
"""forward: eval + no_grad (inference) | backward: forward + backward, grads zeroed |
train: forward + backward + AdamW step (what one training step costs)."""
TARGETS = ("encoder", "mlm", "layer")
"""encoder: LinformerEncoder, backward from a fixed output gradient | mlm: LinformerForMLM on its
loss | layer: one self-attention layer (B, L, D) -> (B, L, D)."""
IMPLS = ("project", "pypi")
"""project: this repo's model | pypi: lucidrains' ``linformer`` package (layer target only)."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASELINES = {"naive": "naive", "sdpa": "full"}
"""Ratio suffix -> attention kind of the baseline."""

MIB = 2**20
GIB = 2**30
_RESULT_MARK = "@@PROFILE_RESULT@@ "
_OVER_BUDGET_EXIT = 3


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One configuration to measure. ``model`` holds ModelConfig fields (max_seq_len is n)."""

    model: dict
    seq_len: int
    batch_size: int = 1
    mode: str = "backward"
    target: str = "encoder"
    impl: str = "project"
    dtype: str = "fp32"
    device: str = "cpu"
    warmup: int = 1
    repeats: int = 3
    mask_prob: float = 0.15
    budget_bytes: Optional[int] = None
    """Peak total memory allowed (CPU: process RSS; CUDA: allocated); None = no check."""
    threads: Optional[int] = None
    """CPU threads for torch (None: torch's default, one per core)."""
    clock: str = "wall"
    """wall (what a user waits; synchronised with the device) | cpu (the process's CPU time: on a
    shared CPU with threads=1 it is robust to other jobs taking cores, where wall time is not)."""
    malloc: str = "tensor"
    """CPU workers: tensor (a fixed glibc mmap threshold, so RSS follows live tensors; each large
    block is mapped afresh, which can add page-fault time) | default (glibc as users run it: the
    timing users see, RSS that depends on allocation history)."""

    def model_config(self) -> ModelConfig:
        return config_from_dict({"model": dict(self.model)}).model

    @property
    def label(self) -> str:
        return case_label(self.model, self.impl)


def case_label(model: dict, impl: str = "project") -> str:
    """Short, unique-per-variant name: 'linformer k=128', 'full (sdpa)', 'naive', 'pypi k=128 kv'."""
    kind = model.get("attention", "linformer")
    if kind == "full":
        return "full (sdpa)"
    if kind == "naive":
        return "naive"
    name = "pypi linformer" if impl == "pypi" else "linformer"
    label = f"{name} k={format_k(model.get('k', 128))}"
    if model.get("projection", "linear") != "linear":
        label += f" {model['projection']}"
    if model.get("sharing", "headwise") != "headwise":
        label += f" {model['sharing']}"
    return label


def format_k(k: Any) -> str:
    if isinstance(k, dict):
        return f"{k.get('first')}->{k.get('last')}"
    if isinstance(k, (list, tuple)):
        return f"{k[0]}..{k[-1]}" if len(set(k)) > 1 else str(k[0])
    return str(k)


def parse_k(text: str) -> Any:
    """A CLI k: '128', '[256, 256, 128, 128]' or '{first: 256, last: 64, multiple_of: 16}'."""
    import yaml

    text = str(text).strip()
    if text.isdigit():
        return int(text)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if isinstance(value, (int, list, dict)) and not isinstance(value, bool):
        return value
    raise ConfigError(
        f"--k {text!r} is not an int, a list [a, b, ...] or a rule {{first: A, last: B}}"
    )


def model_section(preset: Optional[str], config_files: Sequence[str] = (),
                  overrides: Sequence[str] = ()) -> dict:
    """The model section (as a dict) of a preset and/or config files plus dotlist overrides."""
    extra = [f"model.preset={preset}"] if preset else []
    cfg = load_config(list(config_files), [*extra, *overrides])
    return dataclasses.asdict(cfg.model)


def build_cases(base_model: dict, *, seq_lens: Sequence[int], attentions: Sequence[str],
                ks: Sequence[Any] = (128,), projections: Sequence[str] = ("linear",),
                sharings: Sequence[str] = ("headwise",), batch_sizes: Sequence[int] = (1,),
                modes: Sequence[str] = ("backward",), target: str = "auto",
                impls: Sequence[str] = ("project",), num_layers: Optional[int] = None,
                **common) -> list[Case]:
    """The cartesian sweep, validated up front: the first impossible case raises ConfigError.

    k, projection and sharing vary only the Linformer cases; each baseline appears once per
    (n, batch, mode). ``target='auto'`` is mlm for train and encoder otherwise.
    """
    for name, values, allowed in (("mode", modes, MODES), ("impl", impls, IMPLS),
                                  ("target", [target], (*TARGETS, "auto"))):
        for v in values:
            if v not in allowed:
                raise ConfigError(f"--{name} {v!r} is not allowed; choose one of {', '.join(allowed)}")
    variants: list[tuple[dict, str]] = []
    for att in attentions:
        if att != "linformer":  # baselines: always the project's own modules
            variants.append(({"attention": att}, "project"))
            continue
        for impl in impls:
            for k in ks:
                for proj in projections:
                    for sharing in sharings:
                        variants.append(({"attention": att, "k": k, "projection": proj,
                                          "sharing": sharing}, impl))
    cases = []
    for mode in modes:
        tgt = target if target != "auto" else ("mlm" if mode == "train" else "encoder")
        for n in seq_lens:
            for b in batch_sizes:
                for change, impl in variants:
                    model = {**base_model, **change, "max_seq_len": int(n)}
                    if num_layers is not None:
                        model["num_layers"] = int(num_layers)
                    model["preset"] = None
                    case = Case(model=model, seq_len=int(n), batch_size=int(b), mode=mode,
                                target=tgt, impl=impl, **common)
                    check_case(case)
                    cases.append(case)
    return cases


def check_case(case: Case) -> ModelConfig:
    """Validate a case; ConfigError (one line) for what cannot run at all."""
    if case.mode not in MODES:
        raise ConfigError(f"mode {case.mode!r} is not allowed; choose one of {', '.join(MODES)}")
    if case.target not in TARGETS:
        raise ConfigError(f"target {case.target!r} is not allowed; choose one of {', '.join(TARGETS)}")
    if case.dtype not in DTYPES:
        raise ConfigError(f"dtype {case.dtype!r} is not allowed; choose one of {', '.join(DTYPES)}")
    if case.batch_size < 1 or case.seq_len < 1:
        raise ConfigError(f"batch size {case.batch_size} and n {case.seq_len} must be positive")
    if case.clock not in ("wall", "cpu") or (case.clock == "cpu" and case.device != "cpu"):
        raise ConfigError(f"clock {case.clock!r}: use wall, or cpu with --device cpu")
    if case.malloc not in ("tensor", "default"):
        raise ConfigError(f"malloc {case.malloc!r}: use tensor or default")
    if case.threads is not None and case.threads < 1:
        raise ConfigError(f"threads={case.threads} must be at least 1")
    if case.warmup < 0 or case.repeats < 1:
        raise ConfigError(f"warmup={case.warmup} must be >= 0 and repeats={case.repeats} >= 1")
    if case.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {case.device!r} asked for but torch sees no CUDA device")
    cfg = case.model_config()  # k > n, unknown choices, dims: ConfigError from validate()
    if case.impl == "pypi":
        if case.target != "layer":
            raise ConfigError("--impl pypi compares one attention layer; use --target layer")
        if cfg.attention != "linformer" or cfg.projection != "linear" or cfg.sharing not in ("headwise", "kv"):
            raise ConfigError(
                f"the linformer package has linear projections with headwise or kv sharing only "
                f"(got projection={cfg.projection}, sharing={cfg.sharing})")
        if len(set(k_schedule(cfg))) != 1:
            raise ConfigError("the linformer package takes one k for all layers")
    return cfg


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


def attention_layer_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of one self-attention layer (qkv, projections, attention, out) of layer 0."""
    k0 = k_schedule(cfg)[0]
    one = dataclasses.replace(cfg, num_layers=1, ffn_size=0, k=k0)
    return encoder_flops(one, seq_len)


def case_flops(case: Case, cfg: Optional[ModelConfig] = None) -> float:
    """Analytic matmul FLOPs of one step of the case (model/flops.py; backward = 2 forwards)."""
    cfg = cfg or case.model_config()
    n, b = case.seq_len, case.batch_size
    grad = case.mode != "forward"
    if case.target == "mlm":
        if grad:
            return b * mlm_train_flops(cfg, n, case.mask_prob)
        return b * (encoder_flops(cfg, n) + mlm_head_flops(cfg, n))  # logits at every position
    per_seq = encoder_flops(cfg, n) if case.target == "encoder" else attention_layer_flops(cfg, n)
    return b * per_seq * (3 if grad else 1)


# --------------------------------------------------------------------------------------------------
# Memory probes
# --------------------------------------------------------------------------------------------------


def _read_status_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident memory of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm = _read_status_kib("VmHWM")
    return hwm is not None and hwm * 1024 <= current_rss() + 16 * MIB


def peak_rss() -> Optional[int]:
    hwm = _read_status_kib("VmHWM")
    return None if hwm is None else hwm * 1024


class RssWatch:
    """Samples RSS every ``interval`` s: keeps the maximum, and ends the process cleanly (exit code
    3, a result line on stdout) when RSS passes ``budget`` bytes. Only used inside a worker."""

    def __init__(self, budget: Optional[int], interval: float = 0.002, on_exceed=None):
        self.budget, self.interval, self.on_exceed = budget, interval, on_exceed
        self.max_rss = current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self.max_rss = current_rss()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = current_rss()
            self.max_rss = max(self.max_rss, rss)
            if self.budget is not None and rss > self.budget and self.on_exceed is not None:
                self.on_exceed(rss)
            self._stop.wait(self.interval)


# --------------------------------------------------------------------------------------------------
# Building what one case runs
# --------------------------------------------------------------------------------------------------


class MasterWeightAdamW:
    """AdamW on fp32 master copies of 16-bit parameters, as DeepSpeed's bf16/fp16 optimizers keep
    them: 16-bit params and grads in the model, fp32 grads, master weights and two moments here."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-4):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr)

    def step(self) -> None:
        for m, p in zip(self.master, self.params):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        for m in self.master:
            m.grad = None


def _pypi_layer(cfg: ModelConfig) -> nn.Module:
    try:
        from linformer import LinformerSelfAttention as PypiLinformerSelfAttention
    except ImportError as exc:
        raise ConfigError("--impl pypi needs the `linformer` package: pip install linformer") from exc
    return PypiLinformerSelfAttention(
        dim=cfg.hidden_size, seq_len=cfg.max_seq_len, k=k_schedule(cfg)[0], heads=cfg.num_heads,
        share_kv=(cfg.sharing == "kv"), dropout=cfg.attention_dropout)


def build_step(case: Case, cfg: ModelConfig, device: torch.device
               ) -> tuple[nn.Module, Callable[[], None], Any]:
    """(module, step(), optimizer) for the case, everything already on the device."""
    from linformer_train.model import LinformerEncoder, LinformerForMLM
    from linformer_train.model.encoder import build_attention, init_weights

    dtype = DTYPES[case.dtype]
    B, L = case.batch_size, case.seq_len
    gen = torch.Generator().manual_seed(0)
    with torch.device(device):  # initialise where it runs: a base model inits in ms on a GPU
        if case.target == "layer":
            module = _pypi_layer(cfg) if case.impl == "pypi" else build_attention(cfg, k_schedule(cfg)[0])
        else:
            module = LinformerEncoder(cfg) if case.target == "encoder" else LinformerForMLM(cfg)
            if case.target == "encoder":
                init_weights(module, cfg)
    if case.target == "layer":
        inputs = (torch.randn(B, L, cfg.hidden_size, generator=gen),)
    else:
        inputs = (torch.randint(1, cfg.vocab_size, (B, L), generator=gen),)
    module = module.to(device=device, dtype=dtype)
    inputs = tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                   for t in inputs)
    labels = None
    if case.target == "mlm" and case.mode != "forward":
        predicted = max(1, round(case.mask_prob * L))
        chosen = torch.rand(B, L, generator=gen).argsort(dim=1)[:, :predicted]
        labels = torch.full((B, L), -100, dtype=torch.long)
        labels.scatter_(1, chosen, inputs[0].cpu().gather(1, chosen))
        labels = labels.to(device)
    grad_out = None
    if case.target != "mlm" and case.mode != "forward":
        grad_out = torch.randn(B, L, cfg.hidden_size, generator=gen).to(device=device, dtype=dtype)

    optimizer = None
    if case.mode == "train":
        optimizer = (torch.optim.AdamW(module.parameters(), lr=1e-4) if dtype == torch.float32
                     else MasterWeightAdamW(module.parameters()))

    if case.mode == "forward":
        module.eval()

        def step() -> None:
            with torch.no_grad():
                module(*inputs)
        return module, step, optimizer

    module.train()

    def step() -> None:
        if case.target == "mlm":
            out = module(*inputs, labels=labels)
            (out.loss_sum / out.num_predicted).backward()
        else:
            module(*inputs).backward(grad_out)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            module.zero_grad(set_to_none=True)
    return module, step, optimizer


def warm_runtime(device: torch.device) -> None:
    """First use of autograd, the thread pools and the GEMM/SDPA kernels allocates once per process
    (~20-40 MiB of RSS on CPU): pay it on a toy problem before the baseline is read, so a case's step
    memory is its own."""
    emb = nn.Embedding(16, 32).to(device)
    lin = nn.Linear(32, 32).to(device)
    norm = nn.LayerNorm(32).to(device)
    x = norm(lin(emb(torch.arange(8, device=device)[None])))         # (1, 8, 32)
    q = torch.nn.functional.gelu(x).view(1, 8, 2, 16).transpose(1, 2)  # (1, 2, 8, 16)
    y = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.nn.functional.dropout(torch.matmul(y, q.transpose(-1, -2)), 0.1).sum().backward()
    opt = torch.optim.AdamW([*lin.parameters(), *emb.parameters(), *norm.parameters()], lr=1e-4)
    opt.step()
    _sync(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------------


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
        "mfu": (flops / med / peak_flops) if peak_flops else None,
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
    root = str(Path(__file__).resolve().parent.parent)
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


def wait_for_idle_cpu(max_busy: float, timeout: float, window: float = 1.0) -> float:
    """Wait (at most ``timeout`` s) until the machine's CPU use over ``window`` s is below
    ``max_busy`` (0-1), so a CPU timing does not share cores with other jobs. Returns the last use."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        busy = psutil.cpu_percent(interval=window) / 100
        if busy <= max_busy or time.monotonic() >= deadline:
            return busy


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


# --------------------------------------------------------------------------------------------------
# Ratios against the baselines (the paper's Table 3)
# --------------------------------------------------------------------------------------------------

_MATCH = ("target", "mode", "dtype", "device", "n", "batch", "layers", "hidden", "heads", "ffn",
          "vocab", "dropout", "attention_dropout")


def add_ratios(rows: list[dict]) -> None:
    """For every row, ``speedup_vs_X`` = X's time / its time and ``mem_saved_vs_X`` = X's step
    memory / its step memory, X in naive and sdpa, matched on everything but the attention.
    ``flop_ratio_vs_sdpa`` is the analytic FLOP ratio and ``flop_efficiency_vs_sdpa`` the share of
    it that the measured speed-up reaches. A baseline that did not run leaves None and a note."""
    index = {}
    for r in rows:
        if r.get("attention") in BASELINES.values() and r.get("impl", "project") == "project":
            index[(r["attention"],) + tuple(r.get(f) for f in _MATCH)] = r
    for r in rows:
        for suffix, kind in BASELINES.items():
            base = index.get((kind,) + tuple(r.get(f) for f in _MATCH))
            r[f"speedup_vs_{suffix}"] = r[f"mem_saved_vs_{suffix}"] = None
            if base is None:
                continue
            if base.get("status") != "ok":
                r[f"note_vs_{suffix}"] = f"{base['label']} {base['status']}"
                continue
            if r.get("status") != "ok":
                continue
            r[f"speedup_vs_{suffix}"] = base["time_ms"] / r["time_ms"]
            if r.get("mem_step_mib") and base.get("mem_step_mib"):
                r[f"mem_saved_vs_{suffix}"] = base["mem_step_mib"] / r["mem_step_mib"]
            if suffix == "sdpa" and r.get("flops"):
                r["flop_ratio_vs_sdpa"] = base["flops"] / r["flops"]
                r["flop_efficiency_vs_sdpa"] = r["speedup_vs_sdpa"] / r["flop_ratio_vs_sdpa"]


# --------------------------------------------------------------------------------------------------
# Max batch under a memory budget
# --------------------------------------------------------------------------------------------------


def find_max_batch(case: Case, budget_bytes: int, *, limit: int = 4096, refine: bool = True,
                   tolerance: float = 0.0, runner: Optional[Callable[[Case], dict]] = None) -> dict:
    """Largest batch whose peak total memory fits ``budget_bytes``: double from case.batch_size
    until a run fails (OOM, over budget), then bisect between the last fit and the first failure
    until they are 1 apart (or within ``tolerance`` x the last fit, to save runs on big batches).
    Returns {'max_batch', 'fit' (row of the largest fit), 'fail' (first failing row), 'tried'}."""
    run = runner or (lambda c: measure_case(c))
    tried: list[dict] = []

    def attempt(b: int) -> dict:
        row = run(dataclasses.replace(case, batch_size=b, budget_bytes=budget_bytes))
        tried.append(row)
        return row

    fit_row = fail_row = None
    b = max(1, case.batch_size)
    while b <= limit:
        row = attempt(b)
        if row["status"] != "ok":
            if row["status"] == "error":
                return {"max_batch": fit_row["batch"] if fit_row else 0, "fit": fit_row,
                        "fail": row, "tried": tried}
            fail_row = row
            break
        fit_row = row
        b *= 2
    if refine and fit_row is not None and fail_row is not None:
        lo, hi = fit_row["batch"], fail_row["batch"]
        while hi - lo > max(1, int(lo * tolerance)):
            mid = (lo + hi) // 2
            row = attempt(mid)
            if row["status"] == "ok":
                lo, fit_row = mid, row
            else:
                hi, fail_row = mid, row
    return {"max_batch": fit_row["batch"] if fit_row else 0, "fit": fit_row, "fail": fail_row,
            "tried": tried, "limit_reached": fail_row is None}


# --------------------------------------------------------------------------------------------------
# Estimates without a run: model states by ZeRO stage, activations
# --------------------------------------------------------------------------------------------------


def count_params(cfg: ModelConfig, target: str = "mlm") -> tuple[int, int]:
    """(total parameters, largest single module's own parameters), built on the meta device."""
    from linformer_train.model import LinformerEncoder, LinformerForMLM

    with torch.device("meta"):
        model = LinformerForMLM(cfg) if target == "mlm" else LinformerEncoder(cfg)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def model_state_bytes(params: int, dtype: str, zero_stage: int, num_gpus: int,
                      largest_layer_params: int = 0) -> dict:
    """Per-GPU bytes of parameters, gradients and optimizer states (AdamW) for a ZeRO stage.

    16-bit training keeps, per parameter, the 16-bit weight (2 B) and gradient (2 B) plus fp32
    gradient, master weight and two moments (4 + 4 + 8 B), the accounting of DeepSpeed's own
    estimator ("18 = 2 grads16 + 4 grads32 + 4 params32 + 8 optimizer states"). fp32 training keeps
    weight, gradient and moments (4 + 4 + 8 B). Stage 1 partitions the optimizer side (fp32 copies),
    stage 2 also the gradients, stage 3 also the weights (plus one gathered largest layer)."""
    N = max(1, num_gpus)
    mixed = dtype != "fp32"
    w, g = (2, 2) if mixed else (4, 4)
    opt = 16 if mixed else 8  # mixed: fp32 grads + master + 2 moments; fp32: 2 moments
    part = lambda nbytes, stage: params * nbytes / (N if zero_stage >= stage else 1)  # noqa: E731
    out = {
        "params": part(w, 3),
        "grads": part(g, 2),
        "optimizer": part(opt, 1),
    }
    if zero_stage == 3:
        out["gathered_layer"] = 4 * largest_layer_params  # DeepSpeed's allowance for a gathered layer
    out["total"] = sum(out.values())
    return out


def deepspeed_model_state_bytes(params: int, largest_layer_params: int, zero_stage: int,
                                num_gpus: int, gpus_per_node: Optional[int] = None) -> Optional[int]:
    """DeepSpeed's own per-GPU estimate (no offload) for ZeRO-2/3, from the functions behind
    ``estimate_zero2/3_model_states_mem_needs_all_cold`` (those print a table; these return it).
    None for stages 0/1, which DeepSpeed does not estimate. Imported lazily (GPU images lack it)."""
    if zero_stage not in (2, 3):
        return None
    per_node = gpus_per_node or num_gpus
    nodes = max(1, num_gpus // per_node)
    import contextlib
    import io
    import logging

    with contextlib.redirect_stdout(io.StringIO()):  # deepspeed logs its accelerator choice
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        try:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        except ImportError:  # the estimate's own accounting still stands
            return None
        if zero_stage == 2:
            _, gpu = estimate_zero2_model_states_mem_needs(
                params, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=False)
        else:
            _, gpu, _ = estimate_zero3_model_states_mem_needs(
                params, largest_layer_params, num_gpus_per_node=per_node, num_nodes=nodes,
                cpu_offload=False, cpu_offload_params=False)
    return int(gpu)


def activation_bytes(cfg: ModelConfig, seq_len: int, batch: int, dtype: str = "bf16", *,
                     training: bool = True, activation_checkpointing: bool = False,
                     target: str = "mlm", mask_prob: float = 0.15, device: str = "cuda") -> dict:
    """Analytic activation memory of one forward (+ backward) of ``batch`` sequences.

    Training: the tensors autograd saves, per layer (s = bytes per element, 2 for bf16/fp16):
    block input, q/k/v, attention output and its merged copy, two LayerNorm inputs and the FFN
    input, 9 BLD s; the FFN's GELU input and output, 2 BLF s; dropout masks, 1 byte per element
    (2 BLD + BLF) when dropout > 0; and the attention core: Linformer's projected K and V (2 B k D
    s) and SDPA's log-sum-exp; naive's fp32 probabilities (+ their 16-bit copy, + dropout mask
    and output) of B H n^2; full attention keeps only out + log-sum-exp on CUDA, but on CPU with
    attention dropout > 0 torch's SDPA falls back to its math kernel and keeps B H n^2 as naive
    does. Plus the embeddings, the MLM head at the predicted positions, and a transient for the
    backward of one layer (its activation gradients). Activation checkpointing keeps only each
    block's input and recomputes one block at a time. Inference: the largest one-layer working
    set. Accurate to ~25% against measurements (docs/PERFORMANCE.md compares them)."""
    s = DTYPES[dtype].itemsize
    B, L, D, H, Fd = batch, seq_len, cfg.hidden_size, cfg.num_heads, cfg.ffn_size
    BLD, BLF = B * L * D, B * L * Fd
    drop = cfg.dropout > 0 and training
    attn_drop = cfg.attention_dropout > 0 and training
    ks = k_schedule(cfg)
    sq = B * H * L * L
    sdpa_math = device == "cpu" and attn_drop  # CPU SDPA has no dropout in its fused kernel

    def core(k: int) -> tuple[float, float]:
        """(saved, backward transient) of the attention core of a layer."""
        lse = B * H * L * 4
        if cfg.attention == "naive":
            saved = sq * 4 + (sq * s if s < 4 else 0) + (sq * (1 + s) if attn_drop else 0)
            return saved + BLD * s, sq * (8 + s)
        if cfg.attention == "full":
            if sdpa_math:
                return BLD * s + sq * (2 * s + 1), sq * 2 * s
            return BLD * s + lse, 0.0
        slots = min(k, L)
        extra = B * H * L * slots * (2 * s + 1) if sdpa_math else lse
        return 2 * B * slots * D * s + BLD * s + extra, 2 * B * slots * D * s

    per_layer = []
    transient = 0.0
    for k in ks:
        c_saved, c_trans = core(k)
        saved = 8 * BLD * s + 2 * BLF * s + c_saved + 2 * B * L * 8  # + LayerNorm mean/rstd
        if drop:
            saved += 2 * BLD + BLF
        per_layer.append(saved)
        transient = max(transient, (2 * BLF + 4 * BLD) * s + c_trans)
    embed = BLD * s + (BLD if drop else 0) + (BLD * s if target != "encoder" else 0)
    head = 0.0
    if target == "mlm":
        M = mask_prob * B * L
        head = M * (5 * D * s + cfg.vocab_size * (s + 4))

    if not training:
        work = []
        for k in ks:
            c_saved, c_trans = core(k)
            layer_peak = BLD * s * 4 + max(2 * BLF * s, c_saved + c_trans)
            work.append(layer_peak)
        logits = B * L * cfg.vocab_size * s if target == "mlm" else 0
        total = max(work) + logits
        return {"per_layer": max(work), "layers": max(work), "embeddings": BLD * s,
                "head": logits, "transient": 0.0, "total": total}

    if activation_checkpointing:
        layers_total = len(ks) * BLD * s + max(per_layer)
    else:
        layers_total = sum(per_layer)
    total = layers_total + embed + head + transient
    return {"per_layer": max(per_layer), "layers": layers_total, "embeddings": embed,
            "head": head, "transient": transient, "total": total}


def estimate_case_bytes(case: Case) -> float:
    """Rough peak total bytes of a case (weights, grads, optimizer and activations) for budget
    prechecks: a case estimated far above its budget is skipped without a run."""
    cfg = case.model_config()
    s = DTYPES[case.dtype].itemsize
    if case.target == "layer":
        params = 4 * cfg.hidden_size ** 2 + 2 * k_schedule(cfg)[0] * cfg.max_seq_len
        cfg_one = dataclasses.replace(cfg, num_layers=1, k=k_schedule(cfg)[0])
    else:
        params, _ = count_params(cfg, case.target)
        cfg_one = cfg
    states = params * s
    if case.mode != "forward":
        states += params * s
    if case.mode == "train":
        states += params * (8 if s == 4 else 16)
    act = activation_bytes(cfg_one, case.seq_len, case.batch_size, case.dtype,
                           training=case.mode != "forward", target=case.target,
                           mask_prob=case.mask_prob, device="cpu" if case.device == "cpu" else "cuda")
    return states + act["total"]


def estimate(cfg: ModelConfig, seq_len: int, micro_batch: int, *, dtype: str = "bf16",
             zero_stages: Sequence[int] = (0, 1, 2, 3), num_gpus: int = 1,
             gpus_per_node: Optional[int] = None, gpu_mem_gib: Optional[float] = None,
             activation_checkpointing: bool = False, reserve_gib: float = 2.0,
             mask_prob: float = 0.15) -> dict:
    """Per-GPU memory of MLM training without a run, one entry per ZeRO stage: parameters,
    gradients, optimizer states (own accounting and DeepSpeed's estimator), activations of the
    micro-batch, the total with ``reserve_gib`` for the CUDA context and allocator slack, whether
    it fits ``gpu_mem_gib``, and the largest micro-batch that would."""
    if seq_len > cfg.max_seq_len:
        raise ConfigError(f"n={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not allowed; choose one of {', '.join(DTYPES)}")
    if micro_batch < 1 or num_gpus < 1:
        raise ConfigError(f"micro-batch {micro_batch} and GPU count {num_gpus} must be positive")
    for st in zero_stages:
        if st not in (0, 1, 2, 3):
            raise ConfigError(f"ZeRO stage {st} is not allowed; choose 0, 1, 2 or 3")
    params, largest = count_params(cfg, "mlm")
    per_seq = activation_bytes(cfg, seq_len, 1, dtype, activation_checkpointing=activation_checkpointing,
                               mask_prob=mask_prob)
    act = activation_bytes(cfg, seq_len, micro_batch, dtype,
                           activation_checkpointing=activation_checkpointing, mask_prob=mask_prob)
    stages = []
    for st in zero_stages:
        states = model_state_bytes(params, dtype, st, num_gpus, largest)
        ds = deepspeed_model_state_bytes(params, largest, st, num_gpus, gpus_per_node) \
            if dtype != "fp32" else None
        model_states = states["total"]
        total = model_states + act["total"] + reserve_gib * GIB
        entry = {"zero_stage": st, **{f"{k}_bytes": v for k, v in states.items() if k != "total"},
                 "model_states_bytes": model_states, "deepspeed_model_states_bytes": ds,
                 "activation_bytes": act["total"],
                 "total_bytes": total}
        if gpu_mem_gib is not None:
            room = gpu_mem_gib * GIB - model_states - reserve_gib * GIB
            entry["fits"] = total <= gpu_mem_gib * GIB
            entry["max_micro_batch"] = max(0, int(room // per_seq["total"])) if room > 0 else 0
        stages.append(entry)
    return {"params": params, "largest_layer_params": largest, "seq_len": seq_len,
            "micro_batch": micro_batch, "dtype": dtype, "num_gpus": num_gpus,
            "gpu_mem_gib": gpu_mem_gib, "activation_checkpointing": activation_checkpointing,
            "reserve_gib": reserve_gib, "activations": act, "activation_bytes_per_sequence":
            per_seq["total"], "stages": stages}


# --------------------------------------------------------------------------------------------------
# Device peak and machine description
# --------------------------------------------------------------------------------------------------


def measure_matmul_peak(device: str = "cpu", dtype: str = "fp32", size: Optional[int] = None,
                        repeats: int = 5, clock: str = "wall", threads: Optional[int] = None) -> float:
    """Best achieved FLOP/s of a square matmul: the peak that MFU is measured against (with the
    same clock and thread count as the cases it divides)."""
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    now = time.process_time if clock == "cpu" else time.perf_counter
    dt = DTYPES[dtype]
    if size:
        shapes = [(size, size, size)]
    elif dev.type == "cuda":
        shapes = [(8192, 8192, 8192)]
    else:  # a CPU BLAS peaks at different shapes (seen here: 87 to 100 GFLOP/s a core): take the best
        shapes = [(2048, 2048, 2048), (4096, 4096, 4096), (2048, 768, 2304), (8192, 3072, 768)]
    best_rate = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=dev).to(dt)
        b = torch.randn(k, n, device=dev).to(dt)
        best = math.inf
        reps = repeats * (10 if dev.type == "cuda" else 1)
        for i in range(2 + reps):
            _sync(dev)
            t0 = now()
            torch.matmul(a, b)
            _sync(dev)
            if i >= 2:
                best = min(best, now() - t0)
        best_rate = max(best_rate, 2 * m * k * n / best)
    return best_rate


def machine_info(device: str = "cpu") -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        ram = psutil.virtual_memory().total / GIB
    except ImportError:
        ram = None
    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": ram, "python": platform.python_version(), "torch": torch.__version__,
            "host": platform.node(), "command": " ".join(sys.argv)}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_mem_gib=props.total_memory / GIB, cuda=torch.version.cuda)
    return info


def default_budget_bytes(device: str) -> int:
    """CPU: 90% of the memory available now; CUDA: the device's total memory."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    import psutil

    return int(psutil.virtual_memory().available * 0.9)


# --------------------------------------------------------------------------------------------------
# Output: JSON, CSV, plots, console table
# --------------------------------------------------------------------------------------------------

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


def add_batch_ratios(results: list[dict]) -> None:
    """max batch / the baseline's max batch at the same n and mode (the paper's memory-saved form
    when the batch is pushed to the budget)."""
    index = {(r["attention"], r["mode"], r["n"]): r for r in results
             if r["attention"] in BASELINES.values() and r.get("impl", "project") == "project"}
    for r in results:
        for suffix, kind in BASELINES.items():
            base = index.get((kind, r["mode"], r["n"]))
            r[f"batch_ratio_vs_{suffix}"] = (r["max_batch"] / base["max_batch"]
                                             if base and base["max_batch"] else None)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        _worker_main()
    else:
        sys.exit("use tools/profile.py; this module's main is the per-case worker")
