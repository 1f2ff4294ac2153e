"""Bad configurations fail at construction with a ValueError that names the field; BERT configs load."""

import json

import pytest
import torch
from conftest import ENCODER_ENCODINGS, tiny_bert_config, tiny_gpt_config
from transformers import BertConfig

from hf_relpos import POSITION_ENCODINGS, RelPosBertConfig, RelPosBertModel


def test_unknown_position_embedding_type_names_field_and_allowed_values():
    with pytest.raises(ValueError) as error:
        tiny_bert_config(position_embedding_type="learned_sinusoid")
    message = str(error.value)
    assert "position_embedding_type" in message and "learned_sinusoid" in message
    for name in POSITION_ENCODINGS:
        assert name in message


@pytest.mark.parametrize(
    "field", ["relative_attention_num_buckets", "relative_attention_max_distance", "max_relative_positions"]
)
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_distance_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_bert_config(position_embedding_type="t5", **{field: value})


@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_max_position_embeddings_raises(value):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny_bert_config(max_position_embeddings=value)


def test_negative_position_buckets_raise():
    with pytest.raises(ValueError, match="position_buckets"):
        tiny_bert_config(position_embedding_type="deberta", position_buckets=-1)


def test_deberta_buckets_too_many_for_max_relative_positions_raise():
    with pytest.raises(ValueError, match="max_relative_positions"):
        tiny_bert_config(position_embedding_type="deberta", position_buckets=64, max_relative_positions=16)


def test_t5_buckets_without_an_exact_range_raise():
    with pytest.raises(ValueError, match="relative_attention_num_buckets"):
        tiny_bert_config(position_embedding_type="t5", relative_attention_num_buckets=2)


def test_odd_rotary_dimension_raises_for_rope():
    with pytest.raises(ValueError, match="hidden_size") as error:
        tiny_bert_config(position_embedding_type="rope", hidden_size=20, num_attention_heads=4)
    assert "position_embedding_type" in str(error.value) or "rope" in str(error.value)


def test_odd_rotary_dimension_from_partial_factor_raises():
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        tiny_bert_config(
            position_embedding_type="rope", hidden_size=24, num_attention_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        )


def test_odd_head_dimension_is_fine_without_rotary():
    config = tiny_bert_config(position_embedding_type="alibi", hidden_size=20, num_attention_heads=4)
    assert config.hidden_size // config.num_attention_heads == 5


def test_xpos_in_encoder_config_raises():
    with pytest.raises(ValueError, match="position_embedding_type") as error:
        tiny_bert_config(position_embedding_type="xpos")
    assert "xpos" in str(error.value)


def test_unknown_rope_type_raises_naming_rope_type():
    with pytest.raises(ValueError, match="rope_type"):
        tiny_bert_config(position_embedding_type="rope", rope_parameters={"rope_type": "spiral", "rope_theta": 1e4})


def test_hidden_size_not_multiple_of_heads_raises():
    with pytest.raises(ValueError, match="hidden_size"):
        tiny_bert_config(hidden_size=30, num_attention_heads=4)


@pytest.mark.parametrize("name", ENCODER_ENCODINGS)
def test_every_encoder_encoding_validates_with_defaults(name):
    assert tiny_bert_config(position_embedding_type=name).position_embedding_type == name


def test_bert_config_json_loads_into_relpos_config(tmp_path):
    bert = BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                      intermediate_size=64, max_position_embeddings=40)
    bert.save_pretrained(tmp_path)
    config = RelPosBertConfig.from_pretrained(tmp_path)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act", "pad_token_id"):
        assert getattr(config, field) == getattr(bert, field), field
    assert config.position_embedding_type == "absolute"


def test_default_bert_config_dict_loads_with_new_position_type():
    config = RelPosBertConfig(**{**BertConfig().to_dict(), "position_embedding_type": "alibi"})
    assert config.hidden_size == 768 and config.position_embedding_type == "alibi"


def test_config_round_trips_position_fields(tmp_path):
    config = tiny_bert_config(position_embedding_type="rope", rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 32})
    config.save_pretrained(tmp_path)
    loaded = RelPosBertConfig.from_pretrained(tmp_path)
    assert loaded.position_embedding_type == "rope"
    assert loaded.rope_parameters["rope_type"] == "yarn" and loaded.rope_parameters["factor"] == 2.0


@pytest.mark.parametrize("field", ["num_attention_heads", "hidden_size"])
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_sizes_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be an integer > 0, got {value}"):
        tiny_bert_config(**{field: value})


@pytest.mark.parametrize("field", ["n_head", "n_embd"])
def test_non_positive_gpt_sizes_raise_naming_the_field(field):
    name = {"n_head": "num_attention_heads", "n_embd": "hidden_size"}[field]
    with pytest.raises(ValueError, match=rf"{name} must be an integer > 0, got 0"):
        tiny_gpt_config(**{field: 0})


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "max_relative_positions", "vocab_size"])
def test_string_numbers_raise_naming_the_field_and_type(field):
    with pytest.raises(ValueError, match=rf"{field} must be an integer > 0, got '4' \(str\)"):
        tiny_bert_config(position_embedding_type="relative_key", **{field: "4"})


def test_a_list_as_the_encoding_name_lists_the_allowed_names():
    with pytest.raises(ValueError, match=r"position_embedding_type=\['alibi'\] is not supported; choose one of"):
        tiny_bert_config(position_embedding_type=["alibi"])


@pytest.mark.parametrize("value", ["default", ["default"]])
def test_rope_parameters_that_are_not_a_dict_raise(value):
    with pytest.raises(ValueError, match=r"rope_parameters must be a dict such as \{'rope_type': 'default'"):
        tiny_bert_config(position_embedding_type="rope", rope_parameters=value)


def test_rope_theta_given_as_a_string_raises_naming_it():
    with pytest.raises(ValueError, match=r"rope_parameters\['rope_theta'\] must be > 0, got '1e4'"):
        tiny_bert_config(position_embedding_type="rope", rope_parameters={"rope_type": "default", "rope_theta": "1e4"})


def test_deberta_position_buckets_of_one_raise():
    with pytest.raises(ValueError, match="position_buckets must be 0 .no bucketing. or an integer >= 2, got 1"):
        tiny_bert_config(position_embedding_type="deberta", position_buckets=1)


def test_integral_float_sizes_in_config_json_load_as_integers(tmp_path):
    """Some JSON writers round-trip integers as floats: `32.0` is read as 32, and the model runs."""
    tiny_bert_config(position_embedding_type="alibi").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(hidden_size=32.0, num_attention_heads=4.0, num_hidden_layers=2.0)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = RelPosBertConfig.from_pretrained(tmp_path)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (32, 4, 2)
    assert all(type(value) is int for value in (config.hidden_size, config.num_attention_heads))
    output = RelPosBertModel(config)(torch.tensor([[5, 6, 7]])).last_hidden_state
    assert output.shape == (1, 3, 32)


def test_fractional_float_sizes_raise():
    with pytest.raises(ValueError, match=r"hidden_size must be an integer > 0, got 32.5 \(float\)"):
        tiny_bert_config(hidden_size=32.5)


@pytest.mark.parametrize(
    ("name", "overrides", "field"),
    [
        ("relative_key", {"max_relative_positions": 10**9}, "max_relative_positions=1000000000"),
        ("absolute", {"max_position_embeddings": 10**9}, "max_position_embeddings=1000000000"),
        ("deberta", {"max_relative_positions": 10**9, "position_buckets": 0}, "max_relative_positions=1000000000"),
    ],
)
def test_position_tables_beyond_the_memory_bound_are_refused_with_their_size(name, overrides, field):
    """The encoding is sized on the meta device first: nothing is allocated, the error gives the size."""
    config = tiny_bert_config(position_embedding_type=name, **overrides)
    with pytest.raises(ValueError, match=rf"would take \d+\.\d GiB of position parameters, more than the 4 GiB "
                                         rf"allowed: reduce its table sizes \(.*{field}"):
        RelPosBertModel(config)
