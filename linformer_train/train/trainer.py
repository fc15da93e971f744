"""The pretraining loop: build (data, model, DeepSpeed engine), train(), train_step(), evaluate().

Loss normalisation. The MLM loss is the mean cross-entropy over every predicted token of the
*global* batch (all micro-batches of a step, all data-parallel ranks), so long and short masks
weigh each token equally whatever the accumulation or rank count. The count of predicted tokens is
known on the host before the forward (the loader made the masks), is summed over ranks with one
all-reduce, and each micro-batch backpropagates ``loss_sum * (accum x ranks) / global_count``:
DeepSpeed divides by the accumulation steps in ``backward`` and averages gradients over ranks,
which cancels the factor, leaving the gradient of sum(loss) / global_count.

Host syncs: one per optimizer step (the all-reduced flags every rank must agree on: a stop request,
a non-finite loss, a step the optimizer skipped; read with one tolist) plus the metrics on logging
steps. The masked positions reach the model as flat indices from the loader (index_select, no
nonzero), batches are pinned on CUDA for non_blocking copies, and the optimizer is the fused AdamW
(no .item() per parameter). DeepSpeed's ZeRO >= 1 step adds its own overflow checks
(tests/test_sync.py counts them all).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function

from linformer_train.config import (Config, ConfigError, config_from_dict, save_config, stage_config,
                                    stage_index, to_dict)
from linformer_train.model import (
    LinformerForMLM,
    apply_activation_checkpointing,
    apply_compile,
)
from linformer_train.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    check_world_size,
    read_client_state,
    unreadable_reason,
    verify_contents,
    verify_universal,
)
from linformer_train.serialization import (
    UnsafeFileError,
    allow_deepspeed_records,
    forbid_code_in_loads,
    is_refusal,
    refusal,
)
from linformer_train.serialization import load as load_weights_only
from linformer_train.train import report
from linformer_train.train.distributed import quiet_deepspeed
from linformer_train.train.ds_config import build_ds_config
from linformer_train.train.metrics import MetricsLogger, peak_memory_bytes
from linformer_train.train.mfu import device_peak, mfu, mlm_step_flops
from linformer_train.train.run_dir import (
    RunDirError,
    RunFileError,
    RunLock,
    claim_run_dir,
    set_aside_newer_checkpoints,
    took_over_note,
    trim_metrics,
)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite policy, skipped steps); one line, said once."""


def lr_at(step: int, lr: float, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then linear/cosine decay or constant.
    A pure function of the step, so resume needs no scheduler state."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / (total - warmup))  # total > warmup here
    if decay == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return lr * (min_ratio + (1.0 - min_ratio) * factor)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (dense, embeddings, E/F); none on biases and LayerNorm."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _set_seed(seed: int) -> None:
    seed %= 2**32  # numpy's range; seed + step (another rank count) may pass it
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG a step draws from, as tensors and plain data (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def compile_enabled(setting, device: torch.device) -> bool:
    """train.compile: true | false | auto (on where measured faster: CUDA, +15% tokens/s for base at
    n=8192 on an H100, docs/PERFORMANCE.md; off on CPU, where compiling costs more than it saves in
    the short runs it is used for)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite, as DeepSpeed's ZeRO and bf16/fp16
    optimizers do; used for fp32 at ZeRO stage 0, where DeepSpeed has no check. Without a host
    sync: the fused kernel reads the device flag ``found_inf`` (the same one torch's GradScaler sets)
    and leaves weights, moments and step count as they were; ``found_inf`` stays readable for the
    trainer's one per-step sync."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.found_inf: Optional[torch.Tensor] = None

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
            self.found_inf = (~finite).float()                   # () on the device, not read here
        self.grad_scale = None
        return super().step(closure)


class Trainer:
    """Owns the whole tree of config; everything below it gets sections."""

    def __init__(self, cfg: Config, on_checkpoint_stage: Optional[Callable[[str], None]] = None):
        forbid_code_in_loads()  # DeepSpeed's own torch.load calls included
        allow_deepspeed_records()
        self.lock: Optional[RunLock] = None
        try:
            self._build(cfg, on_checkpoint_stage)
        except BaseException:
            self._release()
            raise

    def _build(self, cfg: Config, on_checkpoint_stage: Optional[Callable[[str], None]]) -> None:
        from deepspeed.accelerator import get_accelerator

        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_main = self.rank == 0
        # rank 0 claims the run folder before anything is written; its resolved config is the one
        # every rank uses (and the one written to the run dir)
        refusal = None
        if self.is_main:
            for one in [stage_config(cfg, i) for i in range(len(cfg.stages))] or [cfg]:
                refusal = refusal or self._memory_refusal(one)
            refusal = ("config", refusal) if refusal else self._claim_run_dir(cfg)
        box = [to_dict(cfg), refusal]
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            kind, message = box[1]
            raise ConfigError(message) if kind == "config" else RunDirError(message)
        self.cfg = self.run_cfg = cfg = config_from_dict(box[0])  # cfg: the current stage's, below
        self.run_dir = Path(cfg.train.run_dir)
        accel = get_accelerator()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")

        # batch arithmetic errors before any work: every stage's (a staged run never trains with the
        # sections' own batch, whose accumulation a stage derives), else the run's
        for i in range(len(cfg.stages)):
            try:
                build_ds_config(self._stage_cfg(i), self.world_size)
            except ConfigError as exc:
                raise ConfigError(f"stages[{i}]: {exc}") from None
        if not cfg.stages:
            build_ds_config(cfg, self.world_size)
        supported = {"fp16": accel.is_fp16_supported, "bf16": accel.is_bf16_supported}
        if cfg.precision.dtype in supported and not supported[cfg.precision.dtype]():
            raise ConfigError(f"precision.dtype={cfg.precision.dtype} is not supported on this device "
                              f"({accel.device_name()}); use bf16 or fp32")
        self.resume_path = self._check_resume_target()
        self.stage = stage_index(cfg, self._checkpoint_step(self.resume_path))
        self.cfg = cfg = self._stage_cfg(self.stage)
        self._say(f"run: {self.run_dir} | " + (f"resuming from {self.resume_path}" if self.resume_path
                                              else "fresh start")
                  + report.stage_note(self.run_cfg, self.stage, self.world_size))
        if self.is_main:
            save_config(self.run_cfg, self.run_dir / "config.yaml")
        _set_seed(cfg.train.seed)

        report.console_logging(self.is_main)  # data preparation's phases, rank 0 only
        self._build_stage(None)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                             self.rank, on_checkpoint_stage)

        self.step = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        self.stage_start_samples = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._stop_requested = False
        dtype = "fp32" if self.device.type == "cpu" and cfg.precision.dtype == "fp16" else cfg.precision.dtype
        self.peak = device_peak(self.device, dtype, cfg.train.peak_tflops)  # stated, datasheet or measured
        self._say(report.engine_line(cfg, self.world_size, self.device, self.peak))
        self._resume()
        if self.is_main and self.step:
            note = trim_metrics(self.run_dir, self.step)  # the steps after the checkpoint run again
            if note:
                print(f"note: {note}", flush=True)
        self.metrics = MetricsLogger(self.run_dir, cfg.logging.log_every, cfg.logging.tensorboard,
                                     self.is_main, cfg.train.max_steps,
                                     purge_step=self.step + 1 if self.step else None)

    def _stage_cfg(self, index: int) -> Config:
        """The plain config of a stage (the run's own when it has no stages)."""
        return stage_config(self.run_cfg, index, self.world_size) if self.run_cfg.stages else self.run_cfg

    def _checkpoint_step(self, path: Optional[Path]) -> int:
        return int(read_client_state(path).get("step", 0)) if path is not None else 0

    def _build_stage(self, state: Optional[dict]) -> None:
        """Data, model, optimizer and engine for ``self.cfg``: from ``state`` (a full fp32 state
        dict, at a stage boundary), else from train.init_from or a fresh init."""
        import deepspeed

        from linformer_train.data.pipeline import build_training_data

        cfg = self.cfg
        t0 = time.perf_counter()
        self.data = build_training_data(cfg.data, cfg.model, cfg.train, self.run_dir,
                                        rank=self.rank, world_size=self.world_size)
        p, tok = self.data.prepared, self.data.tokenizer
        self._say(f"data: {len(p.train):,} train / {len(p.validation):,} validation blocks of n={p.train.seq_len} "
                  f"in {p.root} | tokenizer {tok.path} ({tok.vocab_size:,} pieces) | "
                  f"{report.fmt_seconds(time.perf_counter() - t0)}")

        model = LinformerForMLM(cfg.model)
        if state is not None:
            model.load_state_dict(state, strict=True)
        elif cfg.train.init_from and self.resume_path is None:
            self._init_from(model, Path(cfg.train.init_from))
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        if compile_enabled(cfg.train.compile, self.device):
            apply_compile(model)
        self.n_params = sum(p.numel() for p in model.parameters())
        self._say(report.model_line(cfg, self.n_params))
        optimizer = self._build_optimizer(model)
        with quiet_deepspeed(cfg.logging.verbose):
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=build_ds_config(cfg, self.world_size),
                dist_init_required=False)
        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * self.world_size

    def _memory_refusal(self, cfg: Config) -> Optional[str]:
        """Rank 0: a config whose memory floor exceeds this machine, refused before any work (an
        absurd size would otherwise reach the allocator minutes later, after data preparation)."""
        import psutil
        from deepspeed.accelerator import get_accelerator

        from linformer_train.model.memory import training_memory_floor

        p, z, t = cfg.precision, cfg.zero, cfg.train
        floor = training_memory_floor(cfg.model, t.micro_batch_size, p.dtype, z.stage, self.world_size,
                                      t.activation_checkpointing, z.offload_optimizer, z.offload_params,
                                      cfg.data.mask_prob)
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        host = psutil.virtual_memory().available / local
        if get_accelerator().device_name() == "cpu":
            device, have, need = "this machine's free memory", host, floor.device_total + floor.host_states
        else:
            device = f"{get_accelerator().device_name()}'s memory"
            have = get_accelerator().total_memory(int(os.environ.get("LOCAL_RANK", 0)))
            need = floor.device_total
            if floor.host_states > host:
                device, have, need = "this machine's free memory (optimizer offload)", host, floor.host_states
        if need <= have:
            return None
        gib = 2 ** 30
        return (f"this config needs at least {need / gib:,.1f} GiB per rank ({floor.params:,} parameters: "
                f"{floor.device_states / gib:,.1f} GiB of weights, gradients and optimizer states; "
                f"{floor.activations / gib:,.1f} GiB of activations at micro-batch {t.micro_batch_size}, "
                f"n={cfg.model.max_seq_len}) but {device} is {have / gib:,.1f} GiB per rank; shrink "
                f"model.vocab_size / hidden_size / num_layers or train.micro_batch_size, or spread it with "
                f"zero.stage over more ranks (or offload)")

    def _claim_run_dir(self, cfg: Config) -> Optional[tuple[str, str]]:
        """Rank 0: lock the run folder and refuse (or, asked to, move aside) another run's files.
        Returns ("run_dir", the error line) for every rank, or None."""
        run_dir = Path(cfg.train.run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(run_dir).acquire()
            notes = [took_over_note(self.lock)] + claim_run_dir(run_dir, cfg.checkpoint.resume,
                                                                cfg.checkpoint.overwrite)
        except RunDirError as exc:
            return ("run_dir", str(exc))
        except OSError as exc:
            return ("run_dir", f"train.run_dir={run_dir} cannot be used ({exc.strerror or exc}); it must be a "
                               f"folder this user can write")
        for note in notes:
            if note:
                print(note, flush=True)
        return None

    def _say(self, line: str) -> None:
        """One line for the user, from rank 0 only."""
        if self.is_main:
            print(line, flush=True)

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------------------------------ build

    def _build_optimizer(self, model):
        o = self.cfg.optim
        groups = param_groups(model, o.weight_decay)
        kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        if self.cfg.zero.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload's own CPU AdamW

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        if self.cfg.precision.dtype == "fp32" and self.cfg.zero.stage == 0:
            # the one mode where DeepSpeed hands steps straight to the optimizer with no overflow check
            return FiniteAdamW(groups, **kwargs)
        # the fused kernel (CUDA and CPU): one launch per step, and no .item() per parameter, which
        # the single-tensor AdamW pays for its bias corrections
        return torch.optim.AdamW(groups, fused=True, **kwargs)

    def _init_from(self, model: LinformerForMLM, path: Path) -> None:
        """Load a model directory's weights into the fresh model: strict keys, same structure, the
        same tokenizer (another one would give every id another meaning)."""
        from linformer_train.convert.model_dir import from_pretrained, load_model_info, read_model_config

        self._check_compatible({"model": dataclasses.asdict(read_model_config(path))}, path)
        want = load_model_info(path).get("tokenizer_sha256")
        have = self.data.tokenizer.sha256
        if want and want != have:
            raise ConfigError(
                f"train.init_from={path} was trained with tokenizer {want[:12]} but this run tokenizes with "
                f"{self.data.tokenizer.path} ({have[:12]}); set data.tokenizer={path} (and a "
                f"new train.run_dir or data.prepared_dir, so the data is tokenized with it)")
        pretrained = from_pretrained(path, "mlm")
        model.load_state_dict(pretrained.state_dict(), strict=True)
        if self.is_main:
            print(f"initialised from {path}", flush=True)

    def _check_resume_target(self) -> Optional[Path]:
        """Fail before any expensive work when the named checkpoint cannot be used; every rank reaches
        the same verdict (one rank's damaged shard stops all of them, with the same line). Returns the
        checkpoint to resume from, or None for a fresh start."""
        ck = self.cfg.checkpoint
        if ck.resume == "none":
            return None
        box: list = [None, None]
        if self.is_main:  # one rank resolves `auto` (and moves an abandoned history aside)
            try:
                path = self._resolve_resume()
                box[0] = None if path is None else str(path)
            except (CheckpointError, RunDirError, ConfigError) as exc:
                box[1] = (type(exc).__name__, str(exc))
        dist.broadcast_object_list(box, src=0)
        errors: list = [None] * self.world_size
        mine = box[1]
        path = Path(box[0]) if box[0] else None
        if mine is None and path is not None:
            try:
                if ck.universal:
                    verify_universal(path)
                else:
                    verify_contents(path, self.rank)
                    # before DeepSpeed loads it: another model's tensors would fail there with a trace
                    client = read_client_state(path)
                    self._check_compatible(client.get("config"), path,
                                           self._stage_cfg(stage_index(self.run_cfg, client.get("step", 0))))
                    check_world_size(path, self.world_size)
            except (CheckpointError, ConfigError, UnsafeFileError) as exc:
                mine = (type(exc).__name__, str(exc))
        dist.all_gather_object(errors, mine)
        for error in errors:
            if error is not None:
                kind = {"ConfigError": ConfigError, "UnsafeFileError": UnsafeFileError,
                        "RunDirError": RunDirError}.get(error[0], CheckpointError)
                raise kind(error[1])
        return path

    def _resolve_resume(self) -> Optional[Path]:
        ck = self.cfg.checkpoint
        root = self.run_dir / "checkpoints"
        if ck.universal and ck.resume != "auto":
            path = Path(ck.resume)
            if not path.is_dir():
                raise CheckpointError(f"universal checkpoint {ck.resume} does not exist; convert one with "
                                      f"`tools/convert.py universal` first")
            return path
        path = CheckpointManager(root, ck.keep_last).resolve_resume(ck.resume)
        if path is not None:
            for note in set_aside_newer_checkpoints(root, path):
                print(note, flush=True)
        return path

    # ----------------------------------------------------------------------------------- stages

    def _at_stage_boundary(self) -> bool:
        stages = self.run_cfg.stages
        return self.stage + 1 < len(stages) and self.step == stages[self.stage].until_step

    def _next_stage(self) -> None:
        """Enter the next stage at a boundary, every rank together: the model is resized in memory to
        the stage's n and k with the maths of ``tools/convert.py resize`` (positions interpolated, E/F
        resampled) from the full fp32 weights; data is prepared or reused at the new n; a new engine
        takes the weights, and the optimizer state of every parameter resize left unchanged (moments
        and step count). A resized parameter's first moment restarts at zero and its second moment at
        the mean of its old one (a step of about lr per element from the first update, as before)."""
        from linformer_train.convert.resize import resize_model

        t0 = time.perf_counter()
        old_cfg, new_cfg = self.cfg, self._stage_cfg(self.stage + 1)
        weights, moments, adam_step = self._full_fp32_state()
        with torch.random.fork_rng(devices=[]):  # the run's random stream stays as it was
            old = LinformerForMLM(old_cfg.model)
            old.load_state_dict(weights, strict=True)
            new_model = old
            m_old, m_new = old_cfg.model, new_cfg.model
            if (m_old.max_seq_len, m_old.k) != (m_new.max_seq_len, m_new.k):
                new_model = resize_model(old, m_new.max_seq_len, m_new.k, seed=new_cfg.train.seed + self.step)
        state = {key: t.detach().float() for key, t in new_model.state_dict().items()}
        changed = {key for key, t in state.items()
                   if t.shape != weights[key].shape or not torch.equal(t, weights[key])}
        del old, new_model
        self.data.close()
        self._release_engine()
        self.stage += 1
        self.cfg = new_cfg
        self.stage_start_samples = self.consumed_samples
        self._say(f"stage {self.stage + 1}/{len(self.run_cfg.stages)} from step {self.step + 1}: "
                  f"{report.stage_change(old_cfg, new_cfg)}")
        self._build_stage(state)
        self._carry_optimizer_state(state, moments, adam_step, changed)
        self._say(f"stage {self.stage + 1}: ready in {report.fmt_seconds(time.perf_counter() - t0)} "
                  f"({len(changed)} resized tensors: {', '.join(sorted(changed)[:4])}"
                  f"{', ...' if len(changed) > 4 else ''})")

    def _release_engine(self) -> None:
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
        self.engine = self.optimizer = None
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _zero0_masters(self) -> dict:
        """{module parameter: its fp32 master} where DeepSpeed keeps one outside ZeRO (bf16/fp16 at
        stage 0: FP16_UnfusedOptimizer's fp32 groups); empty otherwise."""
        opt = self.optimizer
        low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
        if not low or not high:
            return {}
        return {p: m for g16, g32 in zip(low, high) for p, m in zip(g16, g32)}

    @staticmethod
    def _zero_managed(p: torch.nn.Parameter) -> bool:
        return hasattr(p, "_z3_optimizer") or getattr(p, "_hp_mapping", None) is not None

    def _full_fp32_state(self) -> tuple[dict, dict, float]:
        """Every parameter's full fp32 weight and AdamW moments, on the CPU, whatever the ZeRO stage
        (DeepSpeed's safe_get_full_* gather the partitions; all ranks call them in the same order)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        masters = self._zero0_masters()
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if hasattr(self.optimizer, "_hp_optimizer_states_linked"):
            # ZeRO-1/2 map each parameter to its share of AdamW's flat state once, after the first
            # param group's first step, when the other groups' state does not exist yet (their
            # parameters then read as having no moments): map them again now that all exist
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()
        weights, moments = {}, {}
        for name, p in self.engine.module.named_parameters():
            if self._zero_managed(p):
                w = safe_get_full_fp32_param(p)
                m, v = (safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq"))
            else:
                master = masters.get(p, p)
                w = master.detach()
                st = inner.state.get(master, {})
                m, v = st.get("exp_avg"), st.get("exp_avg_sq")
            weights[name] = w.float().cpu().clone()
            if m is not None and v is not None:
                moments[name] = (m.float().cpu().clone(), v.float().cpu().clone())
        steps = [float(st["step"]) for st in inner.state.values() if isinstance(st, dict) and "step" in st]
        return weights, moments, max(steps, default=0.0)

    def _carry_optimizer_state(self, weights: dict, moments: dict, adam_step: float, changed: set) -> None:
        """Write the fp32 masters and the moments into the new engine's optimizer (see _next_stage)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        masters = self._zero0_masters()
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        self._materialise_flat_states(inner, adam_step)
        for name, p in self.engine.module.named_parameters():
            if name not in moments:
                continue  # never stepped: the new optimizer starts it as AdamW would
            m, v = moments[name]
            if name in changed:
                shape = weights[name].shape
                m, v = torch.zeros(shape), torch.full(shape, float(v.mean()))
            if self._zero_managed(p):
                safe_set_full_fp32_param(p, weights[name].to(self.device))
                safe_set_full_optimizer_state(p, m.to(self.device), "exp_avg")
                safe_set_full_optimizer_state(p, v.to(self.device), "exp_avg_sq")
                continue
            master = masters.get(p, p)
            if master is not p:
                master.data.copy_(weights[name].to(master.device))
            inner.state[master] = {"step": _step_value(inner, adam_step, master.device),
                                   "exp_avg": m.to(master.device), "exp_avg_sq": v.to(master.device)}
        for st in inner.state.values():  # ZeRO's flat groups keep one step count each
            if isinstance(st, dict) and "step" in st:
                st["step"] = (torch.full_like(st["step"], adam_step) if torch.is_tensor(st["step"])
                              else type(st["step"])(adam_step))

    def _materialise_flat_states(self, inner, adam_step: float) -> None:
        """ZeRO-1/2/3 create AdamW's state for their flat fp32 partitions at the first step (and
        ZeRO-1/2 only then map each parameter's fragment of it): create it now (zeros), so the carried
        values can be written through DeepSpeed's safe_set_full_optimizer_state."""
        opt = self.optimizer
        flats = (getattr(opt, "single_partition_of_fp32_groups", None)     # ZeRO-1/2
                 or getattr(opt, "fp32_partitioned_groups_flat", None))     # ZeRO-3
        if not flats:
            return
        for flat in flats:
            if not inner.state.get(flat):
                inner.state[flat] = {"step": _step_value(inner, adam_step, flat.device),
                                     "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        link = getattr(opt, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()

    # ----------------------------------------------------------------------------------- resume

    def _resume(self) -> None:
        path = self.resume_path
        if path is None:
            if self.cfg.checkpoint.resume == "auto" and self.is_main:
                print(f"resume=auto: no checkpoint in {self.checkpoints.root}; starting fresh", flush=True)
            return
        with _unreadable_as_checkpoint_error(path):
            load_path, client = self.engine.load_checkpoint(
                str(path.parent), tag=path.name, load_module_strict=True,
                load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None or client is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}; resume from an earlier one")
        self._check_compatible(client.get("config"), path)
        self.step = client["step"]
        self.consumed_samples = client["consumed_samples"]
        self.skipped_steps = client.get("skipped_steps", 0)
        self.consumed_tokens = client.get("consumed_tokens", self.consumed_samples * self.cfg.model.max_seq_len)
        self.stage_start_samples = client.get("stage_start_samples", 0)
        rank_file = path / f"rank_state_{self.rank:05d}.pt"
        if client.get("world_size") == self.world_size and rank_file.is_file():
            with _unreadable_as_checkpoint_error(path):
                state = load_weights_only(rank_file)
            set_rng_state(state["rng"])
            self.data.train_loader.load_state_dict(state["loader"])
        else:
            # another rank count (universal checkpoint): carry on from the global sample position
            self.data.train_loader.load_state_dict(  # within this stage's data
                self.data.train_loader.state_for_consumed(self.consumed_samples - self.stage_start_samples))
            _set_seed(self.cfg.train.seed + self.step)
        if self.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _check_compatible(self, saved: Optional[dict], path: Path, expected: Optional[Config] = None) -> None:
        if not saved:
            return
        old = config_from_dict({"model": saved["model"]}).model
        new = (expected or self.cfg).model
        for key in ("max_seq_len", "hidden_size", "num_layers", "num_heads", "vocab_size", "k",
                    "sharing", "projection", "attention"):
            if getattr(old, key) != getattr(new, key):
                raise ConfigError(
                    f"{path} has model.{key}={getattr(old, key)!r} but the config says "
                    f"{getattr(new, key)!r}; use the saved model's settings or convert it "
                    f"(tools/convert.py resize)"
                )

    # ------------------------------------------------------------------------------------ train

    def train(self) -> int:
        """Run to train.max_steps or a stop request; returns the process exit code."""
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._request_stop)
        try:
            self._loop()
        except RunFileError as exc:  # a full disk, a read-only folder: say where the run can go on from
            from linformer_train.train.checkpoint import last_good_checkpoint

            good = last_good_checkpoint(self.checkpoints.root) if self.is_main else None
            where = f"its last checkpoint {good} is intact" if good else "it has no complete checkpoint yet"
            raise RunFileError(f"{exc}; the run stopped at step {self.step} and {where}: free space (or fix "
                               f"the folder) and rerun with --resume") from None
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self.data.close()
            self.metrics.close()
            self._release()
        return 0

    def _loop(self) -> None:
        cfg = self.cfg
        saved_at = self.step
        window = _Window()
        t_start = time.perf_counter()
        start_step, start_tokens = self.step, self.consumed_tokens
        last = cfg.train.stop_after or cfg.train.max_steps
        last_train = last_eval = None
        self._say(report.plan_line(cfg, start_step, self.world_size, str(self.checkpoints.root)))
        if self.run_cfg.stages:
            self._say(report.stages_line(self.run_cfg, self.world_size))
        while self.step < last:
            with record_function("train.step"):  # the phases: profiling/steps.py reads them back
                stats = self.train_step(window)
            boundary = self._at_stage_boundary()
            # a stopping step was trained too: log it, or the history has a hole where it resumes;
            # a stage's last step too (the next window counts another n)
            if self.metrics.should_log(self.step) or stats["stop"] or boundary:
                elapsed = time.perf_counter() - t_start
                rate = (self.step - start_step) / elapsed if elapsed > 0 else float("nan")
                last_train = window.summary(self, eta=(cfg.train.max_steps - self.step) / rate)
                self.metrics.log(last_train, self.step)
                window = _Window()
            if stats["stop"]:
                if boundary:  # a checkpoint at a boundary holds the next stage's model
                    self._next_stage()
                if self.is_main:
                    print(f"stop requested: saving a checkpoint at step {self.step}", flush=True)
                break
            # evaluations and saves are not training time: the window in progress leaves them out
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                with window.paused():
                    last_eval = (self.step, self.evaluate())
                    self.metrics.log(last_eval[1], self.step, prefix="eval")
            if boundary:
                self._next_stage()
                window = _Window()
            if boundary or (cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0):
                with window.paused():
                    self.save()
                saved_at = self.step
        seconds = time.perf_counter() - t_start
        if saved_at != self.step:
            self.save()
        self._summarise(start_step, self.consumed_tokens - start_tokens, seconds, last_train, last_eval,
                        preempted=self._stop_requested)

    def _summarise(self, start_step: int, tokens: int, seconds: float, last_train: Optional[dict],
                   last_eval: Optional[tuple[int, dict]], preempted: bool) -> None:
        """The end-of-run lines: what was trained, where it went, how it compares with a baseline
        (an evaluation at the last step when the schedule did not end on one), and the fill-mask
        demonstration when logging.fill_mask_examples asks for it. Every rank takes part in the
        evaluation and the demonstration's forward (ZeRO-3 gathers weights collectively). After a
        stop signal only the lines are written: the job has seconds left, and the checkpoint is safe."""
        cfg = self.cfg
        evaluation = None
        if cfg.train.eval_every and not preempted and (last_eval is None or last_eval[0] != self.step):
            last_eval = (self.step, self.evaluate())
            self.metrics.log(last_eval[1], self.step, prefix="eval")
        if last_eval is not None and last_eval[0] == self.step:
            evaluation = last_eval[1]
        unigram = self._unigram_perplexity() if evaluation and not preempted else None
        demo = (self._fill_mask_demo(cfg.logging.fill_mask_examples)
                if cfg.logging.fill_mask_examples and not preempted else [])
        latest = self.checkpoints.complete_checkpoints()
        lines = report.summary_lines(
            cfg=cfg, steps=self.step, start_step=start_step,
            tokens=tokens, seconds=seconds,
            stopped_early=self.step < cfg.train.max_steps, train=last_train, evaluation=evaluation,
            unigram_ppl=unigram, checkpoint=str(latest[-1]) if latest else None, run_dir=str(self.run_dir))
        for line in lines + demo:
            self._say(line)

    def _unigram_perplexity(self) -> float:
        """The unigram baseline's perplexity on the evaluation's masked positions, all ranks."""
        tok = self.data.tokenizer
        log_probs = report.unigram_log_probs(self.data.prepared.train, tok.vocab_size, tok.special_ids.values())
        total, count = report.unigram_sums(log_probs, self.data.eval_batches(self.cfg.train.eval_batches))
        sums = torch.tensor([total, count], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        return report.perplexity(float(sums[0] / sums[1].clamp(min=1.0)))

    @torch.no_grad()
    def _fill_mask_demo(self, count: int) -> list[str]:
        tok = self.data.tokenizer
        picks = report.fill_mask_examples(self.data.prepared.validation, tok, count, seed=self.cfg.train.seed)
        if not picks:
            return []
        ids = torch.tensor(np.stack([ids for ids, _ in picks]), device=self.device)
        positions = [p for _, p in picks]
        ids[torch.arange(len(picks)), positions] = tok.special_ids["mask"]
        self.engine.eval()
        logits = self.engine(ids)                                       # (B, L, V)
        self.engine.train()
        return report.fill_mask_lines(picks, logits[torch.arange(len(picks)), positions].cpu(), tok)

    def train_step(self, window: "_Window") -> dict:
        """One optimizer step: gather micro-batches, forward, backward, step."""
        cfg, engine = self.cfg, self.engine
        accum = cfg.train.grad_accum_steps
        with window.data_wait():
            micro = [next(self.data.train_loader) for _ in range(accum)]
        local = sum(b["predict_index"].numel() for b in micro)             # known on the host
        count = torch.tensor(float(local), device=self.device)
        dist.all_reduce(count)                                             # global predicted tokens
        lr = lr_at(self.step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps,
                   cfg.optim.decay, cfg.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro, 1):
            with record_function("train.forward"):
                out = engine(batch["input_ids"].to(self.device, non_blocking=True),  # pinned on CUDA
                             labels=batch["labels"].to(self.device, non_blocking=True),
                             predict_index=batch["predict_index"].to(self.device, non_blocking=True))
            with record_function("train.backward"):
                engine.backward(out.loss_sum * (accum * self.world_size) / count)
            if i == accum:  # the gradients are complete (and all-reduced) and not yet clipped
                window.note_gradients(self)
            with record_function("train.optimizer"):
                engine.step()
            loss_sum += out.loss_sum.detach().float()
            correct += out.num_correct.detach().float()
        # the one per-step sync: every rank must agree on stopping, on a non-finite loss and on a
        # step the optimizer skipped for non-finite gradients
        flags = torch.zeros(3, device=self.device)
        flags[0] = float(self._stop_requested)
        flags[1] = (~torch.isfinite(loss_sum)).float()
        found_inf = getattr(self.optimizer, "found_inf", None)
        if found_inf is not None:
            flags[2] = found_inf
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, nonfinite, grads_nonfinite = (v > 0 for v in flags.tolist())
        self.step += 1
        self.consumed_samples += self.global_batch
        self.consumed_tokens += self.global_batch * cfg.model.max_seq_len
        applied = engine.was_step_applied() and not nonfinite and not grads_nonfinite
        self._account_skip(applied, nonfinite)
        window.add(loss_sum, correct, count, lr, applied, predicted=local)
        return {"stop": stop}

    def _account_skip(self, applied: bool, nonfinite: bool) -> None:
        if applied:
            self.consecutive_skips = 0
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        t = self.cfg.train
        if nonfinite and t.nonfinite_policy == "stop":
            raise TrainingError(
                f"non-finite loss at step {self.step} and train.nonfinite_policy=stop; lower optim.lr, "
                f"use precision.dtype=bf16, or set train.nonfinite_policy=skip")
        if self.consecutive_skips >= t.max_consecutive_skips:
            scale = getattr(self.optimizer, "cur_scale", None)
            extra = f" (fp16 loss scale {scale:g})" if scale is not None else ""
            raise TrainingError(
                f"{self.consecutive_skips} optimizer steps in a row were skipped (non-finite loss or "
                f"gradients) up to step {self.step}{extra}; lower optim.lr, use bf16, or resume from "
                f"an earlier checkpoint")

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self._stop_requested = True

    # --------------------------------------------------------------------------------- evaluate

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, perplexity and accuracy over the validation split (fixed masks), all ranks."""
        self.engine.eval()
        totals = torch.zeros(3, device=self.device)
        for batch in self.data.eval_batches(self.cfg.train.eval_batches):
            out = self.engine(batch["input_ids"].to(self.device), labels=batch["labels"].to(self.device),
                              predict_index=batch["predict_index"].to(self.device))
            totals += torch.stack([out.loss_sum.float(), out.num_predicted.float(), out.num_correct.float()])
        dist.all_reduce(totals)
        self.engine.train()
        loss_sum, count, correct = totals.tolist()
        loss = loss_sum / max(count, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / max(count, 1.0)}

    # ------------------------------------------------------------------------------------- save

    def save(self) -> Path:
        client = {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "stage": self.stage,
            "stage_start_samples": self.stage_start_samples,
            "skipped_steps": self.skipped_steps,
            "world_size": self.world_size,
            "config": to_dict(self.cfg),
        }
        rank_state = {"rng": rng_state(), "loader": self.data.train_loader.state_dict()}
        path = self.checkpoints.save(self.engine, self.step, client, rank_state)
        if self.is_main:
            print(f"saved checkpoint {path}", flush=True)
        return path


def _step_value(optimizer, step: float, device: torch.device):
    """AdamW's step count as ``optimizer`` keeps it: a float32 tensor on the parameter's device for
    torch's fused kernel, an int for DeepSpeed's CPU Adam."""
    if isinstance(optimizer, torch.optim.Optimizer) and optimizer.defaults.get("fused"):
        return torch.tensor(step, dtype=torch.float32, device=device)
    if isinstance(optimizer, torch.optim.Optimizer) and not type(optimizer).__module__.startswith("deepspeed"):
        return torch.tensor(step, dtype=torch.float32)
    return int(step)


@contextmanager
def _unreadable_as_checkpoint_error(path: Path):
    """A damaged file inside a checkpoint (same size, bad bytes) is one line, not a zip-reader trace;
    so is a file the weights-only unpickler refuses (DeepSpeed's loads run under it too)."""
    try:
        yield
    except UnsafeFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified; anything else is re-raised
        if is_refusal(exc):
            raise refusal(f"checkpoint {path}", exc) from None
        reason = unreadable_reason(exc)
        if reason is None:
            raise
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}); a file is corrupt, resume "
                              f"from an earlier one") from None


class _Window:
    """Device-side sums between two logging steps, read (one sync) only when logged. Its clock
    counts training only: ``paused()`` leaves evaluations and saves out of tokens/s and MFU."""

    def __init__(self):
        self.loss_sum = self.correct = self.count = None
        self.grad_norm = None
        self.steps = 0
        self.predicted = 0  # this rank's masked positions, every step (host-side: the loader's)
        self.applied = 0
        self.lr = 0.0
        self.wait = 0.0
        self.t0 = time.perf_counter()

    @contextmanager
    def data_wait(self):
        t = time.perf_counter()
        with record_function("train.data"):
            yield
        self.wait += time.perf_counter() - t

    @contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t

    def add(self, loss_sum, correct, count, lr, applied, predicted: int = 0):
        if applied:
            self.loss_sum = loss_sum if self.loss_sum is None else self.loss_sum + loss_sum
            self.correct = correct if self.correct is None else self.correct + correct
            self.count = count if self.count is None else self.count + count
            self.applied += 1
        self.steps += 1
        self.predicted += predicted
        self.lr = lr

    def note_gradients(self, trainer: Trainer) -> None:
        """The gradient norm where DeepSpeed reports none (fp32 at ZeRO stage 0, whose optimizer is
        ours), on logging steps only: one pass over the gradients, on the device, read when logged."""
        if isinstance(trainer.optimizer, FiniteAdamW) and trainer.metrics.should_log(trainer.step + 1):
            grads = [p.grad for p in trainer.engine.module.parameters() if p.grad is not None]
            if grads:
                self.grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def summary(self, trainer: Trainer, eta: float) -> dict[str, float]:
        elapsed = time.perf_counter() - self.t0
        if self.loss_sum is not None:
            local = torch.stack([self.loss_sum, self.correct])
            dist.all_reduce(local)
            loss_sum, correct = local.tolist()
            count = float(self.count)  # already global
            loss, acc = loss_sum / count, correct / count
        else:
            loss = acc = float("nan")
        seqs = self.steps * trainer.global_batch
        tokens_per_s = seqs * trainer.cfg.model.max_seq_len / elapsed
        # this rank's model FLOPs (its sequences, its exact masked positions) over its device's peak
        local_seqs = self.steps * trainer.global_batch // trainer.world_size
        flops = mlm_step_flops(trainer.cfg.model, trainer.cfg.model.max_seq_len, local_seqs, self.predicted)
        grad_norm = trainer.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self.grad_norm
        # ZeRO's optimizers keep a loss scale of 1 in fp32 and bf16: only fp16's dynamic one says something
        scale = getattr(trainer.optimizer, "cur_scale", None) if trainer.cfg.precision.dtype == "fp16" else None
        return {
            "loss": loss,
            "accuracy": acc,
            "perplexity": math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("nan"),
            "lr": self.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "loss_scale": float(scale) if scale is not None else None,
            "skipped_steps": float(trainer.skipped_steps),
            "tokens_per_s": tokens_per_s,
            "samples_per_s": seqs / elapsed,
            "mfu": mfu(flops, elapsed, trainer.peak.flops),
            "peak_memory_gib": peak_memory_bytes(trainer.device) / 2**30,
            "data_wait_fraction": self.wait / elapsed,
            "eta_s": eta,
        }
