"""A Llama-family decoder (pre-norm RMSNorm, SwiGLU, grouped-query attention) whose position encoding is chosen by
`config.position_embedding_type`.

Module names are Llama's (`model.embed_tokens`, `model.layers[i].self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
`input_layernorm`, `post_attention_layernorm`, `model.norm`, `lm_head`), so Llama, SmolLM, Mistral and Qwen2
checkpoints load by name; the MLP and RMSNorm are transformers' own. Llama keeps no position table: the encoding sits
at `model.position_encoding`, and with `rope` (the default, from `rope_parameters`) the model is numerically Llama.
What runs before the layers (positions, mask, the encoding's state) is shared with the GPT-2 layout.
"""

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import CACHE_FIELD, RelPosPreTrainedModel, attention_forward, cache_argument, check_inputs
from .configuration_relpos import RelPosLlamaConfig
from .encodings import PositionEncoding, PositionState, build_position_encoding
from .modeling_relpos_decoder import decoder_inputs


class RelPosLlamaAttention(nn.Module):
    """Llama's `q/k/v/o_proj` around `attention_forward`; keys and values have `num_key_value_heads` heads (GQA)."""

    def __init__(self, config: RelPosLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        # Read by transformers' sdpa kernel, which serves grouped keys without repeating them.
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_encoding: PositionEncoding,
        position_state: PositionState,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states` `[batch, len, hidden]` -> `[batch, len, hidden]` and the weights (eager only)."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key, value = (proj(hidden_states).view(shape).transpose(1, 2)
                             for proj in (self.q_proj, self.k_proj, self.v_proj))
        output, weights = attention_forward(
            self, query, key, value, attention_mask, position_encoding, position_state, cache=cache,
            dropout=self.config.attention_dropout if self.training else 0.0, **kwargs,
        )
        return self.o_proj(output.reshape(*output.shape[:-2], -1)), weights


class RelPosLlamaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: RelPosLlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = RelPosLlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_encoding: PositionEncoding,
        position_state: PositionState,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask, position_encoding, position_state, cache, **kwargs
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class RelPosLlamaPreTrainedModel(RelPosPreTrainedModel):
    config: RelPosLlamaConfig
    config_class = RelPosLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["RelPosLlamaDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _can_record_outputs = {
        "hidden_states": RelPosLlamaDecoderLayer,
        "attentions": OutputRecorder(RelPosLlamaAttention, index=1),
    }


class RelPosLlamaModel(RelPosLlamaPreTrainedModel):
    """The bare decoder: `last_hidden_state` `[batch, len, hidden]` and the cache."""

    def __init__(self, config: RelPosLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.position_encoding = build_position_encoding(config, causal=True)
        self.layers = nn.ModuleList(RelPosLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.embed_tokens = new_embeddings

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        """`attention_mask` `[batch, past + len]` (1 = token, 0 = padding) sets the positions of real tokens, so a
        left-padded batch generates as each prompt alone. The KV cache comes as `cache` or `past_key_values`."""
        cache = cache_argument(cache, kwargs)
        check_inputs(input_ids, inputs_embeds, position_ids, self.config.hidden_size)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        inputs = decoder_inputs(
            self.config, self.position_encoding, inputs_embeds, attention_mask, position_ids, cache,
            self.checkpointing_layers(),
        )
        hidden_states = self.position_encoding.embed(inputs_embeds, inputs.query_positions)
        layer_cache = cache if not (self.gradient_checkpointing and self.training) else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, inputs.mask, self.position_encoding, inputs.state, layer_cache,
                                  **kwargs)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), **{CACHE_FIELD: cache if use_cache else None}
        )


class RelPosLlamaForCausalLM(RelPosLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RelPosLlamaConfig):
        super().__init__(config)
        self.model = RelPosLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """`labels` `[batch, len]` are shifted inside the loss; the loss honours Trainer's `num_items_in_batch`."""
        outputs = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache_argument(cache, kwargs),
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


class RelPosLlamaForSequenceClassification(GenericForSequenceClassification, RelPosLlamaPreTrainedModel):
    """transformers' generic classifier (`score` on the last non-padding token) over `RelPosLlamaModel`."""

    def __init__(self, config: RelPosLlamaConfig):
        # The generic head builds its body through `AutoModel`, which remote code without hf_relpos cannot resolve.
        RelPosLlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = RelPosLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()
