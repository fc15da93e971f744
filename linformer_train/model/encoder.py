"""The Linformer encoder (RoBERTa mould), its MLM and sequence-classification heads.

Knows nothing about training: no DeepSpeed, no optimizer. Built from a ``ModelConfig`` section.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from linformer_train.config import ModelConfig, k_schedule
from linformer_train.model.attention import (
    FullSelfAttention,
    LinearProjection,
    LinformerSelfAttention,
    NaiveSelfAttention,
    build_projection,
    check_length,
)

IGNORE_INDEX = -100


def build_attention(cfg: ModelConfig, k: int) -> nn.Module:
    if cfg.attention == "full":
        return FullSelfAttention(cfg.hidden_size, cfg.num_heads, cfg.attention_dropout)
    if cfg.attention == "naive":
        return NaiveSelfAttention(cfg.hidden_size, cfg.num_heads, cfg.attention_dropout)
    return LinformerSelfAttention(
        cfg.hidden_size, cfg.num_heads, cfg.attention_dropout, k=k, max_seq_len=cfg.max_seq_len,
        projection=cfg.projection, sharing=cfg.sharing,
        short_input_scaling=cfg.short_input_scaling, projection_init=cfg.projection_init,
    )


class Block(nn.Module):
    """Attention + GELU feed-forward, each with a residual; LayerNorm after (post) or before (pre)."""

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.attn = build_attention(cfg, k)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.ffn_out = nn.Linear(cfg.ffn_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.ffn_out(self.dropout(F.gelu(self.ffn_in(x)))))

    def forward(self, x, mask=None, lengths=None, shared=None):
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.attn_norm(x), mask, lengths, shared))
            return x + self._ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.dropout(self.attn(x, mask, lengths, shared)))
        return self.ffn_norm(x + self._ffn(x))


class LinformerEncoder(nn.Module):
    """Token + learned absolute position embeddings, N blocks. (B, L) ids -> (B, L, D) states."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.k_schedule = k_schedule(cfg)
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.positions = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        # Layerwise sharing: one (k_max, n) matrix for every layer, keys and values; layer l reads
        # its first k_l rows. Owned here, passed to each block, stored under one key.
        self.shared_projection: Optional[nn.Module] = None
        if cfg.attention == "linformer" and cfg.sharing == "layerwise":
            head_dim = cfg.hidden_size // cfg.num_heads
            self.shared_projection = build_projection(
                cfg.projection, max(self.k_schedule), cfg.max_seq_len, cfg.num_heads, head_dim,
                per_head=False, short_input_scaling=cfg.short_input_scaling, init=cfg.projection_init)
        self.layers = nn.ModuleList(Block(cfg, k) for k in self.k_schedule)
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.norm == "pre" else None
        self.activation_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        B, L = input_ids.shape
        check_length(L, self.cfg.max_seq_len)
        mask = lengths = None
        if attention_mask is not None:
            mask = attention_mask.bool()                             # (B, L), True = real token
            lengths = mask.sum(-1)                                   # (B,)
        pos = torch.arange(L, device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(pos)[None]       # (B, L, D)
        x = self.dropout(self.embed_norm(x))
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, mask, lengths, self.shared_projection, use_reentrant=False)
            else:
                x = block(x, mask, lengths, self.shared_projection)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x


class MLMOutput(NamedTuple):
    """Sums, not means: the trainer normalises by the masked-token count of the global batch."""

    loss_sum: torch.Tensor      # () summed cross-entropy over predicted positions
    num_predicted: torch.Tensor  # () number of predicted positions
    num_correct: torch.Tensor    # () argmax hits among them


class LinformerForMLM(nn.Module):
    """Encoder + RoBERTa-style LM head (dense, GELU, LayerNorm, decoder tied to the embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = LinformerEncoder(cfg)
        self.head_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.head_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        init_weights(self, cfg)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.head_norm(F.gelu(self.head_dense(h)))
        return F.linear(h, self.encoder.tokens.weight, self.head_bias)  # tied decoder

    def forward(self, input_ids, attention_mask=None, labels=None, predict_index=None):
        """Without labels: logits (B, L, V). With labels (-100 = not predicted): MLMOutput, the LM
        head applied only at predicted positions (a 15% mask skips 85% of the vocab matmul).
        ``predict_index`` (M,), the flat positions of the predicted tokens, gathers them with
        index_select; without it a boolean mask selects them, which costs a device sync (nonzero)."""
        h = self.encoder(input_ids, attention_mask)                 # (B, L, D)
        if labels is None:
            return self._logits(h)
        if predict_index is None:
            predict_index = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # syncs
        flat = h.reshape(-1, h.shape[-1]).index_select(0, predict_index)   # (M, D)
        target = labels.reshape(-1).index_select(0, predict_index)          # (M,)
        logits = self._logits(flat)                                 # (M, V)
        loss_sum = F.cross_entropy(logits.float(), target, reduction="sum")
        correct = (logits.argmax(-1) == target).sum()
        return MLMOutput(loss_sum, target.new_full((), target.numel()), correct)


class LinformerForSequenceClassification(nn.Module):
    """Encoder + first-token pooler (dense, tanh, dropout, out projection), as RoBERTa does.
    Sentence pairs arrive already joined by the tokenizer side: <s> a </s></s> b </s>."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = LinformerEncoder(cfg)
        self.pool_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.pool_dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        init_weights(self, cfg)

    def forward(self, input_ids, attention_mask=None):
        h = self.encoder(input_ids, attention_mask)[:, 0]            # (B, D) first token
        h = self.pool_dropout(torch.tanh(self.pool_dense(self.pool_dropout(h))))
        return self.classifier(h)                                    # (B, num_labels)


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Normal(0, init_std) for dense and embedding weights, zero biases, unit LayerNorms; the
    sequence projections keep their own init (windows or N(0, 1/n): see LinearProjection)."""
    for module in model.modules():
        if module is not model:
            init_module(module, cfg)


def init_module(module: nn.Module, cfg: ModelConfig) -> None:
    """The init of one module's own parameters (not its children's): what ``init_weights`` applies
    to every submodule, and what the transformers wrappers (linformer_train.hf) call per module."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=cfg.init_std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=cfg.init_std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif hasattr(module, "init_weights"):
        module.init_weights()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward (non-reentrant torch.utils.checkpoint: the variant that
    works with ZeRO-2/3 and a projection shared by every layer)."""
    for m in model.modules():
        if isinstance(m, LinformerEncoder):
            m.activation_checkpointing = True


def apply_compile(model: nn.Module) -> None:
    """torch.compile every encoder block in place. Blocks, not the whole model: the MLM head's
    gather of predicted positions has a data-dependent shape that would force recompiles."""
    for m in model.modules():
        if isinstance(m, LinformerEncoder):
            for block in m.layers:
                block.compile(dynamic=False)


def count_projection_matrices(model: nn.Module) -> int:
    """Distinct learned E/F matrices (a per-head (H, k, n) tensor counts H)."""
    total = 0
    for m in model.modules():
        if isinstance(m, LinearProjection):
            total += m.weight.shape[0] if m.weight.dim() == 3 else 1
    return total
