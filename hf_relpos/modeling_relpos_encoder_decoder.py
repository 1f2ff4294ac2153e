"""transformers' `EncoderDecoderModel` with relpos halves that load without the Auto registry.

`EncoderDecoderModel` builds its halves through `AutoModel` / `AutoModelForCausalLM`, which know the relpos classes
only where hf_relpos is imported. This subclass builds them from the config's classes directly, so a saved relpos
encoder-decoder (e.g. BERT2BERT warm-started from one checkpoint, `hf_relpos.convert.load_seq2seq`) loads with
`AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True)` anywhere. Training, the loss and `generate`
are `EncoderDecoderModel`'s own.
"""

from transformers import EncoderDecoderModel, PreTrainedModel

from .configuration_relpos import RelPosBertConfig, RelPosEncoderDecoderConfig
from .modeling_relpos_bert import RelPosBertForCausalLM, RelPosBertModel
from .modeling_relpos_gpt import RelPosGPTForCausalLM


class RelPosEncoderDecoderModel(EncoderDecoderModel):
    """A `RelPosBertModel` encoder (without BERT's pooler: the decoder reads every state) and a
    `RelPosBertForCausalLM` or `RelPosGPTForCausalLM` decoder (with cross-attention), each with its own encoding."""

    config_class = RelPosEncoderDecoderConfig

    def __init__(
        self,
        config: RelPosEncoderDecoderConfig | None = None,
        encoder: PreTrainedModel | None = None,
        decoder: PreTrainedModel | None = None,
    ):
        if config is None and encoder is not None and decoder is not None:
            config = RelPosEncoderDecoderConfig.from_encoder_decoder_configs(encoder.config, decoder.config)
        if config is not None:
            if not isinstance(config, RelPosEncoderDecoderConfig):
                # Remote code imports the config's module twice (for AutoConfig and for this file): same class,
                # two class objects, and `EncoderDecoderModel` checks `isinstance`.
                config = RelPosEncoderDecoderConfig.from_dict(config.to_dict())
            if encoder is None:
                encoder = RelPosBertModel(config.encoder, add_pooling_layer=False)
            if decoder is None:
                # By model_type: remote code may load the config module apart from this one's import of it.
                decoder_class = (
                    RelPosBertForCausalLM if config.decoder.model_type == RelPosBertConfig.model_type
                    else RelPosGPTForCausalLM
                )
                decoder = decoder_class(config.decoder)
        super().__init__(config, encoder, decoder)
