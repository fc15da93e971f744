"""A lower bound on the memory of MLM training, from the config alone (no model is built).

Used to refuse, before any work, a config that cannot fit (``model.vocab_size=1e9``,
``num_layers=100000``): such a model would otherwise reach the allocator only after the tokenizer
and data were prepared, minutes later, and die there without a word. Every term is a *lower* bound
(only the largest matrices, only the activations every transformer must keep), so a config this
refuses could never have run; the profiler's estimate (``tools/profile.py estimate``) is the
accurate one for planning.
"""

from __future__ import annotations

from dataclasses import dataclass

from linformer_train.config import ModelConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def min_parameters(cfg: ModelConfig) -> int:
    """Parameters of the embeddings, the attention and FFN matrices and the LM head's dense layer
    (biases, norms and E/F left out: a lower bound)."""
    D, F, L = cfg.hidden_size, cfg.ffn_size, cfg.num_layers
    return cfg.vocab_size * D + cfg.max_seq_len * D + L * (4 * D * D + 2 * D * F) + D * D


@dataclass
class MemoryFloor:
    """Bytes one rank needs at least: on its device, and in host memory (optimizer offload)."""

    params: int
    device_states: float
    host_states: float
    activations: float

    @property
    def device_total(self) -> float:
        return self.device_states + self.activations


def training_memory_floor(cfg: ModelConfig, micro_batch: int, dtype: str, zero_stage: int,
                          ranks: int, activation_checkpointing: bool = False,
                          offload_optimizer: bool = False, offload_params: bool = False,
                          mask_prob: float = 0.15) -> MemoryFloor:
    """Weights, gradients and AdamW states per rank (ZeRO partitioning over ``ranks``; DeepSpeed's
    accounting: 16-bit weight and gradient + 16 B of fp32 copies and moments, or 4 + 4 + 8 B in
    fp32), plus the activations every layer must keep for backward (its input, and the block's
    inner states unless recomputed) and the fp32 logits at the predicted positions."""
    P = min_parameters(cfg)
    mixed = dtype != "fp32"
    w, g, opt = (2, 2, 16) if mixed else (4, 4, 8)
    part = lambda nbytes, stage: P * nbytes / (ranks if zero_stage >= stage else 1)  # noqa: E731
    weights, grads, optim = part(w, 3), part(g, 2), part(opt, 1)
    host = 0.0
    if offload_optimizer:
        host, optim = host + optim, 0.0
    if offload_params:
        host, weights = host + weights, 0.0
    s = DTYPE_BYTES[dtype]
    tokens = micro_batch * cfg.max_seq_len
    per_layer = tokens * cfg.hidden_size * s * (1 if activation_checkpointing else 6)
    logits = mask_prob * tokens * cfg.vocab_size * 4
    return MemoryFloor(P, weights + grads + optim, host, cfg.num_layers * per_layer + logits)
