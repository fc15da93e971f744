"""Linformer encoder, attention variants and heads (no training code)."""

from linformer_train.model.attention import SequenceTooLongError
from linformer_train.model.encoder import (
    IGNORE_INDEX,
    LinformerEncoder,
    LinformerForMLM,
    LinformerForSequenceClassification,
    MLMOutput,
    apply_activation_checkpointing,
    apply_compile,
    count_projection_matrices,
)
from linformer_train.model.flops import encoder_flops

__all__ = [
    "IGNORE_INDEX", "LinformerEncoder", "LinformerForMLM", "LinformerForSequenceClassification",
    "MLMOutput", "SequenceTooLongError", "apply_activation_checkpointing", "apply_compile",
    "count_projection_matrices", "encoder_flops",
]
