"""Trained Linformers in the Hugging Face stack: ``import linformer_train.hf`` registers
``LinformerConfig`` (model_type ``linformer-train``) and ``LinformerModel``,
``LinformerForMaskedLM``, ``LinformerForSequenceClassification`` with transformers' Auto classes, so
``AutoModelForMaskedLM.from_pretrained(DIR)``, ``pipeline("fill-mask", model=DIR)``, ``Trainer`` and
sentence-transformers load a directory written by ``tools/convert.py to-hf``: no
``trust_remote_code``, no pickle (safetensors weights, JSON config).

- ``configuration``  LinformerConfig <-> this project's ModelConfig
- ``modeling``       the PreTrainedModel wrappers (this project's model code, same state-dict keys)
- ``tokenizer``      a sentencepiece model -> a fast (``tokenizers``) tokenizer with the same ids
"""

from __future__ import annotations

from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM,
                          AutoModelForSequenceClassification)

from linformer_train.hf.configuration import MODEL_TYPE, LinformerConfig, from_model_config, to_model_config
from linformer_train.hf.modeling import (LinformerForMaskedLM, LinformerForSequenceClassification,
                                         LinformerModel, LinformerPreTrainedModel)

AutoConfig.register(MODEL_TYPE, LinformerConfig, exist_ok=True)
AutoModel.register(LinformerConfig, LinformerModel, exist_ok=True)
AutoModelForMaskedLM.register(LinformerConfig, LinformerForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(LinformerConfig, LinformerForSequenceClassification, exist_ok=True)

__all__ = ["MODEL_TYPE", "LinformerConfig", "LinformerForMaskedLM", "LinformerForSequenceClassification",
           "LinformerModel", "LinformerPreTrainedModel", "from_model_config", "to_model_config"]
