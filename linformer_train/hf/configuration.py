"""``LinformerConfig``: this project's ``model:`` section as a transformers config.

Every ``ModelConfig`` field is stored under its own name (``k``, ``sharing``, ``projection``,
``norm``, ...), so ``config.json`` carries the model exactly as ``config.yaml`` does and
:func:`to_model_config` gives back the validated section the model code is built from. The usual
transformers names (``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``,
``max_position_embeddings``, ``hidden_dropout_prob``) read the same fields through
``attribute_map``; ``num_labels`` is transformers' own (from ``id2label``).
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from linformer_train.config import ModelConfig, config_from_dict

MODEL_TYPE = "linformer-train"
"""The ``model_type`` in config.json; not one of transformers' own model types."""

FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("preset", "num_labels"))


class LinformerConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "intermediate_size": "ffn_size",
        "max_position_embeddings": "max_seq_len",
        "hidden_dropout_prob": "dropout",
        "attention_probs_dropout_prob": "attention_dropout",
        "initializer_range": "init_std",
    }

    def __init__(self, **kwargs):
        defaults = ModelConfig()
        for name in FIELDS:
            value = kwargs.pop(name, getattr(defaults, name))
            setattr(self, name, dict(value) if isinstance(value, dict) else value)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        super().__init__(**kwargs)


def to_model_config(config: LinformerConfig) -> ModelConfig:
    """The validated model section (ConfigError, one line, when a field is out of range)."""
    raw = {name: getattr(config, name) for name in FIELDS}
    raw["num_labels"] = int(config.num_labels)  # at least 2: the head is a softmax classifier
    return config_from_dict({"model": raw}).model


def from_model_config(cfg: ModelConfig, **kwargs) -> LinformerConfig:
    """A LinformerConfig holding ``cfg``; ``kwargs`` are transformers' own (id2label, architectures)."""
    d = dataclasses.asdict(cfg)
    return LinformerConfig(**{**{name: d[name] for name in FIELDS}, **kwargs})
