"""Ratios against the full-attention baselines (the paper's Table 3 form)."""

from __future__ import annotations

from linformer_train.profiling.cases import BASELINES


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
