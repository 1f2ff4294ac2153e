"""A GPT-2-style decoder whose position encoding is chosen by `config.position_embedding_type`.

Module names and the Conv1D weight layout are GPT-2's, so GPT-2 checkpoints load by name; the encoding sits where
GPT-2 keeps `wpe` (for `absolute` it *is* that table). Generation uses transformers' `GenerationMixin` and caches:
rotary keys are rotated before they are cached and every bias is measured between true token positions (cache
offset and left padding included).
"""

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.processing_utils import Unpack
from transformers.pytorch_utils import Conv1D
from transformers.utils import TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import (
    CACHE_FIELD,
    RelPosPreTrainedModel,
    attention_forward,
    cache_argument,
    check_inputs,
    cross_attention_keys_values,
    self_attention_cache,
)
from .configuration_relpos import RelPosGPTConfig
from .encodings import PositionEncoding, PositionState, build_position_encoding
from .modeling_relpos_decoder import decoder_inputs


logger = logging.get_logger(__name__)


class RelPosGPTAttention(nn.Module):
    """GPT-2's fused `c_attn` (self) or `q_attn` + `c_attn` (cross) projections around `attention_forward`.

    Cross-attention carries no position terms: it attends over the encoder's states as a set.
    """

    def __init__(self, config: RelPosGPTConfig, layer_idx: int, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.is_cross_attention = is_cross_attention
        self.is_causal = not is_cross_attention
        # A multiplier of the encoding's softmax scale, for GPT-2's two scaling switches.
        self.scale = 1.0 if config.scale_attn_weights else math.sqrt(self.head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)
        if is_cross_attention:
            self.c_attn = Conv1D(2 * self.embed_dim, self.embed_dim)
            self.q_attn = Conv1D(self.embed_dim, self.embed_dim)
        else:
            self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

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
        if self.is_cross_attention:
            query = self.split_heads(self.q_attn(hidden_states))
            key, value = cross_attention_keys_values(
                cache, self.layer_idx,
                lambda: tuple(self.split_heads(x) for x in self.c_attn(encoder_hidden_states).split(self.embed_dim, 2)),
            )
            layer_cache = None
        else:
            query, key, value = (self.split_heads(x) for x in self.c_attn(hidden_states).split(self.embed_dim, dim=2))
            layer_cache = self_attention_cache(cache)
        output, weights = attention_forward(
            self, query, key, value, attention_mask, position_encoding, position_state, cache=layer_cache,
            dropout=self.attn_dropout.p if self.training else 0.0, scale=self.scale, **kwargs,
        )
        output = self.resid_dropout(self.c_proj(output.reshape(*output.shape[:-2], -1)))
        return output, weights


class RelPosGPTBlock(GradientCheckpointingLayer):
    def __init__(self, config: RelPosGPTConfig, layer_idx: int):
        super().__init__()
        hidden_size = config.hidden_size
        self.ln_1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.attn = RelPosGPTAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        if config.add_cross_attention:
            self.crossattention = RelPosGPTAttention(config, layer_idx, is_cross_attention=True)
            self.ln_cross_attn = nn.LayerNorm(hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config.n_inner if config.n_inner is not None else 4 * hidden_size, config)

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
        attn_output, _ = self.attn(
            self.ln_1(hidden_states), attention_mask, position_encoding, position_state, cache, **kwargs
        )
        hidden_states = hidden_states + attn_output
        if encoder_hidden_states is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError(
                    "encoder_hidden_states were passed but the decoder has no cross-attention: build it with "
                    "add_cross_attention=True."
                )
            cross_output, _ = self.crossattention(
                self.ln_cross_attn(hidden_states), encoder_attention_mask, None, None, cache,
                encoder_hidden_states=encoder_hidden_states,
            )
            hidden_states = hidden_states + cross_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class RelPosGPTPreTrainedModel(RelPosPreTrainedModel):
    config: RelPosGPTConfig
    config_class = RelPosGPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["RelPosGPTBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _can_record_outputs = {
        "hidden_states": RelPosGPTBlock,
        "attentions": OutputRecorder(RelPosGPTAttention, layer_name=".attn", index=1),
        "cross_attentions": OutputRecorder(RelPosGPTAttention, layer_name=".crossattention", index=1),
    }
    # GPT-2 checkpoints of older transformers carry the causal mask as a buffer.
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias", r"crossattention\.bias", r"attn\.masked_bias"]
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Conv1D):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)
        if isinstance(module, (RelPosGPTAttention, GPT2MLP)):
            # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
            std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.c_proj.weight, mean=0.0, std=std)


class RelPosGPTModel(RelPosGPTPreTrainedModel):
    """The bare decoder: `last_hidden_state` `[batch, len, hidden]` and the cache."""

    def __init__(self, config: RelPosGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = build_position_encoding(config, causal=True)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(RelPosGPTBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """`attention_mask` `[batch, past + len]` (1 = token, 0 = padding) sets the positions of real tokens, so a
        left-padded batch generates as each prompt alone. The KV cache comes as `cache` or `past_key_values`."""
        cache = cache_argument(cache, kwargs)
        check_inputs(input_ids, inputs_embeds, position_ids, self.config.hidden_size)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if use_cache and self.config.add_cross_attention and not isinstance(cache, EncoderDecoderCache):
            cache = EncoderDecoderCache(cache, DynamicCache(config=self.config))
        inputs = decoder_inputs(
            self.config, self.wpe, inputs_embeds, attention_mask, position_ids, cache, self.checkpointing_layers()
        )
        hidden_states = self.wpe.embed(inputs_embeds, inputs.query_positions)
        if token_type_ids is not None:
            hidden_states = hidden_states + self.wte(token_type_ids)
        hidden_states = self.drop(hidden_states)
        if encoder_hidden_states is not None:
            encoder_attention_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
            )
        layer_cache = cache if not (self.gradient_checkpointing and self.training) else None
        for block in self.h:
            hidden_states = block(
                hidden_states, inputs.mask, self.wpe, inputs.state, layer_cache, encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, **kwargs,
            )
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=self.ln_f(hidden_states), **{CACHE_FIELD: cache if use_cache else None}
        )


class RelPosGPTForCausalLM(RelPosGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: RelPosGPTConfig):
        super().__init__(config)
        self.transformer = RelPosGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithCrossAttentions:
        """`labels` `[batch, len]` are shifted inside the loss; the loss honours Trainer's `num_items_in_batch`."""
        outputs = self.transformer(
            input_ids, cache=cache_argument(cache, kwargs), attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache, **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithCrossAttentions(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


class RelPosGPTForSequenceClassification(RelPosGPTPreTrainedModel):
    """GPT-2's classifier: `score` on the last non-padding token."""

    accepts_loss_kwargs = False

    def __init__(self, config: RelPosGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = RelPosGPTModel(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.transformer(
            input_ids, cache=cache_argument(cache, kwargs), attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
            use_cache=use_cache, **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size = logits.shape[0]
        if self.config.pad_token_id is None and batch_size != 1:
            raise ValueError("Batches of more than one sequence need config.pad_token_id to find each last token.")
        if self.config.pad_token_id is None or input_ids is None:
            last = torch.full((batch_size,), logits.shape[1] - 1, device=logits.device)
        else:
            # The rightmost real token: works for left and right padding alike.
            is_token = (input_ids != self.config.pad_token_id).to(logits.device, torch.long)
            last = (is_token * torch.arange(input_ids.shape[-1], device=logits.device)).argmax(-1)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last]
        loss = self.loss_function(labels, pooled_logits, self.config) if labels is not None else None
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled_logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
