"""What a run tells its user (rank 0): one line per start-up phase, and at the end a summary with
a baseline to read the numbers against, plus (for the quickstart) a fill-mask demonstration.

The baseline: a unigram model, each masked token predicted by its frequency in the training
blocks (add-one smoothed, special tokens excluded), scored on the same validation positions the
model is evaluated on. An MLM that has learned anything beats it; one that has not sits near it.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
import torch

from linformer_train.config import Config, k_schedule, stage_config
from linformer_train.train.mfu import Peak

if TYPE_CHECKING:  # pragma: no cover
    from linformer_train.data.prepare import BlockSet

IGNORE = -100
UNIGRAM_SAMPLE_TOKENS = 4_000_000
"""The baseline's frequencies come from at most this many training tokens (evenly spaced blocks)."""


def console_logging(enabled: bool) -> None:
    """Our modules' INFO lines (data preparation's phases) on stdout on rank 0, nothing elsewhere."""
    logger = logging.getLogger("linformer_train")
    if not any(getattr(h, "_linformer_console", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._linformer_console = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    logger.propagate = False


def fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ------------------------------------------------------------------------------------- start-up


def model_line(cfg: Config, n_params: int) -> str:
    m = cfg.model
    if m.attention == "linformer":
        ks = k_schedule(m)
        k = str(ks[0]) if len(set(ks)) == 1 else "[" + ", ".join(map(str, ks)) + "]"
        attn = f"linformer k={k}, sharing {m.sharing}, projection {m.projection}"
    else:
        attn = f"{m.attention} attention"
    return (f"model: {fmt_count(n_params)} parameters | {m.num_layers} layers x {m.hidden_size} "
            f"({m.num_heads} heads, FFN {m.ffn_size}) | n={m.max_seq_len} | {attn} | {m.norm}-norm")


def engine_line(cfg: Config, world: int, device: torch.device, peak: Peak) -> str:
    """``peak``: linformer_train.train.mfu.Peak (its source is said: stated, datasheet or measured)."""
    p, z, t = cfg.precision, cfg.zero, cfg.train
    offload = " + optimizer offload" if z.offload_optimizer else ""
    offload += " + parameter offload" if z.offload_params else ""
    source = "train.peak_tflops" if peak.source == "stated" else peak.source
    return (f"engine: DeepSpeed ZeRO-{z.stage}{offload} | {p.dtype} | {world} rank(s) on {device.type} | "
            f"batch {t.micro_batch_size * t.grad_accum_steps * world} sequences = {t.micro_batch_size} x "
            f"{t.grad_accum_steps} accumulation x {world} rank(s) | MFU against {peak.flops / 1e12:.3g} "
            f"TFLOP/s ({source})")


def plan_line(cfg: Config, start_step: int, world: int, checkpoints: str) -> str:
    t, o, c = cfg.train, cfg.optim, cfg.checkpoint
    tokens = (t.max_steps - start_step) * t.micro_batch_size * t.grad_accum_steps * world * cfg.model.max_seq_len
    evals = f"eval every {t.eval_every}" if t.eval_every else "no evaluation"
    saves = f"checkpoint every {c.save_every} -> {checkpoints}" if c.save_every else f"checkpoint at the end -> {checkpoints}"
    return (f"training: steps {start_step + 1}-{t.max_steps} ({fmt_count(tokens)} tokens), lr {o.lr:g} "
            f"({o.warmup_steps} warmup steps, then {o.decay}); {evals}; {saves}")


def _stage_shape(cfg: Config) -> str:
    m, t = cfg.model, cfg.train
    ks = k_schedule(m) if m.attention == "linformer" else []
    k = "" if not ks else f", k={ks[0]}" if len(set(ks)) == 1 else f", k={ks}"
    return f"n={m.max_seq_len}{k}, micro-batch {t.micro_batch_size} x {t.grad_accum_steps}, lr {cfg.optim.lr:g}"


def stage_note(run_cfg: Config, index: int, world: int) -> str:
    """`` | stage i/N (...)`` for a staged run, else nothing."""
    if not run_cfg.stages:
        return ""
    return f" | stage {index + 1}/{len(run_cfg.stages)} ({_stage_shape(stage_config(run_cfg, index, world))})"


def stages_line(run_cfg: Config, world: int) -> Optional[str]:
    """One line with every stage's steps and shape, for a staged run."""
    if not run_cfg.stages:
        return None
    parts, first = [], 1
    for i, st in enumerate(run_cfg.stages):
        last = st.until_step or run_cfg.train.max_steps
        parts.append(f"{i + 1}) steps {first}-{last}: {_stage_shape(stage_config(run_cfg, i, world))}")
        first = last + 1
    return "stages: " + "; ".join(parts)


def stage_change(old: Config, new: Config) -> str:
    """What a boundary changes, e.g. ``n 512 -> 4096, k 128 -> 256, micro-batch 32 -> 4``."""
    pairs = [("n", old.model.max_seq_len, new.model.max_seq_len), ("k", old.model.k, new.model.k),
             ("micro-batch", old.train.micro_batch_size, new.train.micro_batch_size),
             ("accumulation", old.train.grad_accum_steps, new.train.grad_accum_steps),
             ("lr", f"{old.optim.lr:g}", f"{new.optim.lr:g}")]
    changes = [f"{name} {a} -> {b}" for name, a, b in pairs if a != b]
    return ", ".join(changes) or "no change"


# ------------------------------------------------------------------------------------ baseline


def unigram_log_probs(blocks: "BlockSet", vocab_size: int, special_ids: Iterable[int],
                      max_tokens: int = UNIGRAM_SAMPLE_TOKENS) -> torch.Tensor:
    """log p(token) from token counts over (a sample of) the training blocks, add-one smoothed;
    special tokens get no mass (masking never picks them)."""
    per_block = blocks.seq_len
    take = max(1, min(len(blocks), max_tokens // max(1, per_block)))
    index = np.linspace(0, len(blocks) - 1, take).round().astype(np.int64)
    counts = np.zeros(vocab_size, dtype=np.float64)
    for start in range(0, len(index), 256):
        rows = blocks.take(index[start:start + 256]).astype(np.int64).reshape(-1)
        counts += np.bincount(rows, minlength=vocab_size)[:vocab_size]
    counts += 1.0
    for i in special_ids:
        if 0 <= i < vocab_size:
            counts[i] = 0.0
    probs = counts / counts.sum()
    with np.errstate(divide="ignore"):
        return torch.from_numpy(np.log(probs))


def unigram_sums(log_probs: torch.Tensor, batches: Iterable[dict]) -> tuple[float, float]:
    """(sum of -log p, count) of the unigram model over the predicted positions of ``batches``."""
    total, count = 0.0, 0.0
    for b in batches:
        labels = b["labels"][b["labels"] != IGNORE]
        total += float(-log_probs[labels].sum())
        count += float(labels.numel())
    return total, count


# --------------------------------------------------------------------------------- the summary


def summary_lines(*, cfg: Config, steps: int, start_step: int, tokens: int, seconds: float,
                  stopped_early: bool, train: Optional[dict], evaluation: Optional[dict],
                  unigram_ppl: Optional[float], checkpoint: Optional[str], run_dir: str) -> list[str]:
    head = (f"done: steps {start_step + 1}-{steps}" if steps > start_step else f"done: no steps to run (at step {steps})")
    if stopped_early:
        head += f" (stopped before train.max_steps={cfg.train.max_steps})"
    lines = [f"{head}; {fmt_count(tokens)} tokens in {fmt_seconds(seconds)} "
             f"({fmt_count(tokens / max(seconds, 1e-9))} tokens/s)"]
    if train:
        lines.append(f"  train (last logged window): loss {train['loss']:.4f} | perplexity {train['perplexity']:.4g} | "
                     f"accuracy {train['accuracy']:.3f}")
    if evaluation:
        base = f" | unigram baseline perplexity {unigram_ppl:.4g} on the same positions" if unigram_ppl else ""
        lines.append(f"  eval  (validation, step {steps}): loss {evaluation['loss']:.4f} | perplexity "
                     f"{evaluation['perplexity']:.4g} | accuracy {evaluation['accuracy']:.3f}{base}")
    if checkpoint:
        lines.append(f"  checkpoint: {checkpoint} (continue with --resume; export with tools/convert.py export "
                     f"{run_dir} OUT)")
    tb = f" | TensorBoard: {run_dir}/tensorboard" if cfg.logging.tensorboard else ""
    lines.append(f"  metrics: {run_dir}/metrics.jsonl{tb} | config: {run_dir}/config.yaml")
    return lines


# ------------------------------------------------------------------------------ fill-mask demo


def fill_mask_examples(blocks: "BlockSet", tokenizer, count: int, width: int = 12,
                       seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """``count`` (block, position) pairs from held-out blocks: a whole word of one piece with at
    least 3 letters, ``width`` tokens of context on each side."""
    rng = np.random.default_rng(seed)
    word_start = getattr(tokenizer, "word_start", None)
    special = set(getattr(tokenizer, "special_ids", {}).values())
    picks = []
    for i in rng.permutation(len(blocks))[: 50 * count]:
        ids = blocks[int(i)].astype(np.int64)
        for _ in range(20):
            p = int(rng.integers(width, len(ids) - width - 1))
            t, nxt = int(ids[p]), int(ids[p + 1])
            if t in special:
                continue
            if word_start is not None and not (word_start[t] and word_start[nxt]):
                continue
            piece = tokenizer.decode([t]).strip()
            if len(piece) >= 3 and piece.isalpha():
                picks.append((ids, p))
                break
        if len(picks) == count:
            break
    return picks


def fill_mask_lines(picks: list[tuple[np.ndarray, int]], logits: torch.Tensor, tokenizer,
                    width: int = 12, top: int = 3) -> list[str]:
    """Lines showing each masked word in its context, the model's top guesses and the answer."""
    lines = ["fill-mask on held-out text (the model's top guesses for each <mask>):"]
    probs = logits.float().softmax(-1)
    for row, (ids, p) in enumerate(picks):
        left = tokenizer.decode(ids[p - width:p].tolist()).replace("\n", " ")
        right = tokenizer.decode(ids[p + 1:p + 1 + width].tolist()).replace("\n", " ")
        best = probs[row].topk(top)
        guesses = ", ".join(f"{tokenizer.decode([int(i)]).strip() or repr(tokenizer.decode([int(i)]))} "
                            f"{100 * float(v):.0f}%" for v, i in zip(best.values, best.indices))
        answer = tokenizer.decode([int(ids[p])]).strip()
        lines.append(f"  ...{left} <mask> {right}...")
        lines.append(f"      guesses: {guesses} | answer: {answer}")
    return lines


def elapsed_since(t0: float) -> str:
    return fmt_seconds(time.perf_counter() - t0)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
