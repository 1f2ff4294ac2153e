"""hf_relpos: BERT-style encoders and GPT-style decoders with the position encoding of your choice.

Importing the package registers every model with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_relpos import RelPosBertConfig
from .encodings import POSITION_ENCODINGS, PositionEncoding, PositionState
from .modeling_relpos_bert import (
    RelPosBertForMaskedLM,
    RelPosBertForMultipleChoice,
    RelPosBertForQuestionAnswering,
    RelPosBertForSequenceClassification,
    RelPosBertForTokenClassification,
    RelPosBertModel,
    RelPosBertPreTrainedModel,
)


__version__ = "0.1.0"

_BERT_AUTO_CLASSES = {
    AutoModel: RelPosBertModel,
    AutoModelForMaskedLM: RelPosBertForMaskedLM,
    AutoModelForSequenceClassification: RelPosBertForSequenceClassification,
    AutoModelForTokenClassification: RelPosBertForTokenClassification,
    AutoModelForQuestionAnswering: RelPosBertForQuestionAnswering,
    AutoModelForMultipleChoice: RelPosBertForMultipleChoice,
}


def _register() -> None:
    AutoConfig.register(RelPosBertConfig.model_type, RelPosBertConfig, exist_ok=True)
    RelPosBertConfig.register_for_auto_class()
    for auto_class, model_class in _BERT_AUTO_CLASSES.items():
        auto_class.register(RelPosBertConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


_register()

__all__ = [
    "POSITION_ENCODINGS",
    "PositionEncoding",
    "PositionState",
    "RelPosBertConfig",
    "RelPosBertForMaskedLM",
    "RelPosBertForMultipleChoice",
    "RelPosBertForQuestionAnswering",
    "RelPosBertForSequenceClassification",
    "RelPosBertForTokenClassification",
    "RelPosBertModel",
    "RelPosBertPreTrainedModel",
]
