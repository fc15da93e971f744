"""The tools say the truth about themselves: bench_pretrain's exit code, progress and help; the
profiler's warning about a timing taken while other processes had the cores, and its table fitted to
the terminal; convert's --help listing its commands."""

from __future__ import annotations

import argparse
import io
import json
import sys
import time

import psutil
import pytest
from rich.console import Console

from helpers.inprocess import load_tool
from linformer_train import profiling as prof
from linformer_train.cli import run_main


def _actions(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


# ------------------------------------------------------------------------------------ bench_pretrain


def test_bench_exits_1_when_any_configuration_failed_and_shows_progress(monkeypatch, tmp_path, capsys):
    bench = load_tool("bench_pretrain")
    row = {"split": "train", "tokens_per_s": 1000.0, "mfu": 0.1, "data_wait_fraction": 0.01,
           "peak_memory_gib": 0.5, "loss": 5.0}

    def fake_bench_one(overrides, run_dir, launcher, timeout):
        if "model.attention=full" in overrides:
            return {"error": "error: something went wrong"}
        return {"rows": [row] * 4}

    monkeypatch.setattr(bench, "bench_one", fake_bench_one)
    monkeypatch.setattr(bench.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    code = run_main(bench.main, ["--n", "128", "--steps", "4", "--attention", "linformer", "full"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "[1/2] tiny linformer n=128 k=32: 4 steps ..." in err and "[2/2] tiny full n=128: 4 steps ..." in err
    assert "error: 1 of 2 configurations failed (first: error: something went wrong)" in err
    assert "failed: error: something went wrong" in out and "1000" in out  # the table: both rows
    # all good: exit 0
    monkeypatch.setattr(bench, "bench_one", lambda *a: {"rows": [row] * 4})
    assert run_main(bench.main, ["--n", "128", "--steps", "4", "--attention", "linformer"]) == 0


def test_bench_stops_a_configuration_that_runs_too_long_with_every_process_it_started(monkeypatch, tmp_path):
    bench = load_tool("bench_pretrain")
    pid_file = tmp_path / "grandchild.pid"
    monkeypatch.setenv("PID_FILE", str(pid_file))
    launcher = [sys.executable, "-c",
                "import os, subprocess, sys, time\n"
                "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                "open(os.environ['PID_FILE'], 'w').write(str(g.pid))\n"
                "time.sleep(600)\n"]
    t0 = time.monotonic()
    out = bench.bench_one([], tmp_path / "run", launcher, timeout=10)  # time to start the grandchild
    assert out == {"error": "still running after 10 s (--timeout); stopped"}
    assert time.monotonic() - t0 < 60
    assert pid_file.exists(), "the grandchild did not start within 10 s"
    assert _ends(int(pid_file.read_text()))


def _ends(pid: int, within_s: float = 10.0) -> bool:
    """The process is gone (or a zombie): SIGKILL takes effect once the kernel runs it."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_bench_breakdown_splits_real_steps_into_parts_that_sum_to_the_step(prepared_data, tmp_path, capsys):
    """A tiny CPU run, profiled: forward, backward, optimizer, data and other per step, printed and
    written with the row; the measured parts fit inside the step and the maths takes most of it."""
    from conftest import TINY

    bench = load_tool("bench_pretrain")
    out = tmp_path / "bench.json"
    code = run_main(bench.main, ["--preset", "tiny", "--n", "64", "--k", "16", "--attention", "linformer",
                                 "--steps", "6", "--warmup", "2", "--micro-batch", "8", "--breakdown",
                                 "--out", str(out), "--", *TINY, f"data.prepared_dir={prepared_data}"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    row = json.loads(out.read_text())[0]
    b = row["breakdown"]
    assert b["steps"] == 3 and b["device"] == "cpu"  # 6 steps, 2 dropped, the last has no end
    parts = [b[f"{p}_ms"] for p in ("forward", "backward", "optimizer", "data")]
    assert all(v > 0 for v in parts[:3]) and parts[3] >= 0
    assert b["other_ms"] >= 0 and sum(parts) + b["other_ms"] == pytest.approx(b["step_ms"])
    assert sum(parts[:3]) > 0.5 * b["step_ms"]
    assert sum(b["shares"].values()) == pytest.approx(1.0)
    assert "step breakdown, ms per step" in printed and "host time of each phase's ranges" in printed
    # the peak the MFU column divides by, as the run's engine line named it (TINY states 1 TFLOP/s)
    assert row["mfu_peak"] == "1 TFLOP/s (train.peak_tflops)" and "MFU against 1 TFLOP/s" in printed


def test_bench_flags_all_have_help():
    parser = load_tool("bench_pretrain").build_parser()
    assert len(_actions(parser)) >= 13
    assert [a.dest for a in _actions(parser) if not a.help] == []


# -------------------------------------------------------------------------------------- profile.py


def _row(label, n, time_ms, share, threads=2, clock="wall", status="ok"):
    ok = status == "ok"
    return {"label": label, "attention": label.split()[0], "impl": "project", "target": "encoder",
            "mode": "backward", "dtype": "fp32", "device": "cpu", "n": n, "batch": 1, "layers": 1,
            "hidden": 64, "heads": 4, "ffn": 128, "vocab": 128, "dropout": 0.0, "attention_dropout": 0.0,
            "status": status, "time_ms": time_ms if ok else None, "mem_step_mib": 10.0 if ok else None,
            "mem_peak_mib": 300.0 if ok else None, "tokens_per_s": n / time_ms * 1e3 if ok else None,
            "tflops": 0.01 if ok else None, "mfu": 0.05 if ok else None, "cpu_share": share if ok else None,
            "threads": threads, "clock": clock, "loadavg_1m": 5.2, "reason": None if ok else "boom"}


def test_profile_sweep_warns_when_other_processes_had_the_cores(monkeypatch, tmp_path, capsys):
    """The case from a shared machine: n=512 at CPU share 0.37 took longer than n=2048 at 0.95."""
    cli = load_tool("profile")
    rows = [_row("linformer k=128", 512, 1085.0, 0.37), _row("linformer k=128", 2048, 570.0, 0.95),
            _row("linformer k=128", 4096, 900.0, 0.85, threads=1),  # 0.85 of a core: a little noise
            _row("linformer k=128", 8192, 2000.0, 0.30, clock="cpu")]  # CPU clock: not inflated

    def fake_sweep(cases, on_row=None, **kw):
        for r in rows:
            on_row(r)
        return rows

    monkeypatch.setattr(prof, "run_sweep", fake_sweep)
    code = cli.main(["sweep", "--preset", "tiny", "-n", "64", "--k", "16", "--attention", "linformer",
                     "--peak-tflops", "1", "--no-plots", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, err
    assert warnings[0].startswith("warning: linformer k=128 backward n=512 b=1: CPU share 0.37 with 2 thread(s)")
    assert "load average 5.2" in warnings[0] and "1085.0 ms is inflated" in warnings[0]
    assert warnings[1].startswith("warning: 1 of 4 cases ran while other processes took the cores "
                                  "(lowest CPU share 0.37: linformer k=128 n=512)")
    assert "--wait-idle 0.3 120" in warnings[1]
    assert cli.low_cpu_share(_row("x", 64, 1.0, 0.39)) and not cli.low_cpu_share(_row("x", 64, 1.0, 0.41))


def test_profile_table_fits_the_terminal_width():
    rows = [_row("linformer k=128 kv", n, 100.0, 0.9) for n in (512, 2048)]
    rows += [_row("naive", 512, 400.0, 0.9), _row("naive", 2048, None, None, status="oom")]
    rows[-1]["reason"] = "OutOfMemoryError: tried to allocate 24.00 GiB " + "x" * 200
    prof.add_ratios(rows)

    def printed(width: int) -> list[str]:
        console = Console(width=width, file=io.StringIO())
        load_tool("profile").print_table(rows, "a sweep", console)
        return console.file.getvalue().splitlines()

    for width in (60, 80, 100):
        lines = printed(width)
        assert max(len(line) for line in lines) <= width, "\n".join(lines)
        table = [line for line in lines if line.startswith(("┃", "│"))]
        assert all("linformer k=128 kv" in line or "naive" in line for line in table[1:])  # no cell cut
        assert any(line.startswith("left out to fit") for line in lines)
        assert any(line.startswith("[1] naive n=2048 b=1: OutOfMemoryError") for line in lines)
    wide = printed(250)
    header = next(line for line in wide if line.startswith("┃"))
    for name in ("time ms", "tok/s", "TFLOP/s", "MFU", "peak MiB", "xnaive spd", "xnaive mem", "status"):
        assert name in header
    assert "xsdpa" not in header  # no SDPA rows: the columns would be empty
    assert not any(line.startswith("left out") for line in wide)


# -------------------------------------------------------------------------------------- convert.py


def test_convert_help_lists_each_command_on_its_own_line(capsys):
    from linformer_train.convert.entry import convert

    with pytest.raises(SystemExit) as exc:
        convert(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    lines = out.splitlines()
    assert lines[0] == "usage: convert [-h] COMMAND ..."
    for usage in ("export CHECKPOINT OUT", "resize MODEL OUT model.max_seq_len=N [model.k=K]",
                  "warm-start HF_DIR OUT [--tokenizer TOK] [model.key=value ...]", "universal CHECKPOINT OUT",
                  "to-hf MODEL OUT [--pooling mean|first]", "from-hf HF_DIR OUT [--tokenizer TOK]",
                  "to-onnx MODEL OUT.onnx", "inspect MODEL"):
        assert f"  {usage}" in lines, out
    assert max(len(line) for line in lines) <= 80
    for command in ("export", "resize", "warm-start", "universal", "to-hf", "from-hf", "to-onnx", "inspect"):
        with pytest.raises(SystemExit):
            convert([command, "--help"])
        assert "usage: convert " + command in capsys.readouterr().out


def test_convert_arguments_all_have_help():
    from linformer_train.convert.entry import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == ["export", "from-hf", "inspect", "resize", "to-hf", "to-onnx", "universal",
                                   "warm-start"]
    missing = [f"{name} {a.dest}" for name, p in sub.choices.items() for a in _actions(p) if not a.help]
    assert missing == []
