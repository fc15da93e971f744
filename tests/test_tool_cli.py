"""The tools say the truth about themselves: bench_pretrain's exit code, progress and help."""

from __future__ import annotations

import argparse
import sys
import time

import psutil
import pytest

from helpers.inprocess import load_tool
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


def test_bench_flags_all_have_help():
    parser = load_tool("bench_pretrain").build_parser()
    assert len(_actions(parser)) >= 13
    assert [a.dest for a in _actions(parser) if not a.help] == []
