"""Portable model directories and the conversions around them.

- ``model_dir``  save_pretrained / from_pretrained: ``model.safetensors`` + ``config.yaml`` +
                 ``model_info.json`` + the tokenizer, loaded without DeepSpeed, key sets checked strictly
- ``export``     a DeepSpeed checkpoint of any ZeRO stage -> a model directory (fp32 master weights)
- ``resize``     change n (max_seq_len) and the per-layer k of a model directory
- ``hf``         warm start from a local RoBERTa/BERT checkpoint directory (no ``transformers`` needed)

Every user mistake is a :class:`ConversionError` with a one-line message; nothing is left half
written (each output is built in a temporary directory and renamed at the end).
"""

from __future__ import annotations


class ConversionError(ValueError):
    """A conversion cannot be done as asked; one line: what, where, and how to fix it."""


def __getattr__(name: str):
    # Light package import (the CLIs import ConversionError to recognise a user's mistake).
    import importlib

    model_dir = importlib.import_module("linformer_train.convert.model_dir")
    if name in __all__ and hasattr(model_dir, name):
        return getattr(model_dir, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConversionError", "from_pretrained", "save_pretrained", "load_model_info",
           "read_model_config"]
