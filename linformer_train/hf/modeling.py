"""transformers ``PreTrainedModel`` wrappers around this project's model code.

Each class builds the model of ``linformer_train.model`` from its config and takes over its parts
under the same names, so the weights have exactly the keys of a model directory
(``encoder.tokens.weight``, ``encoder.layers.0.attn.proj_k.weight``, ``head_dense.weight``, ...)
and the forward is the same code: attention, projections, sharing, per-layer k and padding
handling are those of ``linformer_train/model``, not a second implementation.

``base_model_prefix`` is ``encoder`` and every class holds the encoder there, so a checkpoint of
one loads into another (``AutoModelForSequenceClassification`` from the MLM export: the MLM head is
dropped, a fresh pooler and classifier start from the model's own init).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from linformer_train.hf.configuration import LinformerConfig, to_model_config
from linformer_train.model import LinformerEncoder, LinformerForMLM
from linformer_train.model import LinformerForSequenceClassification as _Classifier
from linformer_train.model.encoder import IGNORE_INDEX, apply_activation_checkpointing, init_module


def _adopt(wrapper: nn.Module, core: nn.Module) -> None:
    """Make ``core``'s children and own parameters the wrapper's, under the same names."""
    for name, child in core.named_children():
        wrapper.add_module(name, child)
    for name, param in core.named_parameters(recurse=False):
        wrapper.register_parameter(name, param)
    wrapper.cfg = core.cfg


def _check_unsupported(token_type_ids, output_hidden_states, output_attentions) -> None:
    if token_type_ids is not None and bool(token_type_ids.ne(0).any()):
        raise ValueError("this model has no segment (token type) embeddings; pass sentence pairs as one "
                         "sequence <s> a </s></s> b </s> (the tokenizer does) without token_type_ids")
    if output_hidden_states or output_attentions:
        raise ValueError("Linformer models return the last hidden state only (no per-layer hidden states "
                         "or attention maps)")


class LinformerPreTrainedModel(PreTrainedModel):
    config_class = LinformerConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]

    def _init_weights(self, module: nn.Module) -> None:
        """The model's own init (linformer_train.model.encoder.init_module) for the weights a
        checkpoint did not provide; transformers skips every module whose weights it loaded."""
        if isinstance(module, PreTrainedModel):
            if isinstance(getattr(module, "head_bias", None), nn.Parameter):
                from transformers import initialization

                initialization.zeros_(module.head_bias)
            return
        init_module(module, self.cfg)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Recompute each block in backward (the encoder's non-reentrant checkpointing)."""
        apply_activation_checkpointing(self)

    def gradient_checkpointing_disable(self) -> None:
        for m in self.modules():
            if isinstance(m, LinformerEncoder):
                m.activation_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "activation_checkpointing", False) for m in self.modules())

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        raise NotImplementedError("the MLM decoder reads encoder.tokens.weight; change the vocabulary with "
                                  "this project's tools instead")


class LinformerModel(LinformerPreTrainedModel):
    """The encoder: (B, L) ids -> ``last_hidden_state`` (B, L, D). What ``AutoModel`` and
    sentence-transformers load."""

    def __init__(self, config: LinformerConfig):
        super().__init__(config)
        self.cfg = to_model_config(config)
        self.encoder = LinformerEncoder(self.cfg)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, output_hidden_states: Optional[bool] = None,
                output_attentions: Optional[bool] = None, return_dict: Optional[bool] = None):
        _check_unsupported(token_type_ids, output_hidden_states, output_attentions)
        h = self.encoder(input_ids, attention_mask)                  # (B, L, D)
        out = BaseModelOutput(last_hidden_state=h)
        return out if return_dict is not False else out.to_tuple()


class LinformerForMaskedLM(LinformerPreTrainedModel):
    """Encoder + the RoBERTa-style MLM head of LinformerForMLM (decoder tied to the embeddings by
    construction: it multiplies by ``encoder.tokens.weight``). Loss: mean cross-entropy over the
    positions whose label is not -100, as transformers' models report it."""

    def __init__(self, config: LinformerConfig):
        super().__init__(config)
        _adopt(self, LinformerForMLM(to_model_config(config)))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                return_dict: Optional[bool] = None):
        _check_unsupported(token_type_ids, output_hidden_states, output_attentions)
        logits = LinformerForMLM._logits(self, self.encoder(input_ids, attention_mask))  # (B, L, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        out = MaskedLMOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()


class LinformerForSequenceClassification(LinformerPreTrainedModel):
    """Encoder + the first-token pooler and classifier of this project's classifier. Loss:
    cross-entropy (``problem_type`` single_label_classification, the default) or binary
    cross-entropy per label (multi_label_classification)."""

    def __init__(self, config: LinformerConfig):
        super().__init__(config)
        _adopt(self, _Classifier(to_model_config(config)))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                return_dict: Optional[bool] = None):
        _check_unsupported(token_type_ids, output_hidden_states, output_attentions)
        logits = _Classifier.forward(self, input_ids, attention_mask)              # (B, C)
        loss = None
        if labels is not None:
            if self.config.problem_type == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.view(-1))
        out = SequenceClassifierOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()
