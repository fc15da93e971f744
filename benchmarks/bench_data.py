#!/usr/bin/env python
"""Data-pipeline benchmarks behind docs/PERFORMANCE.md ("Data pipeline"); never run as tests.

  throughput  tokenization + packing tokens/s (ensure_prepared, tokenizer given) at num_proc 1 and 2,
              next to sentencepiece's bare encode speed
  memory      peak memory of the preparing process tree on corpora of --sizes GB built in --workdir
              from repeated built-in text (deleted afterwards): summed RSS and anonymous RSS
  loader      cost of one MLM batch at n=8192 (gather + mask + tensors), token and whole-word
              masking, and the data wait left when a background thread prefetches during compute

Examples:
  python benchmarks/bench_data.py all
  python benchmarks/bench_data.py memory --sizes 0.25 1.0 --workdir /tmp/lt_bench
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install


def machine() -> str:
    model = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    return (f"{os.cpu_count()}-core {model}, Python {platform.python_version()}, "
            f"{datetime.datetime.now().astimezone().isoformat(timespec='minutes')}, "
            f"load average {load[0]:.1f}")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: on a shared machine it measures the
    work, where wall time also measures the neighbours."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def data_cfg(*overrides: str):
    from linformer_train.config import load_config

    return load_config([], ["model.vocab_size=8192", *overrides]).data


def bench_tokenizer(work: Path, vocab: int) -> Path:
    """A realistic tokenizer (unigram, 8192 pieces) trained once on the built-in corpus."""
    from linformer_train.data.pipeline import train_tokenizer
    from linformer_train.data.tokenizer import model_path

    path = model_path(work / f"tokenizer-{vocab}")
    if not path.is_file():
        t0 = time.perf_counter()
        train_tokenizer(data_cfg(f"data.tokenizer_vocab_size={vocab}"), path.parent, vocab)
        print(f"trained the benchmark tokenizer ({vocab} pieces) in {time.perf_counter() - t0:.1f} s")
    return path


def write_corpus(root: Path, megabytes: float) -> Path:
    """Plain-text files of ~100 MB repeating the built-in corpus until ``megabytes`` is reached."""
    from linformer_train.data.corpus import builtin_documents

    root.mkdir(parents=True, exist_ok=True)
    chunk = ("\n\n".join(builtin_documents()) + "\n\n").encode()
    target, written, index = int(megabytes * 1e6), 0, 0
    while written < target:
        with open(root / f"part-{index:03d}.txt", "wb") as f:
            part = 0
            while part < 100e6 and written < target:
                f.write(chunk)
                part += len(chunk)
                written += len(chunk)
        index += 1
    return root


# --------------------------------------------------------------------------------------------------


def throughput(args) -> dict:
    import sentencepiece as spm

    from linformer_train.data.corpus import builtin_documents
    from linformer_train.data.pipeline import ensure_prepared
    from linformer_train.data.prepare import open_prepared

    work = Path(args.workdir)
    tok = bench_tokenizer(work, args.vocab)
    corpus = write_corpus(work / "corpus-throughput", args.throughput_mb)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    docs = list(builtin_documents())
    result = {"corpus_mb": args.throughput_mb, "vocab": args.vocab}
    for threads in (1, 2):
        t0 = time.perf_counter()
        ids = sp.Encode(docs, out_type=int, num_threads=threads)
        dt = time.perf_counter() - t0
        result[f"sentencepiece_encode_{threads}_threads_tok_s"] = round(sum(map(len, ids)) / dt)
    for num_proc in (1, 2):
        out = work / f"prepared-throughput-{num_proc}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = data_cfg("data.source=files", f"data.paths=[{corpus}]", f"data.tokenizer={tok}",
                       f"data.num_proc={num_proc}", f"data.prepared_dir={out}")
        t0, c0 = time.perf_counter(), cpu_seconds()
        ensure_prepared(cfg, args.seq_len, work, 8192)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        m = open_prepared(out, args.seq_len).manifest
        tokens = m["tokens"]["documents"]
        result[f"num_proc_{num_proc}"] = {
            "tokens": tokens, "wall_s": round(wall, 1), "tokens_per_s": round(tokens / wall),
            "cpu_s": round(cpu, 1), "tokens_per_cpu_s": round(tokens / cpu),
            "phases_s": m["seconds"], "text_mb_per_s": round(args.throughput_mb / wall, 1),
        }
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(corpus, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------------


def _proc_kb(pid: int, path: str, keys: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def _watch(pid: int, peaks: dict, stop: threading.Event) -> None:
    """Sample the process tree every 0.1 s; peaks (MB) of the sums over its processes of
    PSS (shared pages split between the processes that map them: the real footprint),
    anonymous RSS (heap: what cannot be reclaimed), and plain RSS (counts shared libraries once
    per process, and file pages mapped from the page cache)."""
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = dict.fromkeys(("Pss", "RssAnon", "VmRSS"), 0)
        for p in procs:
            total["Pss"] += _proc_kb(p.pid, "smaps_rollup", ("Pss",))["Pss"]
            status = _proc_kb(p.pid, "status", ("RssAnon", "VmRSS"))
            total["RssAnon"] += status["RssAnon"]
            total["VmRSS"] += status["VmRSS"]
        for key, name in (("Pss", "pss_mb"), ("RssAnon", "anon_mb"), ("VmRSS", "rss_mb")):
            peaks[name] = max(peaks.get(name, 0), total[key] / 1024)
        peaks["max_procs"] = max(peaks.get("max_procs", 0), len(procs))
        stop.wait(0.1)


def memory(args) -> dict:
    work = Path(args.workdir)
    tok = bench_tokenizer(work, args.vocab)
    results = {}
    for gb in args.sizes:
        corpus = write_corpus(work / f"corpus-{gb}gb", gb * 1000)
        out = work / f"prepared-{gb}gb"
        shutil.rmtree(out, ignore_errors=True)
        size = sum(p.stat().st_size for p in corpus.iterdir())
        cmd = [sys.executable, __file__, "_prepare", "--paths", str(corpus), "--tokenizer", str(tok),
               "--out", str(out), "--seq-len", str(args.seq_len), "--num-proc", str(args.num_proc)]
        t0, c0 = time.perf_counter(), cpu_seconds()
        proc = subprocess.Popen(cmd)
        peaks: dict = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(proc.pid, peaks, stop))
        watcher.start()
        rc = proc.wait()
        stop.set()
        watcher.join()
        if rc:
            raise SystemExit(f"preparing {corpus} failed with exit code {rc}")
        manifest = json.loads((out / "manifest.json").read_text())
        results[f"{gb}GB"] = {
            "text_bytes": size, "tokens": manifest["tokens"]["documents"],
            "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(cpu_seconds() - c0, 1),
            "peak_pss_sum_mb": round(peaks["pss_mb"]), "peak_anon_rss_sum_mb": round(peaks["anon_mb"]),
            "peak_rss_sum_mb": round(peaks["rss_mb"]),
            "processes": peaks["max_procs"], "phases_s": manifest["seconds"],
        }
        print(json.dumps({f"{gb}GB": results[f"{gb}GB"]}), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(corpus, ignore_errors=True)
    return results


def _prepare(args) -> None:
    from linformer_train.data.pipeline import ensure_prepared

    cfg = data_cfg("data.source=files", f"data.paths=[{args.paths}]", f"data.tokenizer={args.tokenizer}",
                   f"data.num_proc={args.num_proc}", f"data.prepared_dir={args.out}")
    ensure_prepared(cfg, args.seq_len, args.out, 8192)


# --------------------------------------------------------------------------------------------------


def loader(args) -> dict:
    import numpy as np

    from linformer_train.data.loader import MLMLoader
    from linformer_train.data.masking import MLMMasker
    from linformer_train.data.pipeline import ensure_prepared
    from linformer_train.data.prepare import open_prepared
    from linformer_train.data.tokenizer import load_tokenizer

    work = Path(args.workdir)
    tok_path = bench_tokenizer(work, args.vocab)
    n, batch = 8192, args.batch
    out = work / "prepared-8192"
    cfg = data_cfg(f"data.tokenizer={tok_path}", f"data.prepared_dir={out}", "data.validation_fraction=0.05")
    ensure_prepared(cfg, n, work, 8192)
    data = open_prepared(out, n)
    tok = load_tokenizer(tok_path)
    result = {"n": n, "micro_batch": batch, "train_blocks": len(data.train)}
    for name, word_start in (("token_masking", None), ("whole_word_masking", tok.word_start)):
        masker = MLMMasker(0.15, 0.8, 0.1, tok.vocab_size, tok.special_ids, word_start, seed=1)
        dl = MLMLoader(data.train, masker, batch, seed=1, prefetch=0)
        for _ in range(3):
            next(dl)
        steps = 50
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            next(dl)
        per, cpu = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
        result[name] = {"ms_per_batch": round(per * 1e3, 2), "cpu_ms_per_batch": round(cpu * 1e3, 2),
                        "tokens_per_s": round(batch * n / per)}
    masker = MLMMasker(0.15, 0.8, 0.1, tok.vocab_size, tok.special_ids, None, seed=1)
    dl = MLMLoader(data.train, masker, batch, seed=1, prefetch=2)
    next(dl)
    dl.wait_seconds = 0.0
    compute = args.compute_ms / 1e3
    steps = 30
    t0 = time.perf_counter()
    for _ in range(steps):
        next(dl)
        end = time.perf_counter() + compute  # stand-in for forward/backward (busy, like a CPU step)
        while time.perf_counter() < end:
            np.dot(np.ones(64), np.ones(64))
    elapsed = time.perf_counter() - t0
    result["prefetch_2_with_compute"] = {"compute_ms": args.compute_ms,
                                         "wait_ms_per_batch": round(dl.wait_seconds / steps * 1e3, 3),
                                         "data_wait_fraction": round(dl.wait_seconds / elapsed, 4)}
    dl.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["all", "throughput", "memory", "loader", "_prepare"])
    parser.add_argument("--workdir", default="/tmp/linformer_bench_data")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--throughput-mb", type=float, default=100.0)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1.0], help="corpus sizes in GB")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compute-ms", type=float, default=100.0)
    parser.add_argument("--paths"), parser.add_argument("--tokenizer"), parser.add_argument("--out")
    parser.add_argument("--keep", action="store_true", help="keep --workdir (the tokenizer) afterwards")
    args = parser.parse_args()
    if args.what == "_prepare":
        return _prepare(args)
    print(machine(), flush=True)
    report = {"machine": machine(), "command": " ".join(sys.argv)}
    try:
        for name, fn in (("throughput", throughput), ("memory", memory), ("loader", loader)):
            if args.what in ("all", name):
                report[name] = fn(args)
                print(json.dumps({name: report[name]}, indent=1), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
