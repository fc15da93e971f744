"""Self-attention: Linformer (sequence-axis projections of K and V), full SDPA, and the written-out O(n^2) baseline.

Linformer (Wang et al., 2020) projects each head's keys and values, (L, Dh), along the sequence
axis to k rows before attention:  softmax(Q (E K)^T / sqrt(Dh)) (F V).  The short K/V then go
through ``F.scaled_dot_product_attention`` so fused kernels apply; those kernels accumulate the
softmax in fp32 under bf16/fp16.

Padding: padded K and V rows are zeroed immediately before every projection, in every layer, so
outputs at real positions never depend on what padded positions hold (the official fairseq code
skips this and leaks padding into E·K from layer 2 on).

Shorter inputs (L < n) use the first L columns of E and F. By default (``projection_init:
window``) E and F start as mean pooling: slot s averages the s-th of k equal windows of the n
positions, then trains on. An input of L_real real tokens then uses only the ceil(L_real k / n)
slots whose windows it reaches (``short_input_scaling: window``); the others are masked out of
attention, and the slots it keeps see the same positions they saw at length n, so a short input is
read as the prefix of a long one, as full attention reads it. With the paper's dense N(0, 1/n) init
(``projection_init: normal``) every slot mixes every position; a short input keeps all k slots and
rescales them by sqrt(n / L_real), n / L_real or not at all (``short_input_scaling``). Either way
L_real counts the real (unpadded) tokens of each sequence, so the result does not depend on how
much padding a batch carries. Longer inputs are refused with both lengths in the message.

Why windows: from a dense random init, each slot is a random-signed mix of all tokens, so attention
starts unable to single out a token or to average the input; on short texts (SST-2 sentences at
n=256) a model learns much more slowly than with full attention, and a model pretrained on full
n-token blocks meets, at L << n, slots that each lost most of their inputs (docs/QUALITY.md).

Per-layer k with layerwise sharing: one (k_max, n) matrix serves every layer; layer l uses its
first k_l rows. Nothing falls back silently.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class SequenceTooLongError(ValueError):
    """An input is longer than the model's max_seq_len (n)."""


def check_length(length: int, max_seq_len: int) -> None:
    if length > max_seq_len:
        raise SequenceTooLongError(
            f"input length {length} exceeds model.max_seq_len={max_seq_len}; truncate inputs to "
            f"{max_seq_len} tokens or resize the model (tools/convert.py resize)"
        )


# --------------------------------------------------------------------------------------------------
# Sequence-axis projections: (B, H, L, Dh) -> (B, H, S, Dh), S <= k
# --------------------------------------------------------------------------------------------------


def slots_reached(lengths: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """How many of k windows over n positions an input of ``lengths`` tokens reaches: window s
    starts at floor(s n / k), which is < L exactly when s < L k / n."""
    return torch.div(lengths * k + n - 1, n, rounding_mode="floor")


class LinearProjection(nn.Module):
    """Learned E (or F): a (k, n) matrix, or (H, k, n) with one per head; no bias (ZeRO needs every
    parameter to get a gradient, and the paper's E has none).

    Init ``window`` (default): row s is 1/|w_s| on window w_s = [floor(s n/k), floor((s+1) n/k))
    and 0 elsewhere, so at init the projection is mean pooling (``projection: mean``) and a slot
    averages its own tokens, at any n. Init ``mixed``: those windows plus the normal draw. Init
    ``normal``: N(0, 1/n); E·K sums over n tokens, so std
    1/sqrt(n) keeps a slot at the scale of one token at any n (1/sqrt(k) would grow it by
    sqrt(n/k): ~3x at n=8192).
    """

    def __init__(self, k: int, max_seq_len: int, num_heads: Optional[int] = None,
                 short_input_scaling: str = "window", init: str = "window"):
        super().__init__()
        shape = (k, max_seq_len) if num_heads is None else (num_heads, k, max_seq_len)
        self.weight = nn.Parameter(torch.empty(shape))
        self.max_seq_len = max_seq_len
        self.short_input_scaling = short_input_scaling
        self.init = init
        self.init_weights()

    def init_weights(self) -> None:
        if self.init in ("normal", "mixed"):
            nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.max_seq_len))
        if self.init == "normal":
            return
        k, n = self.weight.shape[-2:]
        # position p lies in window s when floor(s n/k) <= p < floor((s+1) n/k), the windows
        # slots_reached counts: s = ceil((p+1) k/n) - 1 (floor(p k/n) starts them at ceil(s n/k)
        # instead, which differs when k does not divide n)
        slot = torch.div((torch.arange(n) + 1) * k - 1, n, rounding_mode="floor")  # (n,)
        rows = (slot[None, :] == torch.arange(k)[:, None]).float()        # (k, n) one-hot windows
        windows = (rows / rows.sum(-1, keepdim=True)).expand_as(self.weight)
        with torch.no_grad():
            if self.init == "mixed":  # the window means on top of the dense draw
                self.weight.add_(windows)
            else:
                self.weight.copy_(windows)

    def forward(self, x: torch.Tensor, k_used: int, lengths: Optional[torch.Tensor]
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        L = x.shape[-2]
        slot_mask = None
        if self.short_input_scaling == "window":
            n = self.max_seq_len
            # ceil division written without negatives: the ONNX exporter turns a floor division of a
            # symbolic length into ONNX Div, which truncates, so -(-a // b) would export as 0
            rows = min(k_used, (L * k_used + n - 1) // n)        # slots the (padded) batch reaches
            if lengths is not None:                              # fewer for shorter sequences
                reached = slots_reached(lengths.clamp(min=1), k_used, n)  # (B,)
                slot_mask = (torch.arange(rows, device=x.device) < reached[:, None])[:, None, None, :]
            k_used = rows                                        # (B, 1, 1, S), True = attend
        w = self.weight[..., :k_used, :L].to(x.dtype)          # (k, L) or (H, k, L)
        y = _project_shared(w, x) if w.dim() == 2 else torch.matmul(w, x)  # (B, H, k, Dh)
        scale = self._scale(L, lengths, x)
        if scale is not None:
            y = y * scale
        return y, slot_mask  # dense rows: every slot mixes all real tokens, none is empty

    def _scale(self, L: int, lengths: Optional[torch.Tensor], x: torch.Tensor):
        if self.short_input_scaling in ("none", "window"):
            return None
        n = self.max_seq_len
        if lengths is None:
            if L == n:
                return None
            ratio = torch.tensor(n / L, dtype=torch.float32, device=x.device)
        else:
            ratio = n / lengths.clamp(min=1).to(torch.float32)  # (B,)
            ratio = ratio.view(-1, 1, 1, 1)
        if self.short_input_scaling == "sqrt":
            ratio = ratio.sqrt()
        return ratio.to(x.dtype)


def _project_shared(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """E·X for one (k, L) matrix shared by the heads: one (k, L) x (L, H*Dh) GEMM per sequence.

    x is usually a view into the fused qkv output, laid out (B, L, H, Dh) in memory, so (H, Dh)
    flattens to D without a copy. ``torch.matmul(w, x)`` folds (B, H) into one batch dimension
    instead, which copies x (B*L*D elements, kept alive for backward: +1.2 GB for base at n=8192,
    batch 4, bf16) and runs H narrow GEMMs; bmm on the (B, L, D) view saves only w and is faster.
    """
    B, H, L, Dh = x.shape
    xt = x.transpose(1, 2)                                      # (B, L, H, Dh)
    if xt.stride(-1) != 1 or xt.stride(-2) != Dh:               # heads not adjacent: plain path
        return torch.matmul(w, x)
    y = torch.bmm(w.expand(B, -1, -1), xt.reshape(B, L, H * Dh))  # (B, k, D), no copy of x
    return y.view(B, -1, H, Dh).transpose(1, 2)                 # (B, H, k, Dh)


class MeanPoolProjection(nn.Module):
    """Mean pooling over windows of n / k tokens: no parameters (so nothing to share between heads,
    keys and values or layers). Padded tokens are excluded from each mean; a window holding no real
    token is masked out of attention."""

    def __init__(self, k: int, max_seq_len: int):
        super().__init__()
        self.window = max_seq_len // k

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        B, H, L, Dh = x.shape
        w = self.window
        slots = (L + w - 1) // w                                # ceil, exportable (see above)
        x = F.pad(x, (0, 0, 0, slots * w - L))                  # (B, H, S*w, Dh)
        summed = x.view(B, H, slots, w, Dh).sum(dim=3)          # (B, H, S, Dh)
        counts, slot_mask = _window_counts(mask, L, w, slots, x.device)
        return summed / counts.to(x.dtype), slot_mask


class ConvProjection(nn.Module):
    """Strided convolution along the sequence, kernel = stride = n / k, shared by the heads."""

    def __init__(self, k: int, max_seq_len: int, head_dim: int):
        super().__init__()
        self.window = max_seq_len // k
        self.conv = nn.Conv1d(head_dim, head_dim, kernel_size=self.window, stride=self.window,
                              bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.conv.weight, std=1.0 / math.sqrt(self.conv.weight[0].numel()))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        B, H, L, Dh = x.shape
        w = self.window
        slots = (L + w - 1) // w                                # ceil, exportable (see above)
        x = F.pad(x, (0, 0, 0, slots * w - L))
        y = self.conv(x.reshape(B * H, slots * w, Dh).transpose(1, 2))  # (B*H, Dh, S)
        y = y.transpose(1, 2).reshape(B, H, slots, Dh)
        _, slot_mask = _window_counts(mask, L, w, slots, x.device)
        return y, slot_mask


def _window_counts(mask: Optional[torch.Tensor], L: int, w: int, slots: int, device):
    """Real tokens per window (B, 1, S, 1) and the SDPA key mask (B, 1, 1, S), True = attend."""
    if mask is None:
        valid = torch.ones(1, L, device=device)
    else:
        valid = mask.to(torch.float32)                          # (B, L)
    valid = F.pad(valid, (0, slots * w - L))
    counts = valid.view(valid.shape[0], slots, w).sum(-1)       # (B, S)
    slot_mask = None if mask is None else (counts > 0)[:, None, None, :]
    return counts.clamp(min=1)[:, None, :, None], slot_mask


def build_projection(kind: str, k: int, max_seq_len: int, num_heads: int, head_dim: int,
                     per_head: bool, short_input_scaling: str, init: str = "window") -> nn.Module:
    if kind == "linear":
        return LinearProjection(k, max_seq_len, num_heads if per_head else None, short_input_scaling,
                                init)
    if kind == "mean":
        return MeanPoolProjection(k, max_seq_len)
    if kind == "conv":
        return ConvProjection(k, max_seq_len, head_dim)
    raise ValueError(f"unknown projection kind {kind!r}; choose linear, mean or conv")


def project(proj: nn.Module, x: torch.Tensor, k_used: int, lengths, mask):
    """(B, H, L, Dh) -> (B, H, S, Dh) and the slots' key mask. Learned rows read the layer's k_used
    of a (possibly layerwise-shared) matrix and the real lengths; pooling has its own fixed window
    and needs the token mask."""
    if isinstance(proj, LinearProjection):
        return proj(x, k_used, lengths)
    return proj(x, mask)


# --------------------------------------------------------------------------------------------------
# Attention modules: (B, L, D) -> (B, L, D)
# --------------------------------------------------------------------------------------------------


class _SelfAttention(nn.Module):
    """Shared plumbing: fused QKV in, heads split, output projection."""

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def split_heads(self, x: torch.Tensor):
        """Q, K, V from the fused projection: (B, L, D) -> 3 x (B, H, L, Dh) views (also read by
        the spectrum measurement)."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)              # 3 x (B, H, L, Dh)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, H, L, Dh = y.shape
        return self.out(y.transpose(1, 2).reshape(B, L, H * Dh))  # (B, L, D)

    @property
    def _dropout_p(self) -> float:
        return self.attention_dropout if self.training else 0.0


class FullSelfAttention(_SelfAttention):
    """Softmax attention over all L keys through SDPA (flash / memory-efficient kernels)."""

    def forward(self, x, mask: Optional[torch.Tensor] = None, lengths=None, shared=None):
        q, k, v = self.split_heads(x)
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self._dropout_p)
        return self._merge(y)


class NaiveSelfAttention(_SelfAttention):
    """softmax(Q K^T / sqrt(Dh)) V written out, materialising the (L, L) matrix: the paper's
    O(n^2) baseline. Softmax in fp32."""

    def forward(self, x, mask: Optional[torch.Tensor] = None, lengths=None, shared=None):
        q, k, v = self.split_heads(x)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, L, L)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        probs = F.dropout(probs, self._dropout_p, self.training)
        return self._merge(torch.matmul(probs, v))


class LinformerSelfAttention(_SelfAttention):
    """Linformer attention with this layer's k. Projections are owned here unless sharing is
    layerwise, where the encoder's one projection is passed in as ``shared`` (so it is stored
    once, under one state-dict key)."""

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float, *,
                 k: int, max_seq_len: int, projection: str, sharing: str,
                 short_input_scaling: str, projection_init: str = "window"):
        super().__init__(hidden_size, num_heads, attention_dropout)
        self.k = k
        self.max_seq_len = max_seq_len
        self.sharing = sharing

        def make():
            return build_projection(projection, k, max_seq_len, num_heads, self.head_dim,
                                    per_head=(sharing == "none"),
                                    short_input_scaling=short_input_scaling, init=projection_init)

        self.proj_k = make() if sharing != "layerwise" else None
        self.proj_v = make() if sharing in ("none", "headwise") else None

    def forward(self, x, mask: Optional[torch.Tensor] = None, lengths=None,
                shared: Optional[nn.Module] = None):
        q, keys, values = self.split_heads(x)                     # (B, H, L, Dh)
        if mask is not None:
            keep = mask[:, None, :, None].to(keys.dtype)          # (B, 1, L, 1)
            keys, values = keys * keep, values * keep             # zero padded rows before E, F
        proj_k = self.proj_k if self.proj_k is not None else shared
        proj_v = self.proj_v if self.proj_v is not None else proj_k
        if proj_k is None:
            raise RuntimeError("layerwise sharing needs the encoder's shared projection")
        keys, slot_mask = project(proj_k, keys, self.k, lengths, mask)  # (B, H, S, Dh), S <= self.k
        values, _ = project(proj_v, values, self.k, lengths, mask)      # (B, H, S, Dh)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=slot_mask, dropout_p=self._dropout_p)
        return self._merge(y)                                     # (B, L, D)
