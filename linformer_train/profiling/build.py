"""Building what one case runs: the module, its inputs, the step function and the optimizer."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from linformer_train.config import ConfigError, ModelConfig, k_schedule
from linformer_train.profiling.cases import DTYPES, Case, predicted_per_sequence


class MasterWeightAdamW:
    """AdamW on fp32 master copies of 16-bit parameters, as DeepSpeed's bf16/fp16 optimizers keep
    them: 16-bit params and grads in the model, fp32 grads, master weights and two moments here."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-4):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr)

    def step(self) -> None:
        for m, p in zip(self.master, self.params):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        for m in self.master:
            m.grad = None


def _pypi_layer(cfg: ModelConfig) -> nn.Module:
    try:
        from linformer import LinformerSelfAttention as PypiLinformerSelfAttention
    except ImportError as exc:
        raise ConfigError("--impl pypi needs the `linformer` package: pip install linformer") from exc
    return PypiLinformerSelfAttention(
        dim=cfg.hidden_size, seq_len=cfg.max_seq_len, k=k_schedule(cfg)[0], heads=cfg.num_heads,
        share_kv=(cfg.sharing == "kv"), dropout=cfg.attention_dropout)


def build_step(case: Case, cfg: ModelConfig, device: torch.device
               ) -> tuple[nn.Module, Callable[[], None], Any]:
    """(module, step(), optimizer) for the case, everything already on the device."""
    from linformer_train.model import LinformerEncoder, LinformerForMLM
    from linformer_train.model.encoder import build_attention, init_weights

    dtype = DTYPES[case.dtype]
    B, L = case.batch_size, case.seq_len
    gen = torch.Generator().manual_seed(0)
    with torch.device(device):  # initialise where it runs: a base model inits in ms on a GPU
        if case.target == "layer":
            module = _pypi_layer(cfg) if case.impl == "pypi" else build_attention(cfg, k_schedule(cfg)[0])
        else:
            module = LinformerEncoder(cfg) if case.target == "encoder" else LinformerForMLM(cfg)
            if case.target == "encoder":
                init_weights(module, cfg)
    if case.target == "layer":
        inputs = (torch.randn(B, L, cfg.hidden_size, generator=gen),)
    else:
        inputs = (torch.randint(1, cfg.vocab_size, (B, L), generator=gen),)
    module = module.to(device=device, dtype=dtype)
    inputs = tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                   for t in inputs)
    labels = None
    if case.target == "mlm" and case.mode != "forward":
        predicted = predicted_per_sequence(case)
        chosen = torch.rand(B, L, generator=gen).argsort(dim=1)[:, :predicted]
        labels = torch.full((B, L), -100, dtype=torch.long)
        labels.scatter_(1, chosen, inputs[0].cpu().gather(1, chosen))
        labels = labels.to(device)
    grad_out = None
    if case.target != "mlm" and case.mode != "forward":
        grad_out = torch.randn(B, L, cfg.hidden_size, generator=gen).to(device=device, dtype=dtype)

    optimizer = None
    if case.mode == "train":
        optimizer = (torch.optim.AdamW(module.parameters(), lr=1e-4) if dtype == torch.float32
                     else MasterWeightAdamW(module.parameters()))

    if case.mode == "forward":
        module.eval()

        def step() -> None:
            with torch.no_grad():
                module(*inputs)
        return module, step, optimizer

    module.train()

    def step() -> None:
        if case.target == "mlm":
            out = module(*inputs, labels=labels)
            (out.loss_sum / out.num_predicted).backward()
        else:
            module(*inputs).backward(grad_out)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            module.zero_grad(set_to_none=True)
    return module, step, optimizer


def warm_runtime(device: torch.device) -> None:
    """First use of autograd, the thread pools and the GEMM/SDPA kernels allocates once per process
    (~20-40 MiB of RSS on CPU): pay it on a toy problem before the baseline is read, so a case's step
    memory is its own."""
    emb = nn.Embedding(16, 32).to(device)
    lin = nn.Linear(32, 32).to(device)
    norm = nn.LayerNorm(32).to(device)
    x = norm(lin(emb(torch.arange(8, device=device)[None])))         # (1, 8, 32)
    q = torch.nn.functional.gelu(x).view(1, 8, 2, 16).transpose(1, 2)  # (1, 2, 8, 16)
    y = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.nn.functional.dropout(torch.matmul(y, q.transpose(-1, -2)), 0.1).sum().backward()
    opt = torch.optim.AdamW([*lin.parameters(), *emb.parameters(), *norm.parameters()], lr=1e-4)
    opt.step()
    _sync(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
