"""Analytic FLOP counts of the encoder: the one formula behind the trainer's MFU and the profiler.

Counts matrix multiplies only (2 FLOPs per multiply-add), the convention of MFU (PaLM, Appendix B):
elementwise work, softmax and LayerNorm are left out, and activation recomputation is not counted.
"""

from __future__ import annotations

from linformer_train.config import ModelConfig, k_schedule


def encoder_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of the encoder blocks for one sequence of ``seq_len`` tokens."""
    D, Fd, L, H = cfg.hidden_size, cfg.ffn_size, seq_len, cfg.num_heads
    Dh = D // H
    total = 0
    for k in k_schedule(cfg):
        dense = 2 * L * D * 3 * D + 2 * L * D * D + 2 * 2 * L * D * Fd  # qkv, out, ffn in + out
        if cfg.attention in ("full", "naive"):
            keys = L
            proj = 0
        else:
            # a short input reaches fewer of the k windows: pooling makes only those slots, and learned
            # E, F with window scaling use only those rows; dense rows (other scalings) keep all k
            windowed = cfg.projection != "linear" or cfg.short_input_scaling == "window"
            keys = min(k, -(-L * k // cfg.max_seq_len)) if windowed else k
            if cfg.projection == "linear":
                proj = 2 * (2 * keys * L * D)             # E·K and F·V: (keys, L) x (L, Dh) per head
            elif cfg.projection == "conv":
                # each output sums window x Dh inputs, over the input padded to whole windows
                proj = 2 * (2 * keys * (cfg.max_seq_len // k) * Dh * D)
            else:
                proj = 0                                  # mean pooling: additions only
        attn = 2 * (2 * L * keys * D)                     # Q K'^T and P V'
        total += dense + proj + attn
    return total


def mlm_head_flops(cfg: ModelConfig, predicted: float) -> float:
    """The LM head (dense + tied decoder) applied at ``predicted`` positions."""
    D = cfg.hidden_size
    return predicted * (2 * D * D + 2 * D * cfg.vocab_size)
