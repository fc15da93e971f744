"""Model directory -> ONNX (``tools/convert.py to-onnx``).

Exports, in fp32, the encoder of an MLM directory (``input_ids``, ``attention_mask`` ->
``last_hidden_state`` (B, L, D)) or a classifier (-> ``logits`` (B, C)), through
``torch.onnx.export(dynamo=True)``: batch and length are dynamic (length from 2 up to n; a longer
input is outside the graph's range, as it is outside the model's). The length-dependent parts of
the Linformer (how many projection slots a length reaches, mean/conv windows) are computed from
the symbolic length, so one graph serves every length. After writing, onnxruntime (when installed)
runs the file on a few shapes, padded rows included, and the largest difference from torch is
reported; over ``TOLERANCE`` the export fails and nothing is left behind.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from linformer_train.convert import ConversionError
from linformer_train.convert.model_dir import from_pretrained, load_model_info

TOLERANCE = 1e-4
"""Largest |onnxruntime - torch| accepted, fp32 (the tests see below 1e-5 on small models)."""


class EncoderOnly(nn.Module):
    """An MLM model's encoder: what serving embeddings needs (the MLM head is not exported)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids, attention_mask)


def exportable(model_dir: str | os.PathLike) -> tuple[nn.Module, str, int, int]:
    """(module, output name, n, vocab size) of what to-onnx exports for ``model_dir``."""
    info = load_model_info(model_dir)
    model = from_pretrained(model_dir)
    if info["architecture"] == "mlm":
        return EncoderOnly(model.encoder).eval(), "last_hidden_state", model.cfg.max_seq_len, model.cfg.vocab_size
    return model.eval(), "logits", model.cfg.max_seq_len, model.cfg.vocab_size


def sample_inputs(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with the second half of row 0 padded (the mask path is part of every check)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if length > 2:
        mask[0, length // 2:] = 0
        ids[0, length // 2:] = 0
    return ids, mask


def export_onnx(module: nn.Module, out: Path, output_name: str, n: int, vocab: int, opset: int = 18) -> None:
    """Write ``module`` to ``out`` with dynamic batch and length (2..n)."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    length = torch.export.Dim("length", min=2, max=n)
    example = sample_inputs(2, min(n, max(3, n // 2 + 1)), vocab)
    import logging

    quiet = logging.getLogger("torch.onnx")  # notes about torchvision ops this model does not use
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings():  # the exporter's notes on axis naming and opset conversion
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(out), input_names=["input_ids", "attention_mask"],
                          output_names=[output_name], opset_version=opset, dynamo=True, external_data=False,
                          dynamic_shapes={"input_ids": {0: batch, 1: length},
                                          "attention_mask": {0: batch, 1: length}},
                          verbose=False)
    quiet.setLevel(level)


def check_onnx(module: nn.Module, path: Path, n: int, vocab: int) -> float:
    """Largest |onnxruntime - torch| over a few (batch, length) shapes up to n."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, length in ((1, n), (3, max(2, n // 3)), (2, 2), (4, max(2, n - 1))):
        ids, mask = sample_inputs(batch, length, vocab, seed=batch * 1000 + length)
        with torch.no_grad():
            want = module(ids, mask).numpy()
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        diff = np.abs(got - want)
        if want.ndim == 3:  # states at padded positions are not outputs anyone reads
            diff = diff[mask.numpy().astype(bool)]
        worst = max(worst, float(diff.max()))
    return worst


def to_onnx(model_dir: str | os.PathLike, out_path: str | os.PathLike, opset: int = 18,
            overwrite: bool = False) -> str:
    """Export ``model_dir`` to ``out_path``; returns a one-line report of the check."""
    from linformer_train.paths import check_output_apart

    out = Path(out_path)
    check_output_apart(out, {"the model directory": model_dir}, "the ONNX file")
    if out.exists() and (out.is_dir() or not overwrite):
        raise ConversionError(f"{out} already exists; choose another path or pass --overwrite"
                              if not out.is_dir() else f"{out} is a directory; name the .onnx file to write")
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter builds graphs with it)
    except ImportError:
        raise ConversionError("ONNX export needs the onnx and onnxscript packages; pip install onnx onnxscript") from None
    module, output_name, n, vocab = exportable(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        export_onnx(module, tmp, output_name, n, vocab, opset)
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            report = "onnxruntime is not installed: the file was not checked"
        else:
            diff = check_onnx(module, tmp, n, vocab)
            if not diff <= TOLERANCE:
                raise ConversionError(f"the exported graph differs from torch by {diff:.2e} (> {TOLERANCE:g}); "
                                      f"not written")
            report = f"onnxruntime matches torch within {diff:.1e} (batch and length 2..{n} dynamic)"
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return report
