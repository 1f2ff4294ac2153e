"""A BERT-style encoder whose position encoding is chosen by `config.position_embedding_type`.

Module names and shapes are BERT's, so BERT, RoBERTa and MiniLM checkpoints load by name; the encoding sits where
BERT keeps `embeddings.position_embeddings` (for `absolute` it *is* that table). With `is_decoder=True` (and
`add_cross_attention=True`) it is BERT's decoder, as in `BertLMHeadModel`: causal self-attention with the causal
form of the encoding, cross-attention without position terms, a KV cache and `generate` (`RelPosBertForCausalLM`),
so one BERT checkpoint warm-starts both halves of an `EncoderDecoderModel` (Rothe et al. 2020, BERT2BERT).
"""

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.bert.modeling_bert import (
    BertIntermediate,
    BertLMPredictionHead,
    BertOnlyMLMHead,
    BertOutput,
    BertSelfOutput,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import (
    CACHE_FIELD,
    RelPosPreTrainedModel,
    attention_forward,
    cache_argument,
    cached_positions,
    check_inputs,
    consecutive_offset,
    cross_attention_keys_values,
    position_state,
    self_attention_cache,
)
from .configuration_relpos import RelPosBertConfig
from .encodings import PositionEncoding, PositionState, build_position_encoding


logger = logging.get_logger(__name__)


class RelPosBertEmbeddings(nn.Module):
    """Word (+ token type) embeddings, the encoding's `embed` hook, LayerNorm and dropout, in BERT's order."""

    def __init__(self, config: RelPosBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = build_position_encoding(config, causal=config.is_decoder)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size > 0 else None
        )
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, inputs_embeds: torch.Tensor, token_type_ids: torch.Tensor | None, position_ids: torch.Tensor
    ) -> torch.Tensor:
        embeddings = inputs_embeds
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(inputs_embeds.shape[:-1], dtype=torch.long, device=inputs_embeds.device)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        embeddings = self.position_embeddings.embed(embeddings, position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class RelPosBertPooler(nn.Module):
    """BERT's pooler, `act(W h_0 + b)` of the first token, with the activation `pooler_hidden_act` (BERT's `tanh`;
    DeBERTa's and RoFormer's classification heads use their `gelu` here)."""

    def __init__(self, config: RelPosBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.pooler_hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class RelPosBertSelfAttention(nn.Module):
    """BERT's `query`/`key`/`value` projections around `attention_forward`: self-attention (causal when
    `config.is_decoder`) or, with `is_cross_attention`, attention over the encoder's states with no position terms."""

    def __init__(self, config: RelPosBertConfig, layer_idx: int, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob
        self.is_cross_attention = is_cross_attention
        self.is_causal = config.is_decoder and not is_cross_attention

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[batch, len, hidden] -> [batch, heads, len, head_dim]`."""
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_encoding: PositionEncoding | None,
        position_state: PositionState | None,
        cache: Cache | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = self.split_heads(self.query(hidden_states))
        if self.is_cross_attention:
            key, value = cross_attention_keys_values(
                cache, self.layer_idx,
                lambda: (self.split_heads(self.key(encoder_hidden_states)),
                         self.split_heads(self.value(encoder_hidden_states))),
            )
            self_cache = None
        else:
            key, value = self.split_heads(self.key(hidden_states)), self.split_heads(self.value(hidden_states))
            self_cache = self_attention_cache(cache)
        output, weights = attention_forward(
            self, query, key, value, attention_mask, position_encoding, position_state, cache=self_cache,
            dropout=self.dropout_prob if self.training else 0.0, **kwargs,
        )
        return output.reshape(*hidden_states.shape[:-1], -1), weights


class RelPosBertAttention(nn.Module):
    def __init__(self, config: RelPosBertConfig, layer_idx: int, is_cross_attention: bool = False):
        super().__init__()
        self.self = RelPosBertSelfAttention(config, layer_idx, is_cross_attention)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask, position_encoding, position_state, **kwargs):
        attention_output, _ = self.self(hidden_states, attention_mask, position_encoding, position_state, **kwargs)
        return self.output(attention_output, hidden_states)


class RelPosBertLayer(GradientCheckpointingLayer):
    def __init__(self, config: RelPosBertConfig, layer_idx: int):
        super().__init__()
        self.attention = RelPosBertAttention(config, layer_idx)
        if config.add_cross_attention:
            self.crossattention = RelPosBertAttention(config, layer_idx, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_encoding: PositionEncoding,
        position_state: PositionState,
        cache: Cache | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attention_output = self.attention(
            hidden_states, attention_mask, position_encoding, position_state, cache=cache, **kwargs
        )
        if encoder_hidden_states is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError(
                    "encoder_hidden_states were passed but the model has no cross-attention: build it with "
                    "is_decoder=True and add_cross_attention=True."
                )
            attention_output = self.crossattention(
                attention_output, encoder_attention_mask, None, None, cache=cache,
                encoder_hidden_states=encoder_hidden_states,
            )
        return self.output(self.intermediate(attention_output), attention_output)


class RelPosBertEncoder(nn.Module):
    def __init__(self, config: RelPosBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(RelPosBertLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(self, hidden_states, attention_mask, position_encoding, position_state, **kwargs) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask, position_encoding, position_state, **kwargs)
        return hidden_states


class RelPosBertPreTrainedModel(RelPosPreTrainedModel):
    config: RelPosBertConfig
    config_class = RelPosBertConfig
    base_model_prefix = "bert"
    _no_split_modules = ["RelPosBertEmbeddings", "RelPosBertLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _can_record_outputs = {
        "hidden_states": RelPosBertLayer,
        "attentions": OutputRecorder(RelPosBertSelfAttention, layer_name=".attention.self", index=1),
        "cross_attentions": OutputRecorder(RelPosBertSelfAttention, layer_name=".crossattention.self", index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, BertLMPredictionHead):
            init.zeros_(module.bias)


class RelPosBertModel(RelPosBertPreTrainedModel):
    """The bare encoder: `last_hidden_state` `[batch, len, hidden]` and BERT's `pooler_output`."""

    def __init__(self, config: RelPosBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = RelPosBertEmbeddings(config)
        self.encoder = RelPosBertEncoder(config)
        self.position_encoding.bind_projections(
            [(layer.attention.self.query, layer.attention.self.key) for layer in self.encoder.layer]
        )
        self.pooler = RelPosBertPooler(config) if add_pooling_layer else None
        self.post_init()

    @property
    def position_encoding(self) -> PositionEncoding:
        return self.embeddings.position_embeddings

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        """`attention_mask` `[batch, past + len]` (1 = token, 0 = padding); positions count real tokens only, so
        padding on either side leaves every real token's output unchanged. As a decoder (`config.is_decoder`):
        causal attention, cross-attention over `encoder_hidden_states` `[batch, src_len, hidden]` (padding in
        `encoder_attention_mask` `[batch, src_len]`), and the KV cache as `cache` or `past_key_values`."""
        cache = cache_argument(cache, kwargs)
        check_inputs(input_ids, inputs_embeds, position_ids, self.config.hidden_size)
        if inputs_embeds is None:
            inputs_embeds = self.embeddings.word_embeddings(input_ids)
        use_cache = bool(use_cache) and self.config.is_decoder
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if use_cache and self.config.add_cross_attention and not isinstance(cache, EncoderDecoderCache):
            cache = EncoderDecoderCache(cache, DynamicCache(config=self.config))
        query_positions, key_positions = cached_positions(attention_mask, position_ids, inputs_embeds, cache)
        hidden_states = self.embeddings(inputs_embeds, token_type_ids, query_positions)
        if self.config.is_decoder:
            # The cache is passed by position: its keyword is `past_key_values` before 5.24 and `cache` from it on.
            mask = create_causal_mask(self.config, hidden_states, attention_mask, cache, position_ids=query_positions)
        else:
            mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
            )
        if encoder_hidden_states is not None:
            encoder_attention_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
            )
        state = position_state(
            self.config, self.position_encoding, query_positions, key_positions, hidden_states.dtype,
            self.checkpointing_layers(), mask, consecutive_offset(attention_mask, position_ids, cache),
        )
        hidden_states = self.encoder(
            hidden_states, mask, self.position_encoding, state, cache=cache,
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask, **kwargs,
        )
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=hidden_states, pooler_output=pooled, **{CACHE_FIELD: cache if use_cache else None}
        )


class RelPosBertForMaskedLM(RelPosBertPreTrainedModel):
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: RelPosBertConfig):
        super().__init__(config)
        self.bert = RelPosBertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> MaskedLMOutput:
        outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
        logits = self.cls(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)


class RelPosBertForCausalLM(RelPosBertPreTrainedModel, GenerationMixin):
    """BERT as a left-to-right decoder (`BertLMHeadModel`): BERT's `cls` head, causal self-attention, optional
    cross-attention (`add_cross_attention=True`, newly initialised when loading a BERT checkpoint) and `generate`.
    Needs `config.is_decoder=True`; as the decoder of an `EncoderDecoderModel` it is warm-started from the same BERT
    checkpoint as the encoder (Rothe et al. 2020)."""

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: RelPosBertConfig):
        if not config.is_decoder:
            raise ValueError(
                "RelPosBertForCausalLM needs is_decoder=True (causal attention); e.g. "
                "RelPosBertForCausalLM.from_pretrained(path, is_decoder=True, add_cross_attention=True)."
            )
        super().__init__(config)
        self.bert = RelPosBertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithCrossAttentions:
        """`labels` `[batch, len]` are shifted inside the loss; the loss honours Trainer's `num_items_in_batch`."""
        outputs = self.bert(
            input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, cache=cache_argument(cache, kwargs),
            use_cache=use_cache if labels is None else False, return_dict=True, **kwargs,
        )
        logits = self.cls(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithCrossAttentions(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


class RelPosBertForSequenceClassification(RelPosBertPreTrainedModel):
    # The loss is a per-batch mean: Trainer must not rescale it by `num_items_in_batch`.
    accepts_loss_kwargs = False

    def __init__(self, config: RelPosBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = RelPosBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> SequenceClassifierOutput:
        outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)


class RelPosBertForTokenClassification(RelPosBertPreTrainedModel):
    accepts_loss_kwargs = False

    def __init__(self, config: RelPosBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = RelPosBertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> TokenClassifierOutput:
        outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = self.loss_function(logits, labels, self.config) if labels is not None else None
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


class RelPosBertForQuestionAnswering(RelPosBertPreTrainedModel):
    accepts_loss_kwargs = False

    def __init__(self, config: RelPosBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = RelPosBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> QuestionAnsweringModelOutput:
        outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class RelPosBertForMultipleChoice(RelPosBertPreTrainedModel):
    accepts_loss_kwargs = False

    def __init__(self, config: RelPosBertConfig):
        super().__init__(config)
        self.bert = RelPosBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> MultipleChoiceModelOutput:
        """Inputs are `[batch, num_choices, len]`; logits `[batch, num_choices]`."""
        num_choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]

        def flat(x):
            return x.reshape(-1, *x.shape[2:]) if x is not None else None

        outputs = self.bert(flat(input_ids), attention_mask=flat(attention_mask),
                            token_type_ids=flat(token_type_ids), position_ids=flat(position_ids),
                            inputs_embeds=flat(inputs_embeds), return_dict=True, **kwargs)
        logits = self.classifier(self.dropout(outputs.pooler_output)).view(-1, num_choices)
        loss = CrossEntropyLoss()(logits, labels) if labels is not None else None
        return MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                         attentions=outputs.attentions)
