"""One MLM training step of a tiny model at a long n, in a process of its own; prints a JSON line.

Usage: python long_step.py N LIMIT_GIB MODEL_JSON [MODEL_JSON ...]

Each MODEL_JSON is a model section (tiny preset overrides). For each, the model is built, the
kernel's peak-RSS counter is reset, and one forward + backward runs on one sequence of N tokens
whose last third is padding (15% of the real positions predicted). Printed per model: the peak RSS
growth of the step (bytes), the loss, whether every gradient is finite and which parameters got
none. The address space is capped at the RSS after start-up plus LIMIT_GIB, so a hidden n x n
buffer (16 GiB in fp32 at n=65536, for every head) fails as an allocation error here instead of
waking the kernel's OOM killer on a shared machine.
"""

from __future__ import annotations

import json
import resource
import sys

import torch


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    from linformer_train.config import config_from_dict
    from linformer_train.model import LinformerForMLM, apply_activation_checkpointing

    n, limit_gib = int(sys.argv[1]), float(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vm = _kib("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(limit_gib * (1 << 30)), resource.RLIM_INFINITY))
    for spec in sys.argv[3:]:
        section = json.loads(spec)
        checkpointing = section.pop("activation_checkpointing", False)
        cfg = config_from_dict({"model": dict(preset="tiny", max_seq_len=n, **section)}).model
        model = LinformerForMLM(cfg).train()
        if checkpointing:
            apply_activation_checkpointing(model)
        real = n - n // 3
        ids = torch.randint(5, cfg.vocab_size, (1, n))
        mask = torch.zeros(1, n, dtype=torch.long)
        mask[:, :real] = 1
        labels = torch.where((torch.rand(1, n) < 0.15) & mask.bool(), ids, torch.full_like(ids, -100))
        exact = reset_peak()
        base = _kib("VmRSS") * 1024  # without a reset, VmHWM counts from start: an overestimate
        out = model(ids, attention_mask=mask, labels=labels)
        (out.loss_sum / out.num_predicted).backward()
        growth = _kib("VmHWM") * 1024 - base
        no_grad = [name for name, p in model.named_parameters() if p.grad is None]
        finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
        print(json.dumps({"model": spec, "peak_growth_bytes": growth, "exact_peak": exact,
                          "loss": (out.loss_sum / out.num_predicted).item(), "grads_finite": finite,
                          "no_grad": no_grad}), flush=True)
        del model, out


if __name__ == "__main__":
    main()
