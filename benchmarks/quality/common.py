"""What the quality studies share: where the real data and the outputs live, the tokenizer and
evaluation blocks, running a project tool as a timed subprocess, and results as JSON lines.

The data sit beside the checkout in ``../shared/data`` (GLUE SST-2, WikiText-2 ``valid.txt`` and
``test.txt``); a clone without them gets one line saying so. WikiText-2 has no train split there:
the studies pretrain on ``valid.txt`` and evaluate on ``test.txt``. Everything a study writes goes
under ``runs/quality/`` (git-ignored); a finished run is skipped when its command is run again.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "runs" / "quality"
FIGURES = ROOT / "docs" / "figures"
WIKI_TRAIN = DATA / "wikitext-2" / "valid.txt"
WIKI_EVAL = DATA / "wikitext-2" / "test.txt"
SST2_TRAIN = DATA / "sst2" / "train.tsv"
SST2_DEV = DATA / "sst2" / "dev.tsv"
TOKENIZER = OUT / "tokenizer" / "tokenizer.model"
VOCAB = 4096
"""Pieces of the study tokenizer (sentencepiece unigram on WikiText-2 valid: 2,461 lines allow < 7,654)."""


def require_data() -> None:
    missing = [p for p in (WIKI_TRAIN, WIKI_EVAL, SST2_TRAIN, SST2_DEV) if not p.is_file()]
    if missing:
        sys.exit(f"error: {missing[0]} is missing; the studies read the shared data folder "
                 f"{DATA} (see its README), which this checkout does not have")


def python_tool(tool: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / tool), *map(str, args)]


def run(cmd: list[str], log: Path, threads: int = 1) -> dict:
    """Run ``cmd`` (a project tool) with its output in ``log``; wall and CPU seconds of the child.
    Exits with the tool's last line when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:]
        sys.exit(f"error: {' '.join(cmd[:3])} ... failed ({last[0] if last else rc}); see {log}")
    return {"start": t0, "wall_s": round(time.time() - t0, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)}


def ensure_tokenizer() -> Path:
    """The study tokenizer: sentencepiece unigram, VOCAB pieces, trained on WikiText-2 valid."""
    if not TOKENIZER.is_file():
        run(python_tool("tools/train_tokenizer.py", "--source", "files", "--paths", WIKI_TRAIN,
                        "--vocab-size", VOCAB, "--out", TOKENIZER.parent, f"model.vocab_size={VOCAB}"),
            OUT / "logs" / "tokenizer.log")
    return TOKENIZER


def wiki_data_overrides(n: int) -> list[str]:
    """Pretraining data: WikiText-2 valid, one document per line, packed into n-token blocks (2% of
    the documents held out by the trainer; the studies evaluate on test.txt instead)."""
    return ["data.source=files", f"data.paths=[{WIKI_TRAIN}]", "data.format=text", "data.text_split=line",
            f"data.tokenizer={ensure_tokenizer()}", "data.validation_fraction=0.02", "data.num_proc=1",
            f"data.prepared_dir={OUT / 'data' / f'wiki_valid_n{n}'}"]


EVAL_TOKENS = 131072
"""Tokens of WikiText-2 test.txt every MLM evaluation reads (its first blocks, at any n)."""


def eval_blocks(n: int):
    """The first EVAL_TOKENS tokens of WikiText-2 test.txt in n-token blocks, as (B, n) int64."""
    import numpy as np

    from linformer_train.config import load_config
    from linformer_train.data.pipeline import ensure_prepared
    from linformer_train.data.prepare import open_prepared

    cfg = load_config([], [f"model.vocab_size={VOCAB}", f"model.max_seq_len={n}", "data.source=files",
                           f"data.paths=[{WIKI_EVAL}]", "data.format=text", "data.text_split=line",
                           f"data.tokenizer={ensure_tokenizer()}", "data.validation_fraction=0.02",
                           "data.num_proc=1", f"data.prepared_dir={OUT / 'data' / f'wiki_test_n{n}'}"])
    root = ensure_prepared(cfg.data, n, OUT, VOCAB)
    prepared = open_prepared(root, n)
    blocks = np.concatenate([prepared.train.take(np.arange(len(prepared.train))),
                             prepared.validation.take(np.arange(len(prepared.validation)))]).astype(np.int64)
    return blocks[:EVAL_TOKENS // n]


def mlm_loss(model, blocks, batch_size: int = 16, seed: int = 0) -> float:
    """Mean masked-token cross-entropy of ``model`` on ``blocks`` with fixed masks (15%, 80/10/10)."""
    import torch

    from linformer_train.data.masking import EVAL_STREAM, MLMMasker
    from linformer_train.data.tokenizer import SPECIAL_IDS

    masker = MLMMasker(vocab_size=model.cfg.vocab_size, special_ids=SPECIAL_IDS, seed=seed)
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            x = blocks[start:start + batch_size]
            inputs, labels = masker(x, 0, range(start, start + len(x)), stream=EVAL_STREAM)
            out = model(inputs, labels=labels)
            total += float(out.loss_sum)
            count += float(out.num_predicted)
    return total / count


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def machine() -> dict:
    return {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def mean_std(values: Iterable[float]) -> tuple[float, Optional[float]]:
    values = list(values)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
