"""Configurations of the relpos encoder (BERT field names), decoders (GPT-2 and Llama field names) and encoder-decoder.

All share the position fields of `RelPosConfigMixin`, validated when the config is built, so that a bad value
fails with a `ValueError` naming the field before any model exists.
"""

import re
from typing import ClassVar

import transformers
from transformers import EncoderDecoderConfig, PreTrainedConfig
from transformers.utils import logging

from .encodings import get_encoding_class


logger = logging.get_logger(__name__)

# The one place that states this code's version and the transformers releases it is tested with (`make test` runs
# the newest, `make test-oldest` the oldest; setup.cfg states the same), carried by saved folders as remote code.
HF_RELPOS_VERSION = "0.1.0"
TESTED_TRANSFORMERS = ("5.21.0", "6")


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: `"5.24.0.dev0"` -> `(5, 24, 0)`."""
    return tuple(int(number) for number in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def warn_if_transformers_untested() -> None:
    """Log once when the installed transformers is outside `TESTED_TRANSFORMERS` (remote code runs on whatever
    release its user has). Each saved folder's code is imported as modules of its own: one logger, whatever module
    name, keeps it to one warning per process."""
    oldest, below = TESTED_TRANSFORMERS
    if not release(oldest) <= release(transformers.__version__) < release(below):
        logging.get_logger("hf_relpos").warning_once(
            f"hf_relpos {HF_RELPOS_VERSION} was tested with transformers >={oldest},<{below}; transformers "
            f"{transformers.__version__} is installed, so this model may fail or give other outputs."
        )


warn_if_transformers_untested()


def _check_positive(config, *names: str, allow_zero: bool = False) -> None:
    """Raise `ValueError` naming the field unless each is an integer > 0 (>= 0 with `allow_zero`). An integral float
    (`32.0`, as some JSON writers round-trip integers) is converted to `int` in place."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
            setattr(config, name, value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} must be an integer {bound}, got {value!r} ({type(value).__name__}).")


def _check_rope_parameters(rope_parameters) -> None:
    if rope_parameters is not None and not isinstance(rope_parameters, dict):
        raise ValueError(
            "rope_parameters must be a dict such as {'rope_type': 'default', 'rope_theta': 10000.0} (or None), got "
            f"{rope_parameters!r}."
        )


class RelPosPretrainedConfig(PreTrainedConfig):
    r"""
    The position fields shared by the relpos encoder and decoder.

    Args:
        position_embedding_type (`str`, defaults to `"absolute"`):
            One of `hf_relpos.POSITION_ENCODINGS`: `absolute`, `sinusoidal`, `relative_key`, `relative_key_query`,
            `t5`, `alibi`, `kerple`, `fire`, `deberta`, `rope`, `xpos` (decoder only), `nope`.
        position_offset (`int`, defaults to 0):
            Added to positions before the `absolute` table lookup (RoBERTa: `padding_idx + 1`).
        max_relative_positions (`int`, defaults to 128):
            `relative_key(_query)`: distances are clipped to `[-k, k]`; `deberta`: the largest bucketed distance.
        position_buckets (`int`, defaults to 64):
            `deberta`: number of log buckets per direction (0 disables bucketing).
        pos_att_type (`str` or `list[str]`, defaults to `"c2p|p2c"`), share_att_key (`bool`, defaults to False),
        norm_rel_ebd (`str`, defaults to `"layer_norm"`):
            `deberta`, as `DebertaV2Config` names them: the disentangled terms (`c2p`, `p2c`); whether the layer's own
            query/key projections project the relative embeddings (DeBERTa-v3, encoder only); `layer_norm` or `none`
            on the relative embeddings (DeBERTa-v2's default is `none`).
        relative_attention_num_buckets (`int`, defaults to 32), relative_attention_max_distance (`int`, 128):
            `t5`: bucket count and the distance beyond which all distances share the last bucket.
        rope_parameters (`dict`, *optional*):
            `rope`/`xpos`: transformers' `rope_parameters` (`rope_type` in default, linear, dynamic, yarn,
            longrope, llama3; `rope_theta`; the type's own keys; `partial_rotary_factor`).
        xpos_scale_base (`int`, defaults to 512): `xpos`: the decay length scale `B`.
        fire_mlp_width (`int`, defaults to 32): `fire`: hidden width of the MLP `f`.
    """

    position_embedding_type: str = "absolute"
    position_offset: int = 0
    max_relative_positions: int = 128
    position_buckets: int = 64
    pos_att_type: str | list[str] = "c2p|p2c"
    share_att_key: bool = False
    norm_rel_ebd: str = "layer_norm"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    rope_parameters: dict | None = None
    xpos_scale_base: int = 512
    fire_mlp_width: int = 32

    # The Auto classes the family serves, written into every saved config.json as `auto_map`.
    family_auto_map: ClassVar[dict[str, str]] = {}

    def __post_init__(self, **kwargs):
        # transformers' own rope handling would fail on a non-dict with an AttributeError.
        _check_rope_parameters(self.rope_parameters)
        super().__post_init__(**kwargs)
        # A saved auto_map entry (a user's own head class) wins over the family's, except the family's own classes
        # as transformers prefixes them on a Hub load ("user/repo--modeling_relpos_bert.RelPosBertModel"): they
        # point to the code saved beside the config again.
        saved = {
            auto_class: reference for auto_class, reference in (getattr(self, "auto_map", None) or {}).items()
            if not isinstance(reference, str) or reference.split("--")[-1] != self.family_auto_map.get(auto_class)
        }
        self.auto_map = {**self.family_auto_map, **saved}
        self.validate_position_encoding()

    def to_dict(self) -> dict:
        # Like `transformers_version`: the version of the code that writes the config, whatever it was loaded from.
        return {**super().to_dict(), "hf_relpos_version": HF_RELPOS_VERSION}

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        saved = config_dict.get("position_embedding_type", "absolute")
        requested = kwargs.get("position_embedding_type", saved)
        if config_dict.get("model_type") == cls.model_type and requested != saved:
            # Parameter-free encodings leave no missing or unexpected key behind to report the switch.
            logger.warning(
                f"This checkpoint was trained with position_embedding_type={saved!r} and is loaded as {requested!r}: "
                "its outputs will differ until it is fine-tuned with the new encoding."
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def is_causal_model(self) -> bool:
        return bool(getattr(self, "is_decoder", False))

    def validate_position_encoding(self) -> None:
        """Raise `ValueError` naming the offending field; called at construction and again by the model."""
        encoding = get_encoding_class(self.position_embedding_type)
        _check_rope_parameters(self.rope_parameters)
        _check_positive(self, "hidden_size", "num_attention_heads", "vocab_size")
        _check_positive(self, "num_hidden_layers", allow_zero=True)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        _check_positive(
            self, "max_position_embeddings", "max_relative_positions", "relative_attention_num_buckets",
            "relative_attention_max_distance", "xpos_scale_base", "fire_mlp_width",
        )
        _check_positive(self, "position_offset", "position_buckets", allow_zero=True)
        if self.position_buckets == 1:
            raise ValueError("position_buckets must be 0 (no bucketing) or an integer >= 2, got 1.")
        exact = self.relative_attention_num_buckets // (2 if not self.is_causal_model else 1) // 2
        if exact < 1 or self.relative_attention_max_distance <= exact:
            raise ValueError(
                "relative_attention_num_buckets must leave at least one exact bucket per direction and "
                "relative_attention_max_distance must exceed the exact range, got "
                f"relative_attention_num_buckets={self.relative_attention_num_buckets}, "
                f"relative_attention_max_distance={self.relative_attention_max_distance}."
            )
        encoding.validate(self, self.is_causal_model)


class RelPosBertConfig(RelPosPretrainedConfig):
    r"""
    Configuration of a BERT-style encoder with a choice of position encoding. Field names are BERT's, so a BERT,
    RoBERTa or MiniLM `config.json` loads as is; the position fields are documented in `RelPosPretrainedConfig`.
    `is_decoder=True` makes it BERT's decoder (`RelPosBertForCausalLM`: causal attention and the causal form of the
    encoding), and `add_cross_attention=True` gives that decoder cross-attention, as in `BertLMHeadModel`.
    `pooler_hidden_act` (DeBERTa's name, default BERT's `tanh`) is the pooler's activation.

    Checkpoints of relative-position families (RoFormer, DeBERTa-v2/v3, BERT with v4's `relative_key(_query)`)
    need their weights mapped: `from_pretrained` refuses them and names `hf-relpos convert` / `load_converted`.

    ```python
    >>> from hf_relpos import RelPosBertConfig, RelPosBertModel
    >>> config = RelPosBertConfig(position_embedding_type="alibi", num_hidden_layers=2)
    >>> model = RelPosBertModel(config)
    ```"""

    model_type = "relpos_bert"
    # The KV cache (as a decoder) under its name before and from transformers 5.24: not a prediction.
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    family_auto_map: ClassVar[dict[str, str]] = {
        "AutoConfig": "configuration_relpos.RelPosBertConfig",
        "AutoModel": "modeling_relpos_bert.RelPosBertModel",
        "AutoModelForMaskedLM": "modeling_relpos_bert.RelPosBertForMaskedLM",
        "AutoModelForCausalLM": "modeling_relpos_bert.RelPosBertForCausalLM",
        "AutoModelForSequenceClassification": "modeling_relpos_bert.RelPosBertForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_relpos_bert.RelPosBertForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_relpos_bert.RelPosBertForQuestionAnswering",
        "AutoModelForMultipleChoice": "modeling_relpos_bert.RelPosBertForMultipleChoice",
    }

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    use_cache: bool = True
    classifier_dropout: float | int | None = None
    pooler_hidden_act: str = "tanh"
    is_decoder: bool = False
    add_cross_attention: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True

    # RoBERTa-family configs count positions from `pad_token_id + 1` in the same learned table.
    offset_model_types: ClassVar[tuple[str, ...]] = ("roberta", "xlm-roberta", "camembert")

    # Checkpoints whose position weights need mapping (RoFormer's channel pairs, DeBERTa's module names, v4's
    # flipped distance tables): a plain load would drop or misread them.
    mapped_model_types: ClassVar[tuple[str, ...]] = ("roformer", "deberta-v2")
    v4_relative_types: ClassVar[tuple[str, ...]] = ("relative_key", "relative_key_query")

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        model_type = config_dict.get("model_type")
        v4_relative = model_type == "bert" and config_dict.get("position_embedding_type") in cls.v4_relative_types
        if model_type in cls.mapped_model_types or v4_relative:
            kind = f" with position_embedding_type={config_dict['position_embedding_type']!r}" if v4_relative else ""
            raise ValueError(
                f"This is a {model_type!r} checkpoint{kind}, whose position weights must be mapped to load exactly; "
                "a plain from_pretrained would give wrong outputs. Convert it first: `hf-relpos convert SRC DST` "
                "(or hf_relpos.convert.load_converted(model_class, SRC))."
            )
        if model_type in cls.offset_model_types and "position_offset" not in config_dict:
            config_dict = {**config_dict, "position_offset": config_dict.get("pad_token_id", 1) + 1}
        return super().from_dict(config_dict, **kwargs)

    def validate_position_encoding(self) -> None:
        if self.add_cross_attention and not self.is_decoder:
            raise ValueError(
                "add_cross_attention=True needs is_decoder=True: cross-attention belongs to the decoder of an "
                "encoder-decoder model."
            )
        _check_positive(self, "intermediate_size")
        _check_positive(self, "type_vocab_size", allow_zero=True)
        super().validate_position_encoding()


class RelPosGPTConfig(RelPosPretrainedConfig):
    r"""
    Configuration of a GPT-2-style decoder with a choice of position encoding. Field names are GPT-2's, so a GPT-2
    `config.json` loads as is; the position fields are documented in `RelPosPretrainedConfig`.

    ```python
    >>> from hf_relpos import RelPosGPTConfig, RelPosGPTForCausalLM
    >>> config = RelPosGPTConfig(position_embedding_type="rope", n_layer=2)
    >>> model = RelPosGPTForCausalLM(config)
    ```"""

    model_type = "relpos_gpt"
    # The KV cache under its name before and from transformers 5.24: not a prediction.
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "layer_norm_eps": "layer_norm_epsilon",
    }
    family_auto_map: ClassVar[dict[str, str]] = {
        "AutoConfig": "configuration_relpos.RelPosGPTConfig",
        "AutoModel": "modeling_relpos_gpt.RelPosGPTModel",
        "AutoModelForCausalLM": "modeling_relpos_gpt.RelPosGPTForCausalLM",
        "AutoModelForSequenceClassification": "modeling_relpos_gpt.RelPosGPTForSequenceClassification",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float | int = 0.1
    embd_pdrop: float | int = 0.1
    attn_pdrop: float | int = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    is_decoder: bool = True
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True

    def validate_position_encoding(self) -> None:
        if not self.is_decoder:
            raise ValueError("RelPosGPTConfig is a causal decoder: is_decoder must be True; use RelPosBertConfig.")
        if self.n_inner is not None:
            _check_positive(self, "n_inner")
        super().validate_position_encoding()


class RelPosLlamaConfig(RelPosPretrainedConfig):
    r"""
    Configuration of a Llama-family decoder (pre-norm RMSNorm, SwiGLU, grouped-query attention) with a choice of
    position encoding. Field names are Llama's, so a Llama, SmolLM or Mistral `config.json` loads as is, and the
    default encoding is Llama's own: `rope` with `rope_parameters`. Qwen2 configs load with `attention_bias=True`
    (Qwen2 has no bias on `o_proj`: it loads as zero). Sliding-window attention is not supported. The position fields
    are documented in `RelPosPretrainedConfig`.

    ```python
    >>> from hf_relpos import RelPosLlamaConfig, RelPosLlamaForCausalLM
    >>> config = RelPosLlamaConfig(position_embedding_type="alibi", num_hidden_layers=2, num_key_value_heads=4)
    >>> model = RelPosLlamaForCausalLM(config)
    ```"""

    model_type = "relpos_llama"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # `deberta`'s LayerNorm reads `layer_norm_eps`.
    attribute_map = {"layer_norm_eps": "rms_norm_eps"}
    family_auto_map: ClassVar[dict[str, str]] = {
        "AutoConfig": "configuration_relpos.RelPosLlamaConfig",
        "AutoModel": "modeling_relpos_llama.RelPosLlamaModel",
        "AutoModelForCausalLM": "modeling_relpos_llama.RelPosLlamaForCausalLM",
        "AutoModelForSequenceClassification": "modeling_relpos_llama.RelPosLlamaForSequenceClassification",
    }

    position_embedding_type: str = "rope"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    mlp_bias: bool = False
    head_dim: int | None = None
    is_decoder: bool = True

    # Families that load into this layout, and the fields their modelling code implies.
    implied_fields: ClassVar[dict[str, dict]] = {"qwen2": {"attention_bias": True}}

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        config_dict = {**config_dict, **cls.implied_fields.get(config_dict.get("model_type"), {})}
        if "sliding_window" in kwargs:
            # Validated at construction: the override must be in place before it.
            config_dict["sliding_window"] = kwargs.pop("sliding_window")
        return super().from_dict(config_dict, **kwargs)

    def validate_position_encoding(self) -> None:
        if not self.is_decoder:
            raise ValueError("RelPosLlamaConfig is a causal decoder: is_decoder must be True; use RelPosBertConfig.")
        _check_positive(self, "num_key_value_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}): each key/value head serves a group of query heads."
            )
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            raise ValueError(
                f"head_dim must be hidden_size / num_attention_heads = {self.hidden_size // self.num_attention_heads}"
                f", got {self.head_dim}: the position encodings size their tables from hidden_size."
            )
        if getattr(self, "sliding_window", None) is not None:
            raise ValueError(
                f"sliding_window={self.sliding_window}: RelPosLlama attends over the whole sequence. Load with "
                "sliding_window=None (the same model for sequences up to the window)."
            )
        super().validate_position_encoding()


class RelPosEncoderDecoderConfig(EncoderDecoderConfig):
    r"""
    `EncoderDecoderConfig` whose halves are relpos configs (`RelPosBertConfig` encoder; `RelPosBertConfig` or
    `RelPosGPTConfig` decoder), resolved from each half's `model_type` without the Auto registry, so that a saved
    relpos encoder-decoder loads with `AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True)` where
    hf_relpos is not installed.
    """

    model_type = "relpos_encoder_decoder"
    family_auto_map: ClassVar[dict[str, str]] = {
        "AutoConfig": "configuration_relpos.RelPosEncoderDecoderConfig",
        "AutoModelForSeq2SeqLM": "modeling_relpos_encoder_decoder.RelPosEncoderDecoderModel",
    }

    def __post_init__(self, **kwargs):
        configs = {config.model_type: config for config in (RelPosBertConfig, RelPosGPTConfig)}
        for key in ("encoder", "decoder"):
            value = getattr(self, key)
            if isinstance(value, dict):
                model_type = value.get("model_type")
                if model_type not in configs:
                    raise ValueError(f"{key}.model_type must be one of {sorted(configs)}, got {model_type!r}.")
                setattr(self, key, configs[model_type](**{k: v for k, v in value.items() if k != "model_type"}))
        super().__post_init__(**kwargs)
        self.auto_map = dict(self.family_auto_map)
