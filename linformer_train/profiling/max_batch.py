"""The largest batch that fits a memory budget: doubling, then bisection."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from linformer_train.profiling.cases import Case
from linformer_train.profiling.measuring import measure_case


def find_max_batch(case: Case, budget_bytes: int, *, limit: int = 4096, refine: bool = True,
                   tolerance: float = 0.0, runner: Optional[Callable[[Case], dict]] = None) -> dict:
    """Largest batch whose peak total memory fits ``budget_bytes``: double from case.batch_size
    until a run fails (OOM, over budget), then bisect between the last fit and the first failure
    until they are 1 apart (or within ``tolerance`` x the last fit, to save runs on big batches).
    Returns {'max_batch', 'fit' (row of the largest fit), 'fail' (first failing row), 'tried'}."""
    run = runner or measure_case
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
