"""The fine-tuning loop on the pretraining engine: DeepSpeed (ZeRO 0-3, bf16, several ranks) built
by the same ``build_ds_config``, AdamW groups and LR schedule (``train.trainer``), one
``MetricsLogger`` (console + TensorBoard).

Per seed: load the pretrained directory as a classifier (fresh head), or build one from a random
init (``model.pretrained=none``, seeded by the run's seed: the baseline), train ``epochs`` epochs with
linear warmup over ``warmup_ratio`` of the steps then decay, evaluate after every epoch (and every
``eval_every`` steps), and keep the best model by ``task.metric`` as a model directory
(``seed_<s>/best``, fp32 master weights gathered from any ZeRO stage) that ``predict`` and
``from_pretrained`` load. Over seeds, ``results.json`` reports each run and the mean and sample
std of its best metrics.

Loss: mean cross-entropy per micro-batch; every micro-batch is full (the sampler wraps), and
DeepSpeed divides by the accumulation steps and averages over ranks, so each step's gradient is that
of the mean over the global batch.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from linformer_train.config import ConfigError, ModelConfig
from linformer_train.convert.model_dir import (build_model, from_pretrained, load_model_info,
                                               read_model_config, save_pretrained, tokenizer_file)
from linformer_train.data import DataError
from linformer_train.finetune.config import (RANDOM_INIT, FinetuneConfig, ds_view, random_init_config,
                                             to_dict)
from linformer_train.finetune.data import Encoded, encode, eval_batches, steps_per_epoch, train_batches
from linformer_train.finetune.metrics import classification_metrics, mean_std
from linformer_train.finetune.tasks import (ResolvedTask, build_label_list, label_ids, load_split,
                                            resolve_task)

METRICS = ("accuracy", "f1", "mcc")


class FinetuneError(RuntimeError):
    """Fine-tuning cannot go on (a non-finite loss); one line, said once."""


@dataclass
class PreparedTask:
    task: ResolvedTask
    labels: list[str]
    train: Encoded
    eval: Encoded
    max_length: int
    pretrained: Optional[Path]
    """The model directory fine-tuning starts from; None for a random init."""
    model_info: dict
    model_cfg: ModelConfig
    tokenizer_path: Path


def prepare_task(cfg: FinetuneConfig) -> PreparedTask:
    """Read, check and tokenize the task's data (every rank does the same, so every rank raises
    the same error on bad input and none waits at a barrier)."""
    from linformer_train.data.tokenizer import load_tokenizer

    if cfg.model.pretrained == RANDOM_INIT:
        pretrained = None
        tokenizer = load_tokenizer(cfg.model.tokenizer)
        tokenizer_path = tokenizer.path
        model_cfg = random_init_config(cfg.model, tokenizer.vocab_size, tokenizer.special_ids["pad"])
        info = {"architecture": "mlm", "source": {"kind": "random-init"}}
        where = "model.random_init"
    else:
        pretrained = Path(cfg.model.pretrained)
        info = load_model_info(pretrained)
        model_cfg = read_model_config(pretrained)
        tokenizer_path = tokenizer_file(pretrained)
        tokenizer = load_tokenizer(tokenizer_path)
        where = str(pretrained)
    n = model_cfg.max_seq_len
    max_length = cfg.model.max_length or n
    if max_length > n:
        fix = (f"set model.random_init.max_seq_len={max_length}" if pretrained is None else
               f"resize the model first (tools/convert.py resize {pretrained} OUT model.max_seq_len={max_length})")
        raise ConfigError(f"model.max_length={max_length} exceeds the model's n={n}; {fix}")
    task = resolve_task(cfg.task)
    train = load_split(cfg.task, task, "train")
    evaluation = load_split(cfg.task, task, "eval")
    labels = build_label_list(train, cfg.task.labels)
    if info["architecture"] == "classification" and info.get("labels") != labels:
        raise DataError(f"{pretrained} is a classifier for labels {info.get('labels')} but this task has "
                        f"{labels}; fine-tune from the pretrained MLM directory instead")
    if tokenizer.vocab_size > model_cfg.vocab_size:
        fix = ("raise model.random_init.vocab_size or leave it unset" if pretrained is None
               else "the directory is inconsistent, export it again")
        raise DataError(f"{tokenizer_path} has {tokenizer.vocab_size} pieces but {where} has "
                        f"{model_cfg.vocab_size} embedding rows; {fix}")
    if cfg.model.long_inputs == "windows" and task.is_pair:
        raise ConfigError("model.long_inputs=windows splits single texts, but this task classifies sentence "
                          "pairs; use model.long_inputs=truncate (pairs are cut longest-first)")
    if cfg.model.window_stride is not None and cfg.model.window_stride > max_length - 2:
        raise ConfigError(f"model.window_stride={cfg.model.window_stride} exceeds a window's "
                          f"{max_length - 2} content tokens (max_length - 2): it would skip tokens")
    long = dict(long_inputs=cfg.model.long_inputs, stride=cfg.model.window_stride)
    train_enc = encode(tokenizer, train, max_length, label_ids(train, labels), **long)
    eval_enc = encode(tokenizer, evaluation, max_length, label_ids(evaluation, labels), **long)
    return PreparedTask(task, labels, train_enc, eval_enc, max_length, pretrained, info, model_cfg,
                        tokenizer_path)


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def gather_fp32_state(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the engine's module on every rank (collective under ZeRO-3):
    ZeRO >= 1 through DeepSpeed's safe_get_full_fp32_param; ZeRO-0 with bf16/fp16 from the
    optimizer's fp32 copies; ZeRO-0 fp32 from the module itself."""
    from deepspeed.utils import safe_get_full_fp32_param

    stage = engine.zero_optimization_stage()
    masters = {}
    opt = engine.optimizer
    if stage == 0 and hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
        for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups):
            masters.update({id(p): f for p, f in zip(g16, g32)})
    state = {}
    for name, p in engine.module.named_parameters():
        if stage >= 1:
            t = safe_get_full_fp32_param(p)
        else:
            t = masters.get(id(p), p)
        state[name] = t.detach().float().cpu().clone()
    return state


def _build_optimizer(model, cfg: FinetuneConfig):
    from linformer_train.train.trainer import param_groups

    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if cfg.zero.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


class SeedRun:
    """One fine-tuning run (one seed) on one DeepSpeed engine."""

    def __init__(self, cfg: FinetuneConfig, prep: PreparedTask, seed: int, out_dir: Path):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from linformer_train.model import apply_activation_checkpointing
        from linformer_train.train.ds_config import build_ds_config
        from linformer_train.train.metrics import MetricsLogger

        self.cfg, self.prep, self.seed, self.out_dir = cfg, prep, seed, out_dir
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        accel = get_accelerator()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))  # as the pretraining Trainer places itself
        self.device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
        tr = cfg.train
        self.global_batch = tr.micro_batch_size * tr.grad_accum_steps * self.world
        per_epoch = steps_per_epoch(len(prep.train), self.global_batch)
        self.total_steps = min(tr.max_steps or per_epoch * tr.epochs, per_epoch * tr.epochs)
        self.epochs = -(-self.total_steps // per_epoch)
        self.warmup = int(math.ceil(cfg.optim.warmup_ratio * self.total_steps))
        self.pad_to = prep.max_length if cfg.model.padding == "max_length" else None

        _set_seed(seed)  # the classifier head's init and dropout
        overrides = {k: v for k, v in (("dropout", cfg.model.dropout),
                                       ("attention_dropout", cfg.model.attention_dropout)) if v is not None}
        if prep.pretrained is None:  # every weight from this seed's random init
            model = build_model(replace(prep.model_cfg, num_labels=len(prep.labels), **overrides),
                                "classification").train()
        else:
            model = from_pretrained(prep.pretrained, "classification", num_labels=len(prep.labels),
                                    model_overrides=overrides).train()
        self.model_cfg = model.cfg
        if cfg.model.activation_checkpointing:
            apply_activation_checkpointing(model)
        ds_config = build_ds_config(ds_view(cfg), self.world)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=_build_optimizer(model, cfg), config=ds_config, dist_init_required=False)
        if self.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLogger(out_dir, cfg.logging.log_every, cfg.logging.tensorboard,
                                     self.is_main, self.total_steps)
        self.step = 0
        self.history: list[dict] = []
        self.best: Optional[dict] = None

    # ------------------------------------------------------------------------------------- train

    def run(self) -> dict:
        from linformer_train.train.trainer import lr_at

        cfg, engine = self.cfg, self.engine
        o, tr = cfg.optim, cfg.train
        t0 = time.perf_counter()
        window = {"loss": torch.zeros((), device=self.device), "correct": torch.zeros((), device=self.device),
                  "seen": 0, "tokens": 0, "t": time.perf_counter(), "steps": 0}
        try:
            for epoch in range(self.epochs):
                batches = train_batches(self.prep.train, self.seed, epoch, tr.micro_batch_size,
                                        tr.grad_accum_steps, self.rank, self.world, self.pad_to)
                for micro in batches:
                    lr = lr_at(self.step, o.lr, self.warmup, self.total_steps, o.decay, o.min_lr_ratio)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    for b in micro:
                        logits = engine(b["input_ids"].to(self.device), b["attention_mask"].to(self.device))
                        labels = b["labels"].to(self.device)
                        loss = F.cross_entropy(logits.float(), labels)
                        engine.backward(loss)
                        engine.step()
                        window["loss"] += loss.detach() * len(labels)
                        window["correct"] += (logits.argmax(-1) == labels).sum()
                        window["seen"] += len(labels)
                        window["tokens"] += int(b["attention_mask"].sum())
                    self.step += 1
                    window["steps"] += 1
                    if self.metrics.should_log(self.step):
                        self._log_train(window, lr, t0)
                        window.update(loss=torch.zeros((), device=self.device),
                                      correct=torch.zeros((), device=self.device), seen=0, tokens=0,
                                      t=time.perf_counter(), steps=0)
                    if tr.eval_every and self.step % tr.eval_every == 0 and self.step < self.total_steps:
                        self._evaluate(epoch + 1)
                    if self.step >= self.total_steps:
                        break
                self._evaluate(epoch + 1)
        finally:
            self.metrics.close()
        seconds = time.perf_counter() - t0
        result = {"seed": self.seed, "steps": self.step, "epochs": self.epochs, "train_seconds": round(seconds, 2),
                  "best": self.best, "history": self.history,
                  "model_dir": str(self.out_dir / "best")}
        if self.is_main:
            _write_json(self.out_dir / "results.json", result)
        self.engine.destroy()
        return result

    def _log_train(self, window: dict, lr: float, t0: float) -> None:
        stats = torch.stack([window["loss"], window["correct"].float(),
                             torch.tensor(float(window["seen"]), device=self.device),
                             torch.tensor(float(window["tokens"]), device=self.device)])
        dist.all_reduce(stats)
        loss_sum, correct, seen, tokens = stats.tolist()
        loss = loss_sum / max(seen, 1.0)
        if not math.isfinite(loss):
            raise FinetuneError(f"non-finite training loss at step {self.step}; lower optim.lr or use "
                                f"precision.dtype=bf16 instead of fp16")
        elapsed = time.perf_counter() - window["t"]
        rate = self.step / max(time.perf_counter() - t0, 1e-9)
        self.metrics.log({"loss": loss, "accuracy": correct / max(seen, 1.0), "lr": lr,
                          "tokens_per_s": tokens / max(elapsed, 1e-9),
                          "samples_per_s": seen / max(elapsed, 1e-9),
                          "eta_s": (self.total_steps - self.step) / rate}, self.step)

    # ---------------------------------------------------------------------------------- evaluate

    @torch.no_grad()
    def predict_eval(self) -> tuple[np.ndarray, float]:
        """Predictions for every eval example (all ranks get them) and the mean eval loss (per
        row: with windows, per window). With windows, an example's prediction is the argmax of
        the mean of its windows' logits."""
        engine = self.engine
        engine.eval()
        bs = self.cfg.train.eval_batch_size or self.cfg.train.micro_batch_size
        local_idx, local_pred = [], []
        loss_sum = torch.zeros((), device=self.device)
        for idx, b in eval_batches(self.prep.eval, bs, self.rank, self.world, self.pad_to):
            logits = engine(b["input_ids"].to(self.device), b["attention_mask"].to(self.device)).float()
            if len(idx) == 0:
                continue  # a dummy batch: keeps ZeRO-3's collective forwards in step across ranks
            labels = b["labels"].to(self.device)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            local_idx.append(idx)
            local_pred.append(logits.cpu().numpy())
        engine.train()
        dist.all_reduce(loss_sum)
        mine = (np.concatenate(local_idx) if local_idx else np.zeros(0, np.int64),
                np.concatenate(local_pred) if local_pred else np.zeros((0, len(self.prep.labels)), np.float32))
        gathered = [None] * self.world
        dist.all_gather_object(gathered, mine)
        logits = np.full((len(self.prep.eval), len(self.prep.labels)), np.nan, dtype=np.float32)
        for idx, pred in gathered:
            logits[idx] = pred
        assert not np.isnan(logits).any(), "every eval example is predicted exactly once"
        if self.prep.eval.doc is not None:
            from linformer_train.data.windows import aggregate

            logits = aggregate(torch.from_numpy(logits), self.prep.eval.doc, self.prep.eval.num_docs).numpy()
        return logits.argmax(-1), float(loss_sum) / len(self.prep.eval)

    def _evaluate(self, epoch: int) -> None:
        preds, loss = self.predict_eval()
        scores = classification_metrics(preds, self.prep.eval.doc_labels, len(self.prep.labels))
        record = {"epoch": epoch, "step": self.step, "loss": loss, **scores}
        self.history.append(record)
        self.metrics.log({"loss": loss, **scores}, self.step, prefix="eval")
        metric = self.cfg.task.metric
        if self.best is None or scores[metric] > self.best[metric]:
            self.best = dict(record)
            self._save_best()

    def _save_best(self) -> None:
        state = gather_fp32_state(self.engine)  # collective: every rank takes part
        if self.is_main:
            model = build_model(self.model_cfg, "classification")
            model.load_state_dict(state, strict=True)
            task = {**self.prep.task.describe(), "max_length": self.prep.max_length,
                    "metric": self.cfg.task.metric, "long_inputs": self.cfg.model.long_inputs,
                    "window_stride": self.cfg.model.window_stride}
            start = "random init" if self.prep.pretrained is None else str(self.prep.pretrained.resolve())
            source = {"kind": "finetune", "from": start, "seed": self.seed,
                      "epoch": self.best["epoch"], "step": self.step,
                      "eval": {k: self.best[k] for k in METRICS}}
            save_pretrained(model, self.out_dir / "best", tokenizer=self.prep.tokenizer_path,
                            labels=self.prep.labels, task=task, source=source, overwrite=True)
        dist.barrier()


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    tmp.replace(path)


def check_output_apart_from_inputs(cfg: FinetuneConfig) -> None:
    """train.output_dir may not be, contain or sit inside the pretrained model or the data files."""
    from linformer_train.paths import check_output_apart

    pretrained = cfg.model.pretrained if cfg.model.pretrained not in ("", RANDOM_INIT) else None
    check_output_apart(cfg.train.output_dir, {"the pretrained model": pretrained, "the training file":
                                              cfg.task.train_file, "the evaluation file": cfg.task.eval_file},
                       "train.output_dir")


def run_finetune(cfg: FinetuneConfig, prep: Optional[PreparedTask] = None) -> dict:
    """Every seed of ``cfg`` on the initialised process group; returns (and on rank 0 writes to
    ``output_dir/results.json``) the summary."""
    from omegaconf import OmegaConf

    check_output_apart_from_inputs(cfg)
    prep = prep or prepare_task(cfg)
    out = Path(cfg.train.output_dir)
    rank = dist.get_rank()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
        if prep.train.doc is None:
            cut = f"truncated: {prep.train.truncated} train, {prep.eval.truncated} eval"
        else:
            cut = f"windows: {len(prep.train)} train, {len(prep.eval)} eval"
        print(f"task {prep.task.name}: {prep.train.num_docs} train / {prep.eval.num_docs} eval examples, labels "
              f"{prep.labels}, max_length {prep.max_length} ({cut})", flush=True)
    runs = [SeedRun(cfg, prep, seed, out / f"seed_{seed}").run() for seed in cfg.train.seeds]
    metric = cfg.task.metric
    best_run = max(runs, key=lambda r: r["best"][metric])
    summary = {
        "task": prep.task.describe(), "pretrained": str(prep.pretrained or RANDOM_INIT),
        "labels": prep.labels,
        "num_train": prep.train.num_docs, "num_eval": prep.eval.num_docs, "max_length": prep.max_length,
        "truncated_train": prep.train.truncated, "truncated_eval": prep.eval.truncated,
        "long_inputs": cfg.model.long_inputs, "windows_train": len(prep.train), "windows_eval": len(prep.eval),
        "metric": metric, "seeds": list(cfg.train.seeds),
        "per_seed": [{"seed": r["seed"], **{k: r["best"][k] for k in (*METRICS, "epoch")}} for r in runs],
        "mean": {}, "std": {},
        "best_seed": best_run["seed"], "best_model_dir": best_run["model_dir"],
    }
    for k in METRICS:
        summary["mean"][k], summary["std"][k] = mean_std([r["best"][k] for r in runs])
    if rank == 0:
        _write_json(out / "results.json", summary)
        line = " | ".join(f"{k} {summary['mean'][k]:.4f} ± {summary['std'][k]:.4f}" for k in METRICS)
        print(f"{len(runs)} seed(s), best per seed by {metric}: {line}; best model {best_run['model_dir']}",
              flush=True)
    return summary


__all__ = ["run_finetune", "prepare_task", "SeedRun", "gather_fp32_state", "FinetuneError"]
