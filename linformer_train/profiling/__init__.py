"""Memory and speed profiling of the encoder: sweeps, max batch under a budget, and a no-run estimate.

The measuring code behind ``tools/profile.py``, one concern a module:

* :mod:`.cases`: one *case* is one configuration (model dims, n, k, attention kind, batch, mode,
  dtype, device); the sweep of cases, their validation and their FLOPs.
* :mod:`.build`: what a case runs (module, inputs, step, optimizer).
* :mod:`.measuring`: :func:`run_case` builds a case, warms it up, times the median of repeats
  (synchronised with the device) and records the peak memory of the step:

  - CUDA: ``torch.cuda.max_memory_allocated`` over the warm-up and the repeats; the step's memory is
    that peak minus what was allocated once the model, optimizer and inputs were built.
  - CPU: each case runs in a fresh subprocess (:func:`run_case_isolated`), so no allocator cache of
    an earlier case hides memory. After the build, the kernel's peak-RSS counter is reset
    (``/proc/self/clear_refs`` = 5, Linux >= 4.0) and read back (``VmHWM``) after the last repeat:
    the step's memory is that peak minus the idle RSS after the build. Where the reset is refused, a
    thread samples RSS every 2 ms instead (``mem_method`` says which). A watchdog stops the
    subprocess cleanly when its RSS passes the budget, so an over-budget case is a skip, not a crash
    (:mod:`.memory` holds the probes).
* :mod:`.ratios`: the paper's Table 3 ratios. A case's speed-up is baseline time / its time, memory
  saved is baseline step memory / its step memory, against both full-attention baselines at the same
  n, batch, mode and dims: ``naive`` (softmax(QK^T)V written out, the paper's O(n^2) baseline) and
  ``full`` (torch SDPA, today's baseline).
* :mod:`.max_batch`: the largest batch under a memory budget.
* :mod:`.estimate`: memory per GPU by ZeRO stage without a run.
* :mod:`.steps`: where the time of a real training step goes (forward, backward, optimizer, data).
* :mod:`.machine` and :mod:`.report`: the machine's description; JSON, CSV and plots (the console
  tables are tools/profile.py's).

FLOPs come from :mod:`linformer_train.model.flops` and MFU from :mod:`linformer_train.train.mfu`,
the definition the trainer uses.
"""

from linformer_train.profiling.build import MasterWeightAdamW, build_step, warm_runtime
from linformer_train.profiling.cases import (
    BASELINES,
    DTYPES,
    GIB,
    IMPLS,
    MIB,
    MODES,
    TARGETS,
    Case,
    attention_layer_flops,
    build_cases,
    case_flops,
    case_label,
    check_case,
    format_k,
    model_section,
    parse_k,
)
from linformer_train.profiling.estimate import (
    activation_bytes,
    count_params,
    deepspeed_model_state_bytes,
    estimate,
    estimate_case_bytes,
    model_state_bytes,
)
from linformer_train.profiling.machine import default_budget_bytes, machine_info, wait_for_idle_cpu
from linformer_train.profiling.max_batch import find_max_batch
from linformer_train.profiling.measuring import measure_case, run_case, run_case_isolated, run_sweep
from linformer_train.profiling.memory import RssWatch, current_rss, peak_rss, reset_peak_rss
from linformer_train.profiling.ratios import add_batch_ratios, add_ratios
from linformer_train.profiling.report import (
    CSV_FIELDS,
    plot_rows,
    write_csv,
    write_json,
)
from linformer_train.train.mfu import measure_matmul_peak

__all__ = [
    "BASELINES", "CSV_FIELDS", "DTYPES", "GIB", "IMPLS", "MIB", "MODES", "TARGETS", "Case",
    "MasterWeightAdamW", "RssWatch", "activation_bytes", "add_batch_ratios", "add_ratios",
    "attention_layer_flops", "build_cases", "build_step", "case_flops", "case_label", "check_case",
    "count_params", "current_rss", "deepspeed_model_state_bytes", "default_budget_bytes", "estimate",
    "estimate_case_bytes", "find_max_batch", "format_k", "machine_info", "measure_case",
    "measure_matmul_peak", "model_section", "model_state_bytes", "parse_k", "peak_rss", "plot_rows",
    "reset_peak_rss", "run_case", "run_case_isolated", "run_sweep",
    "wait_for_idle_cpu", "warm_runtime", "write_csv", "write_json",
]
