"""Memory estimates without a run: model states by ZeRO stage and activations of a micro-batch."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from linformer_train.config import ConfigError, ModelConfig, k_schedule
from linformer_train.profiling.cases import DTYPES, GIB, Case


def count_params(cfg: ModelConfig, target: str = "mlm") -> tuple[int, int]:
    """(total parameters, largest single module's own parameters), built on the meta device."""
    from linformer_train.model import LinformerEncoder, LinformerForMLM

    with torch.device("meta"):
        model = LinformerForMLM(cfg) if target == "mlm" else LinformerEncoder(cfg)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def model_state_bytes(params: int, dtype: str, zero_stage: int, num_gpus: int,
                      largest_layer_params: int = 0) -> dict:
    """Per-GPU bytes of parameters, gradients and optimizer states (AdamW) for a ZeRO stage.

    16-bit training keeps, per parameter, the 16-bit weight (2 B) and gradient (2 B) plus fp32
    gradient, master weight and two moments (4 + 4 + 8 B), the accounting of DeepSpeed's own
    estimator ("18 = 2 grads16 + 4 grads32 + 4 params32 + 8 optimizer states"). fp32 training keeps
    weight, gradient and moments (4 + 4 + 8 B). Stage 1 partitions the optimizer side (fp32 copies),
    stage 2 also the gradients, stage 3 also the weights (plus one gathered largest layer)."""
    N = max(1, num_gpus)
    mixed = dtype != "fp32"
    w, g = (2, 2) if mixed else (4, 4)
    opt = 16 if mixed else 8  # mixed: fp32 grads + master + 2 moments; fp32: 2 moments
    part = lambda nbytes, stage: params * nbytes / (N if zero_stage >= stage else 1)  # noqa: E731
    out = {
        "params": part(w, 3),
        "grads": part(g, 2),
        "optimizer": part(opt, 1),
    }
    if zero_stage == 3:
        out["gathered_layer"] = 4 * largest_layer_params  # DeepSpeed's allowance for a gathered layer
    out["total"] = sum(out.values())
    return out


def deepspeed_model_state_bytes(params: int, largest_layer_params: int, zero_stage: int,
                                num_gpus: int, gpus_per_node: Optional[int] = None) -> Optional[int]:
    """DeepSpeed's own per-GPU estimate (no offload) for ZeRO-2/3, from the functions behind
    ``estimate_zero2/3_model_states_mem_needs_all_cold`` (those print a table; these return it).
    None for stages 0/1, which DeepSpeed does not estimate. Imported lazily (GPU images lack it)."""
    if zero_stage not in (2, 3):
        return None
    per_node = gpus_per_node or num_gpus
    nodes = max(1, num_gpus // per_node)
    import contextlib
    import io
    import logging

    with contextlib.redirect_stdout(io.StringIO()):  # deepspeed logs its accelerator choice
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        try:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        except ImportError:  # the estimate's own accounting still stands
            return None
        if zero_stage == 2:
            _, gpu = estimate_zero2_model_states_mem_needs(
                params, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=False)
        else:
            _, gpu, _ = estimate_zero3_model_states_mem_needs(
                params, largest_layer_params, num_gpus_per_node=per_node, num_nodes=nodes,
                cpu_offload=False, cpu_offload_params=False)
    return int(gpu)


def activation_bytes(cfg: ModelConfig, seq_len: int, batch: int, dtype: str = "bf16", *,
                     training: bool = True, activation_checkpointing: bool = False,
                     target: str = "mlm", mask_prob: float = 0.15, device: str = "cuda") -> dict:
    """Analytic activation memory of one forward (+ backward) of ``batch`` sequences.

    Training: the tensors autograd saves, per layer (s = bytes per element, 2 for bf16/fp16):
    block input, q/k/v, attention output and its merged copy, two LayerNorm inputs and the FFN
    input, 9 BLD s; the FFN's GELU input and output, 2 BLF s; dropout masks, 1 byte per element
    (2 BLD + BLF) when dropout > 0; and the attention core: Linformer's projected K and V (2 B k D
    s) and SDPA's log-sum-exp; naive's fp32 probabilities (+ their 16-bit copy, + dropout mask
    and output) of B H n^2; full attention keeps only out + log-sum-exp on CUDA, but on CPU with
    attention dropout > 0 torch's SDPA falls back to its math kernel and keeps B H n^2 as naive
    does. Plus the embeddings, the MLM head at the predicted positions, and a transient for the
    backward of one layer (its activation gradients). Activation checkpointing keeps only each
    block's input and recomputes one block at a time. Inference: the largest one-layer working
    set. Accurate to ~25% against measurements (docs/PERFORMANCE.md compares them)."""
    s = DTYPES[dtype].itemsize
    B, L, D, H, Fd = batch, seq_len, cfg.hidden_size, cfg.num_heads, cfg.ffn_size
    BLD, BLF = B * L * D, B * L * Fd
    drop = cfg.dropout > 0 and training
    attn_drop = cfg.attention_dropout > 0 and training
    ks = k_schedule(cfg)
    sq = B * H * L * L
    sdpa_math = device == "cpu" and attn_drop  # CPU SDPA has no dropout in its fused kernel

    def core(k: int) -> tuple[float, float]:
        """(saved, backward transient) of the attention core of a layer."""
        lse = B * H * L * 4
        if cfg.attention == "naive":
            saved = sq * 4 + (sq * s if s < 4 else 0) + (sq * (1 + s) if attn_drop else 0)
            return saved + BLD * s, sq * (8 + s)
        if cfg.attention == "full":
            if sdpa_math:
                return BLD * s + sq * (2 * s + 1), sq * 2 * s
            return BLD * s + lse, 0.0
        slots = min(k, L)
        extra = B * H * L * slots * (2 * s + 1) if sdpa_math else lse
        return 2 * B * slots * D * s + BLD * s + extra, 2 * B * slots * D * s

    per_layer = []
    transient = 0.0
    for k in ks:
        c_saved, c_trans = core(k)
        saved = 8 * BLD * s + 2 * BLF * s + c_saved + 2 * B * L * 8  # + LayerNorm mean/rstd
        if drop:
            saved += 2 * BLD + BLF
        per_layer.append(saved)
        transient = max(transient, (2 * BLF + 4 * BLD) * s + c_trans)
    embed = BLD * s + (BLD if drop else 0) + (BLD * s if target != "encoder" else 0)
    head = 0.0
    if target == "mlm":
        M = mask_prob * B * L
        head = M * (5 * D * s + cfg.vocab_size * (s + 4))

    if not training:
        work = []
        for k in ks:
            c_saved, c_trans = core(k)
            layer_peak = BLD * s * 4 + max(2 * BLF * s, c_saved + c_trans)
            work.append(layer_peak)
        logits = B * L * cfg.vocab_size * s if target == "mlm" else 0
        total = max(work) + logits
        return {"per_layer": max(work), "layers": max(work), "embeddings": BLD * s,
                "head": logits, "transient": 0.0, "total": total}

    if activation_checkpointing:
        layers_total = len(ks) * BLD * s + max(per_layer)
    else:
        layers_total = sum(per_layer)
    total = layers_total + embed + head + transient
    return {"per_layer": max(per_layer), "layers": layers_total, "embeddings": embed,
            "head": head, "transient": transient, "total": total}


def estimate_case_bytes(case: Case) -> float:
    """Rough peak total bytes of a case (weights, grads, optimizer and activations) for budget
    prechecks: a case estimated far above its budget is skipped without a run."""
    cfg = case.model_config()
    s = DTYPES[case.dtype].itemsize
    if case.target == "layer":
        params = 4 * cfg.hidden_size ** 2 + 2 * k_schedule(cfg)[0] * cfg.max_seq_len
        cfg_one = dataclasses.replace(cfg, num_layers=1, k=k_schedule(cfg)[0])
    else:
        params, _ = count_params(cfg, case.target)
        cfg_one = cfg
    states = params * s
    if case.mode != "forward":
        states += params * s
    if case.mode == "train":
        states += params * (8 if s == 4 else 16)
    act = activation_bytes(cfg_one, case.seq_len, case.batch_size, case.dtype,
                           training=case.mode != "forward", target=case.target,
                           mask_prob=case.mask_prob, device="cpu" if case.device == "cpu" else "cuda")
    return states + act["total"]


def estimate(cfg: ModelConfig, seq_len: int, micro_batch: int, *, dtype: str = "bf16",
             zero_stages: Sequence[int] = (0, 1, 2, 3), num_gpus: int = 1,
             gpus_per_node: Optional[int] = None, gpu_mem_gib: Optional[float] = None,
             activation_checkpointing: bool = False, reserve_gib: float = 2.0,
             mask_prob: float = 0.15) -> dict:
    """Per-GPU memory of MLM training without a run, one entry per ZeRO stage: parameters,
    gradients, optimizer states (own accounting and DeepSpeed's estimator), activations of the
    micro-batch, the total with ``reserve_gib`` for the CUDA context and allocator slack, whether
    it fits ``gpu_mem_gib``, and the largest micro-batch that would."""
    if seq_len > cfg.max_seq_len:
        raise ConfigError(f"n={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not allowed; choose one of {', '.join(DTYPES)}")
    if micro_batch < 1 or num_gpus < 1:
        raise ConfigError(f"micro-batch {micro_batch} and GPU count {num_gpus} must be positive")
    for st in zero_stages:
        if st not in (0, 1, 2, 3):
            raise ConfigError(f"ZeRO stage {st} is not allowed; choose 0, 1, 2 or 3")
    params, largest = count_params(cfg, "mlm")
    per_seq = activation_bytes(cfg, seq_len, 1, dtype, activation_checkpointing=activation_checkpointing,
                               mask_prob=mask_prob)
    act = activation_bytes(cfg, seq_len, micro_batch, dtype,
                           activation_checkpointing=activation_checkpointing, mask_prob=mask_prob)
    stages = []
    for st in zero_stages:
        states = model_state_bytes(params, dtype, st, num_gpus, largest)
        ds = deepspeed_model_state_bytes(params, largest, st, num_gpus, gpus_per_node) \
            if dtype != "fp32" else None
        model_states = states["total"]
        total = model_states + act["total"] + reserve_gib * GIB
        entry = {"zero_stage": st, **{f"{k}_bytes": v for k, v in states.items() if k != "total"},
                 "model_states_bytes": model_states, "deepspeed_model_states_bytes": ds,
                 "activation_bytes": act["total"],
                 "total_bytes": total}
        if gpu_mem_gib is not None:
            room = gpu_mem_gib * GIB - model_states - reserve_gib * GIB
            entry["fits"] = total <= gpu_mem_gib * GIB
            entry["max_micro_batch"] = max(0, int(room // per_seq["total"])) if room > 0 else 0
        stages.append(entry)
    return {"params": params, "largest_layer_params": largest, "seq_len": seq_len,
            "micro_batch": micro_batch, "dtype": dtype, "num_gpus": num_gpus,
            "gpu_mem_gib": gpu_mem_gib, "activation_checkpointing": activation_checkpointing,
            "reserve_gib": reserve_gib, "activations": act, "activation_bytes_per_sequence":
            per_seq["total"], "stages": stages}
