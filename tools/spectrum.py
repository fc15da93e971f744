#!/usr/bin/env python
"""How low-rank is your model's attention? Spectra per layer and head, and a per-layer k schedule.

Subcommands (docs/SPECTRUM.md has the walk-through and a study):
  measure    run a model on n-token samples, collect the singular values of every layer's and head's
             softmax attention, write spectrum.json/.npz, two plots and a k schedule YAML
  recommend  a k schedule from an earlier measurement, with another share, quantile, multiple or
             total (and the rank heat map at that share)
  compare    loss curves of pretraining runs side by side (from their metrics.jsonl)

Examples:
  python tools/spectrum.py measure runs/full/model --data runs/full/data -n 256 --samples 32 \\
      --share 0.9 --multiple-of 16 --out runs/full/spectrum
  python tools/spectrum.py measure runs/full --data builtin -n 256       # a run's DeepSpeed checkpoint
  python tools/spectrum.py recommend runs/full/spectrum --share 0.95 --total 256
  python tools/spectrum.py compare runs/u-s1 runs/u-s2 runs/s-s1 runs/s-s2 --labels u u s s \
      --baseline u --out loss.png                                     # seeds paired with seeds
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from linformer_train.cli import make_parser, run_main  # noqa: E402


def _share(text: str) -> float:
    from linformer_train.spectrum import SpectrumError

    try:
        value = float(text)
    except ValueError:
        raise SpectrumError(f"--share {text!r} is not a number; give a share in (0, 1), e.g. 0.9") from None
    if not 0.0 < value < 1.0 or math.isnan(value):
        raise SpectrumError(f"--share {text} must lie strictly between 0 and 1 (e.g. 0.9)")
    return value


def _schedule_args(p) -> None:
    g = p.add_argument_group("recommendation")
    g.add_argument("--share", default="0.9",
                   help="share of the normalised cumulative spectrum the rank must reach (default 0.9)")
    g.add_argument("--quantile", type=float, default=0.9,
                   help="k covers each head on this share of the samples (default 0.9)")
    g.add_argument("--multiple-of", type=int, default=16,
                   help="round every k up to a multiple of this (hardware-friendly: 16, 64)")
    g.add_argument("--no-monotone", action="store_true",
                   help="allow k to grow with depth (default: non-increasing, each layer >= the next)")
    g.add_argument("--total", type=int, default=None,
                   help="rescale the schedule to this sum of k over layers (the budget of a uniform "
                        "k = total / layers: same E/F parameters and FLOPs)")


def _recommend_and_write(result, args, out_dir: Path, base_model: dict | None) -> str:
    from linformer_train.spectrum import check_schedule_yaml, recommend_k, schedule_yaml

    share = _share(args.share)
    sched = recommend_k(result, share, args.quantile, args.multiple_of,
                        monotone=not args.no_monotone, total=args.total)
    text = schedule_yaml(sched, result.num_layers)
    cfg = check_schedule_yaml(text, base_model)  # load_config must accept it, alone and layered
    if cfg.model.k != sched.k:
        raise RuntimeError(f"the loader read k={cfg.model.k} back from a snippet holding {sched.k}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "k_schedule.yaml").write_text(text)
    (out_dir / "k_schedule.json").write_text(json.dumps(sched.as_dict(), indent=1))
    return text


def _print_table(result, share: float, sched_k=None) -> None:
    rows = result.summary(share)
    lin = result.linformer_rel_error is not None
    print(f"rank needed to reach {share:g} of the normalised cumulative spectrum, over "
          f"{result.num_samples} samples x {result.num_heads} heads:")
    cols = [("layer", 5), ("model k", 7), ("median", 6), ("p90", 6), ("max", 6), ("eff.rank", 8)]
    if lin:
        cols += [("lin-vs-full rel.err", 19), ("cosine", 6)]
    if sched_k:
        cols += [("k", 5)]
    print("  ".join(f"{name:>{w}}" for name, w in cols))
    for i, r in enumerate(rows):
        vals = [f"{r['layer']}", f"{r['model_k']}", f"{r['rank_needed_median']:.0f}",
                f"{r['rank_needed_p90']:.0f}", f"{r['rank_needed_max']:.0f}",
                f"{r['effective_rank_mean']:.1f}"]
        if lin:
            vals += [f"{r['linformer_rel_error_mean']:.3f}", f"{r['linformer_cosine_mean']:.3f}"]
        if sched_k:
            vals += [f"{sched_k[i]}"]
        print("  ".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols)))


def cmd_measure(args) -> int:
    import torch

    from linformer_train.spectrum import (SHARE_GRID, SpectrumError, load_model, load_samples,
                                          measure_spectrum, plot_cumulative, plot_rank_heatmap)

    from linformer_train.paths import check_output_apart

    share = _share(args.share)
    if args.samples < 1:
        raise SpectrumError(f"--samples {args.samples} must be at least 1")
    data = {f"the data {d}": d for d in args.data if d != "builtin"}
    check_output_apart(args.out, {"the model": args.model, **data}, "--out")
    loaded = load_model(args.model)
    mcfg = loaded.model_cfg
    n = args.seq_len or mcfg.max_seq_len
    if not 2 <= n <= mcfg.max_seq_len:
        raise SpectrumError(f"-n {n} must lie in [2, model.max_seq_len={mcfg.max_seq_len}]")
    tokenizer = Path(args.tokenizer) if args.tokenizer else loaded.tokenizer_path
    samples, data_desc, tok_used = load_samples(args.data, n, args.samples, tokenizer,
                                                split=args.split, seed=args.seed,
                                                max_tokens=args.max_tokens)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"model: {loaded.description} ({mcfg.num_layers} layers x {mcfg.num_heads} heads, "
          f"attention={mcfg.attention}, n={mcfg.max_seq_len})", flush=True)
    print(f"data:  {data_desc}", flush=True)

    def progress(done: int, seconds: float) -> None:
        if done == 1 or done % max(1, len(samples) // 10) == 0 or done == len(samples):
            print(f"  {done}/{len(samples)} samples, {seconds:.1f} s", flush=True)

    svd_dtype = {"float32": torch.float32, "float64": torch.float64}[args.svd_dtype]
    result = measure_spectrum(
        loaded.model, samples, shares=sorted(set(SHARE_GRID) | {share}), svd_dtype=svd_dtype,
        compare_linformer=not args.no_compare, memory_budget_bytes=args.memory_budget_mib << 20,
        progress=progress,
        info={"model": loaded.description, "data": data_desc,
              "tokenizer": str(tok_used) if tok_used else None, "seed": args.seed})
    out = Path(args.out)
    js, npz = result.save(out, share)
    text = _recommend_and_write(result, args, out, dataclasses.asdict(mcfg))
    cum = plot_cumulative(result, out / "spectrum_cumulative.png", share)
    heat = plot_rank_heatmap(result, out / "spectrum_rank_heatmap.png", share)
    import yaml

    k = yaml.safe_load(text)["model"]["k"]
    print()
    _print_table(result, share, k)
    print(f"\nrecommended schedule (checked with load_config):\n{text}")
    print(f"wrote {js}, {npz}, {cum}, {heat}, {out / 'k_schedule.yaml'}")
    return 0


def cmd_recommend(args) -> int:
    from linformer_train.spectrum import SpectrumResult, plot_rank_heatmap

    result = SpectrumResult.load(args.spectrum)
    share = _share(args.share)
    out = Path(args.out) if args.out else Path(args.spectrum)
    text = _recommend_and_write(result, args, out, None)
    heat = plot_rank_heatmap(result, out / f"spectrum_rank_heatmap_{share:g}.png", share)
    import yaml

    _print_table(result, share, yaml.safe_load(text)["model"]["k"])
    print(f"\n{text}")
    print(f"wrote {out / 'k_schedule.yaml'}, {heat}")
    return 0


def cmd_compare(args) -> int:
    from linformer_train.spectrum import (SpectrumError, final_losses, pair_with_baseline,
                                          plot_loss_curves, read_metrics)

    labels = args.labels or [Path(r).name for r in args.runs]  # repeat a label for seeds of one setting
    if len(labels) != len(args.runs):
        raise SpectrumError(f"--labels has {len(labels)} names for {len(args.runs)} runs; give one each")
    runs = list(zip(labels, args.runs))
    print(f"{'run':<44} {'steps':>6} {'train loss':>10} {'val loss':>9} {'val acc':>8}   "
          f"(train loss: mean of the last {args.last} logs; val: last evaluation)")
    by_label: dict[str, list[tuple[float, float, float]]] = {}
    for label, run in runs:
        m = read_metrics(run)
        train_loss, val_loss = final_losses(run, last=args.last)
        evals = m.get("eval") or [{}]
        row = (train_loss, val_loss, evals[-1].get("accuracy", float("nan")))
        by_label.setdefault(label, []).append(row)
        steps = (m.get("train") or [{"step": 0}])[-1]["step"]
        name = label if labels.count(label) == 1 else f"{label} ({Path(run).name})"
        print(f"{name:<44} {steps:>6} {row[0]:>10.4f} {row[1]:>9.4f} {row[2]:>8.4f}")
    if any(len(v) > 1 for v in by_label.values()):
        print(f"\n{'setting (mean over runs)':<44} {'runs':>6} {'train loss':>10} {'val loss':>9} {'val acc':>8}")
        for label, rows in by_label.items():
            mean = [sum(r[i] for r in rows) / len(rows) for i in range(3)]
            print(f"{label:<44} {len(rows):>6} {mean[0]:>10.4f} {mean[1]:>9.4f} {mean[2]:>8.4f}")
    if args.baseline:
        print(f"\nminus {args.baseline!r} of the same seed (negative = better):")
        print(f"{'setting':<44} {'seeds':>6} {'delta train':>11} {'delta val':>10}   delta val per seed")
        for label, pairs in pair_with_baseline(runs, args.baseline).items():
            deltas = [tuple(a - b for a, b in zip(final_losses(run, last=args.last),
                                                  final_losses(base, last=args.last)))
                      for run, base in pairs]
            dt = sum(d[0] for d in deltas) / len(deltas)
            dv = sum(d[1] for d in deltas) / len(deltas)
            each = ", ".join(f"{d[1]:+.3f}" for d in deltas)
            print(f"{label:<44} {len(deltas):>6} {dt:>+11.4f} {dv:>+10.4f}   {each}")
    if args.out:
        path = plot_loss_curves(runs, args.out, title=args.title, from_step=args.from_step,
                                baseline=args.baseline)
        print(f"wrote {path}")
    return 0


def main(argv) -> int:
    parser = make_parser("spectrum", "Attention spectra per layer and head, and a per-layer k schedule.")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("measure", help="measure spectra and recommend k")
    m.add_argument("model", help="model directory (model.safetensors + config.yaml + tokenizer, "
                                 "also a RoBERTa warm start) or a run's DeepSpeed checkpoint")
    m.add_argument("--data", nargs="+", required=True, metavar="SRC",
                   help="a prepared data directory, 'builtin' (the sample corpus), or text/JSONL/"
                        "Parquet files, globs or directories")
    m.add_argument("-n", "--seq-len", type=int, default=None, help="sequence length (default: the model's n)")
    m.add_argument("--samples", type=int, default=32, help="sequences to measure (default 32)")
    m.add_argument("--split", default="validation", help="prepared data: train | validation")
    m.add_argument("--tokenizer", default=None, help="for text data when the model has none")
    m.add_argument("--max-tokens", type=int, default=5_000_000,
                   help="text data: read at most this many tokens to draw samples from")
    m.add_argument("--seed", type=int, default=0, help="text data: which blocks are drawn")
    m.add_argument("--svd-dtype", default="float32", choices=["float32", "float64"])
    m.add_argument("--memory-budget-mib", type=int, default=512,
                   help="(n, n) matrices held at once, per layer (default 512 MiB)")
    m.add_argument("--no-compare", action="store_true",
                   help="Linformer models: skip the comparison with full attention of the same weights")
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    m.add_argument("--out", default="runs/spectrum", help="output directory (default runs/spectrum)")
    _schedule_args(m)
    m.set_defaults(func=cmd_measure)

    r = sub.add_parser("recommend", help="a k schedule from an earlier measurement")
    r.add_argument("spectrum", help="directory with spectrum.json and spectrum.npz")
    r.add_argument("--out", default=None, help="where k_schedule.yaml goes (default: the spectrum directory)")
    _schedule_args(r)
    r.set_defaults(func=cmd_recommend)

    c = sub.add_parser("compare", help="loss curves of runs side by side")
    c.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    c.add_argument("--labels", nargs="+", default=None)
    c.add_argument("--out", default=None, help="PNG to write")
    c.add_argument("--title", default=None)
    c.add_argument("--last", type=int, default=5, help="train logs averaged for the final train loss")
    c.add_argument("--from-step", type=int, default=0, help="plot from this step on")
    c.add_argument("--baseline", default=None, metavar="LABEL",
                   help="also compare each setting with this one, seed by seed (the i-th run of "
                        "each label pairs with the i-th run of the baseline)")
    c.set_defaults(func=cmd_compare)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
