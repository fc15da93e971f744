#!/usr/bin/env python
"""Inference latency and throughput of the encoder behind docs/PERFORMANCE.md ("Inference: eager,
torch.compile, onnxruntime"); never run as a test.

For each n, a randomly initialised encoder of ``--preset`` with max_seq_len = n (k from ``--k``)
runs a full batch of ``--batch`` x n tokens under each backend:

  eager        the model as trained, torch.no_grad (bf16 autocast on a GPU with --dtype bf16)
  compile      torch.compile(encoder, dynamic=False): compile time reported apart
  onnxruntime  the graph tools/convert.py to-onnx writes (export time reported apart), run by
               onnxruntime with as many intra-op threads as torch uses (CUDA provider on a GPU
               when onnxruntime has one)

Backends are timed round-robin, one call each per round, starting with a different one each round,
so that a neighbour's load falls on all of them alike: on a shared machine compare the ratios
within one run, not absolute times across runs. CPU seconds of the process per call (all its threads)
are reported next to wall time: on a loaded machine they measure the work where wall time also
measures the neighbours. Outputs are checked against eager (max |diff|).

  python benchmarks/bench_inference.py --preset small -n 512 2048 8192 --reps 10
  python benchmarks/bench_inference.py --preset base -n 512 2048 8192 --device cuda --dtype bf16 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import numpy as np  # noqa: E402
import torch  # noqa: E402

BACKENDS = ("eager", "compile", "onnxruntime")


def machine(device: str) -> dict:
    from linformer_train.profiling.machine import machine_info

    info = machine_info(device)
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def build_encoder(preset: str, n: int, k: int, attention: str, seed: int = 0):
    from linformer_train.config import config_from_dict
    from linformer_train.convert.onnx_export import EncoderOnly
    from linformer_train.model import LinformerForMLM

    cfg = config_from_dict({"model": dict(preset=preset, vocab_size=8192, max_seq_len=n, k=min(k, n),
                                          attention=attention, dropout=0.0, attention_dropout=0.0)}).model
    torch.manual_seed(seed)
    return EncoderOnly(LinformerForMLM(cfg).encoder).eval(), cfg


class Runner:
    """One backend: ``setup()`` once (compile / export, timed), then ``__call__()`` per timing."""

    def __init__(self, name, module, ids, mask, device, dtype, workdir: Path):
        self.name, self.module, self.ids, self.mask = name, module, ids, mask
        self.device, self.dtype, self.workdir = device, dtype, workdir
        self.setup_s = 0.0
        self.fn = None

    def setup(self):
        t0 = time.perf_counter()
        ids, mask = self.ids.to(self.device), self.mask.to(self.device)
        autocast = torch.autocast(torch.device(self.device).type, dtype=self.dtype,
                                  enabled=self.dtype != torch.float32)
        if self.name in ("eager", "compile"):
            module = self.module.to(self.device)
            if self.name == "compile":
                module = torch.compile(module, dynamic=False)

            def call():
                with torch.no_grad(), autocast:
                    out = module(ids, mask)
                if out.is_cuda:
                    torch.cuda.synchronize()
                return out

            self.fn = call
            self.fn()  # the compile happens here
        else:
            import onnxruntime as ort

            from linformer_train.convert.onnx_export import export_onnx

            path = self.workdir / f"encoder-{self.ids.shape[1]}.onnx"
            export_onnx(self.module.cpu(), path, "last_hidden_state", self.ids.shape[1], 8192)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            providers = ["CPUExecutionProvider"]
            if self.device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            session = ort.InferenceSession(str(path), options, providers=providers)
            feed = {"input_ids": self.ids.numpy(), "attention_mask": self.mask.numpy()}
            self.fn = lambda: torch.from_numpy(session.run(None, feed)[0])
            self.fn()
            self.module.to(self.device)
        self.setup_s = time.perf_counter() - t0

    def __call__(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process, all threads) of one call."""
        c0, t0 = time.process_time(), time.perf_counter()
        self.fn()
        return time.perf_counter() - t0, time.process_time() - c0


def bench_n(args, n: int, workdir: Path) -> dict:
    k = args.k[0] if len(args.k) == 1 else dict(zip(args.n, args.k))[n]
    module, cfg = build_encoder(args.preset, n, k, args.attention)
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(5, 8192, (args.batch, n), generator=g)
    mask = torch.ones_like(ids)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    runners, failed = [], {}
    for name in args.backends:
        runner = Runner(name, module, ids, mask, args.device, dtype, workdir)
        try:
            runner.setup()
        except Exception as exc:  # a backend that cannot run here is reported, not fatal
            failed[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            print(f"  n={n} {name}: failed ({failed[name]})", file=sys.stderr, flush=True)
            continue
        runners.append(runner)
        print(f"  n={n} {name}: ready in {runner.setup_s:.1f} s", file=sys.stderr, flush=True)
    reference = runners[0].fn().float().cpu() if runners else None
    diffs = {r.name: float((r.fn().float().cpu() - reference).abs().max()) for r in runners}
    for _ in range(args.warmup):
        for r in runners:
            r()
    times = {r.name: [] for r in runners}
    cpu = {r.name: [] for r in runners}
    for rep in range(args.reps):
        for i in range(len(runners)):
            r = runners[(i + rep) % len(runners)]
            wall, used = r()
            times[r.name].append(wall)
            cpu[r.name].append(used)
    eager_p50 = np.percentile(times["eager"], 50) if "eager" in times else None
    results = {}
    for r in runners:
        t = np.array(times[r.name])
        p50 = float(np.percentile(t, 50))
        results[r.name] = {"p50_ms": round(1e3 * p50, 2), "p95_ms": round(1e3 * float(np.percentile(t, 95)), 2),
                           "mean_ms": round(1e3 * float(t.mean()), 2),
                           "cpu_p50_ms": round(1e3 * float(np.percentile(cpu[r.name], 50)), 2),
                           "tokens_per_s": round(args.batch * n / float(t.mean()), 1),
                           "setup_s": round(r.setup_s, 1), "max_abs_diff_vs_first": diffs[r.name],
                           "speedup_p50_vs_eager": round(eager_p50 / p50, 2) if eager_p50 else None}
    return {"n": n, "k": cfg.k, "batch": args.batch, "reps": args.reps, "results": results, "failed": failed,
            "load_after": round(os.getloadavg()[0], 1)}


def markdown(report: dict) -> str:
    rows = ["| n | k | backend | p50 ms | p95 ms | tokens/s | vs eager (p50) | CPU ms (p50) | setup s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for entry in report["runs"]:
        for name, r in entry["results"].items():
            rows.append(f"| {entry['n']} | {entry['k']} | {name} | {r['p50_ms']:,.1f} | {r['p95_ms']:,.1f} | "
                        f"{r['tokens_per_s']:,.0f} | {r['speedup_p50_vs_eager']:.2f}x | {r['cpu_p50_ms']:,.0f} | "
                        f"{r['setup_s']} |")
        for name, why in entry["failed"].items():
            rows.append(f"| {entry['n']} | {entry['k']} | {name} | failed: {why} | | | | | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset: tiny, small, base, large (default: small)")
    p.add_argument("-n", "--n", type=int, nargs="+", default=[512, 2048, 8192], help="sequence lengths (default: 512 2048 8192)")
    p.add_argument("--k", type=int, nargs="+", default=[128, 256, 256],
                   help="projected length, one for all n or one per n (default: 128 256 256)")
    p.add_argument("--attention", default="linformer", choices=("linformer", "full"), help="default: linformer")
    p.add_argument("--batch", type=int, default=1, help="sequences per call (default: 1)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="default: all")
    p.add_argument("--reps", type=int, default=10, help="timed calls per backend (default: 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per backend after setup (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="eager/compile autocast (default: fp32)")
    p.add_argument("--threads", type=int, help="CPU threads for torch and onnxruntime (default: torch's default); "
                                               "on a shared machine 1 avoids OpenMP threads waiting for a core")
    p.add_argument("--out", default="runs/bench_inference/report.json", help="JSON report (default: %(default)s)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.k) not in (1, len(args.n)):
        p.error(f"--k takes one value or one per n ({len(args.n)})")
    report = {"command": "python benchmarks/bench_inference.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(args.device), "preset": args.preset, "attention": args.attention,
              "device": args.device, "dtype": args.dtype, "load_before": round(os.getloadavg()[0], 1), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            print(f"n={n}", file=sys.stderr, flush=True)
            report["runs"].append(bench_n(args, n, Path(tmp)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    print(markdown(report))
    return 1 if any(r["failed"] for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
