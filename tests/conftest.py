"""Shared fixtures: one small prepared corpus for every training test, and subprocess helpers
(through helpers/proc.py: hang detection instead of timeouts, no orphans)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import proc, shm

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """A SIGTERM to the test run (a cancelled CI job, a kill) unwinds it like Ctrl-C, so every
    test's cleanup runs and kills the processes it started (they live in sessions of their own and
    would not get the signal)."""
    signal.signal(signal.SIGTERM, proc.interrupt_on_sigterm)


SESSION_START = time.time()
JOB_PORTS: set[int] = set()  # master ports of the multi-rank jobs this session started


def pytest_sessionfinish(session, exitstatus):
    shm.remove_leftovers(JOB_PORTS, since=SESSION_START)  # what multi-rank jobs left in /dev/shm


# A small, fast model and corpus; every training test starts from these overrides.
TINY = [
    "model.preset=tiny", "model.vocab_size=512", "model.max_seq_len=64", "model.k=16",
    "data.source=builtin", "data.max_documents=1500", "data.tokenizer_vocab_size=512",
    "data.validation_fraction=0.05", "data.num_proc=1",
    "train.micro_batch_size=8", "train.eval_batches=2", "train.peak_tflops=1.0",
    "optim.lr=3e-3", "optim.warmup_steps=5", "logging.log_every=1", "logging.tensorboard=false",
    "precision.dtype=fp32",
]


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """Tokenizer + packed blocks made once per session; tests point data.prepared_dir at it."""
    from linformer_train.config import load_config
    from linformer_train.data.pipeline import ensure_prepared

    root = tmp_path_factory.mktemp("prepared")
    cfg = load_config([], TINY + [f"data.prepared_dir={root / 'data'}"])
    return Path(ensure_prepared(cfg.data, cfg.model.max_seq_len, root, cfg.model.vocab_size))


def write_topics(path: Path, n_docs: int = 40) -> Path:
    """A small English corpus: the first reference-manual topics shipped with Python."""
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[k].strip() for k in sorted(topics)[:n_docs]) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """write_topics() in a fresh folder, once per test module."""
    return write_topics(tmp_path_factory.mktemp("corpus") / "topics.txt")


def tiny_overrides(prepared_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return TINY + [f"data.prepared_dir={prepared_data}", f"train.run_dir={run_dir}", *extra]


def cli_env(env: dict | None = None) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}


def run_cli(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a command from the checkout; no deadline, but a hang (no output, no CPU for
    helpers.proc.HANG_S seconds) fails the test, and no process of it outlives the call."""
    return proc.run(args, cwd=ROOT, env=cli_env(env), **kw)


def pretrain(overrides: list[str]) -> subprocess.CompletedProcess:
    return run_cli([sys.executable, "launch/pretrain.py", *overrides])


def deepspeed_command(script: str, args: list[str], ranks: int = 2) -> list[str]:
    port = _free_port()
    JOB_PORTS.add(port)
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(port), script, *args]


def deepspeed_run(script: str, args: list[str], ranks: int = 2) -> subprocess.CompletedProcess:
    cmd = deepspeed_command(script, args, ranks)
    try:
        return run_cli(cmd)
    finally:  # the job has ended (run_cli leaves no process of it): its segments are garbage
        shm.remove_leftovers([int(cmd[cmd.index("--master_port") + 1])])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path, split: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]
