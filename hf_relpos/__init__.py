"""hf_relpos: BERT-style encoders and GPT-2- and Llama-style decoders with the position encoding of your choice.

Importing the package registers every model with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .adapt import adapt  # binds `hf_relpos.adapt` to the function (the module stays `hf_relpos.adapt` in imports)
from .configuration_relpos import (
    HF_RELPOS_VERSION,
    RelPosBertConfig,
    RelPosEncoderDecoderConfig,
    RelPosGPTConfig,
    RelPosLlamaConfig,
)
from .encodings import POSITION_ENCODINGS, PositionEncoding, PositionState
from .modeling_relpos_bert import (
    RelPosBertForCausalLM,
    RelPosBertForMaskedLM,
    RelPosBertForMultipleChoice,
    RelPosBertForQuestionAnswering,
    RelPosBertForSequenceClassification,
    RelPosBertForTokenClassification,
    RelPosBertModel,
    RelPosBertPreTrainedModel,
)
from .modeling_relpos_encoder_decoder import RelPosEncoderDecoderModel
from .modeling_relpos_gpt import (
    RelPosGPTForCausalLM,
    RelPosGPTForSequenceClassification,
    RelPosGPTModel,
    RelPosGPTPreTrainedModel,
)
from .modeling_relpos_llama import (
    RelPosLlamaForCausalLM,
    RelPosLlamaForSequenceClassification,
    RelPosLlamaModel,
    RelPosLlamaPreTrainedModel,
)


__version__ = HF_RELPOS_VERSION

AUTO_CLASSES = {
    RelPosBertConfig: {
        AutoModel: RelPosBertModel,
        AutoModelForMaskedLM: RelPosBertForMaskedLM,
        AutoModelForCausalLM: RelPosBertForCausalLM,
        AutoModelForSequenceClassification: RelPosBertForSequenceClassification,
        AutoModelForTokenClassification: RelPosBertForTokenClassification,
        AutoModelForQuestionAnswering: RelPosBertForQuestionAnswering,
        AutoModelForMultipleChoice: RelPosBertForMultipleChoice,
    },
    RelPosGPTConfig: {
        AutoModel: RelPosGPTModel,
        AutoModelForCausalLM: RelPosGPTForCausalLM,
        AutoModelForSequenceClassification: RelPosGPTForSequenceClassification,
    },
    RelPosLlamaConfig: {
        AutoModel: RelPosLlamaModel,
        AutoModelForCausalLM: RelPosLlamaForCausalLM,
        AutoModelForSequenceClassification: RelPosLlamaForSequenceClassification,
    },
    RelPosEncoderDecoderConfig: {AutoModelForSeq2SeqLM: RelPosEncoderDecoderModel},
}


def _register() -> None:
    """Register with the Auto classes, and mark every class so `save_pretrained` writes its code beside it."""
    for config_class, models in AUTO_CLASSES.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()
        for auto_class, model_class in models.items():
            auto_class.register(config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_class.__name__)


_register()

__all__ = [
    "POSITION_ENCODINGS",
    "PositionEncoding",
    "PositionState",
    "RelPosBertConfig",
    "RelPosBertForCausalLM",
    "RelPosBertForMaskedLM",
    "RelPosBertForMultipleChoice",
    "RelPosBertForQuestionAnswering",
    "RelPosBertForSequenceClassification",
    "RelPosBertForTokenClassification",
    "RelPosBertModel",
    "RelPosBertPreTrainedModel",
    "RelPosEncoderDecoderConfig",
    "RelPosEncoderDecoderModel",
    "RelPosGPTConfig",
    "RelPosGPTForCausalLM",
    "RelPosGPTForSequenceClassification",
    "RelPosGPTModel",
    "RelPosGPTPreTrainedModel",
    "RelPosLlamaConfig",
    "RelPosLlamaForCausalLM",
    "RelPosLlamaForSequenceClassification",
    "RelPosLlamaModel",
    "RelPosLlamaPreTrainedModel",
    "adapt",
]
