"""Invalid input fails with a clear error that names the problem: never a silent fallback, never a crash deep
inside torch. Each row of docs/BAD_INPUT.md has a test here.

The second half holds the safety checks: the remote-code files import only the standard library, torch and
transformers (plus each other, relatively), and weights are written and read as safetensors only.
"""

import ast
import contextlib
import logging as pylogging
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from transformers.utils import logging

import hf_relpos
from hf_relpos import (
    POSITION_ENCODINGS,
    RelPosBertConfig,
    RelPosBertModel,
    RelPosGPTConfig,
    RelPosGPTForCausalLM,
)
from hf_relpos.attention import CACHE_FIELD


PACKAGE_DIR = Path(hf_relpos.__file__).parent


def bert_config(**overrides) -> RelPosBertConfig:
    fields = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    fields.update(overrides)
    return RelPosBertConfig(**fields)


def gpt_config(**overrides) -> RelPosGPTConfig:
    fields = dict(
        vocab_size=99, n_embd=32, n_layer=1, n_head=4, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, pad_token_id=0,
    )
    fields.update(overrides)
    return RelPosGPTConfig(**fields)


def bert(**overrides) -> RelPosBertModel:
    torch.manual_seed(0)
    return RelPosBertModel(bert_config(**overrides)).eval()


def gpt(**overrides) -> RelPosGPTForCausalLM:
    torch.manual_seed(0)
    return RelPosGPTForCausalLM(gpt_config(**overrides)).eval()


def ids(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(1, 99, (batch, length), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------------
# Unknown encoding and invalid encoding options: a ValueError naming the field, at config construction
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_config", [bert_config, gpt_config], ids=["encoder", "decoder"])
@pytest.mark.parametrize("value", ["learned_sinusoid", "ALiBi", None])
def test_unknown_encoding_lists_the_allowed_names(make_config, value):
    with pytest.raises(ValueError, match="is not supported; choose one of") as error:
        make_config(position_embedding_type=value)
    assert "position_embedding_type" in str(error.value) and repr(value) in str(error.value)
    assert all(name in str(error.value) for name in POSITION_ENCODINGS)


def test_unknown_encoding_set_after_the_config_is_refused_by_the_model():
    config = bert_config()
    config.position_embedding_type = "bogus"
    with pytest.raises(ValueError, match="position_embedding_type='bogus' is not supported"):
        RelPosBertModel(config)


def test_decoder_only_encoding_in_an_encoder():
    with pytest.raises(ValueError, match="causal by design and only available in decoders"):
        bert_config(position_embedding_type="xpos")


INVALID_OPTIONS = [
    # (position_embedding_type, overrides, field the message must name)
    ("relative_key", {"max_relative_positions": 0}, "max_relative_positions must be an integer > 0"),
    ("relative_key", {"max_relative_positions": 2.5}, "max_relative_positions must be an integer > 0"),
    ("t5", {"relative_attention_num_buckets": -1}, "relative_attention_num_buckets must be an integer > 0"),
    ("t5", {"relative_attention_max_distance": 0}, "relative_attention_max_distance must be an integer > 0"),
    ("t5", {"relative_attention_num_buckets": 2}, "relative_attention_num_buckets must leave at least one exact"),
    ("t5", {"relative_attention_num_buckets": 32, "relative_attention_max_distance": 4},
     "relative_attention_max_distance must exceed the exact range"),
    ("deberta", {"position_buckets": -1}, "position_buckets must be an integer >= 0"),
    ("deberta", {"position_buckets": 64, "max_relative_positions": 16},
     "max_relative_positions - 1 > position_buckets"),
    ("deberta", {"pos_att_type": ["c2p", "p2p"]}, "pos_att_type must name 'c2p', 'p2c' or both"),
    ("deberta", {"pos_att_type": []}, "pos_att_type must name 'c2p', 'p2c' or both"),
    ("deberta", {"norm_rel_ebd": "batch_norm"}, "norm_rel_ebd must be 'layer_norm' or 'none'"),
    ("deberta", {"norm_rel_ebd": 1}, "norm_rel_ebd a string"),
    ("deberta", {"share_att_key": "yes"}, "share_att_key must be True or False"),
    ("fire", {"fire_mlp_width": 0}, "fire_mlp_width must be an integer > 0"),
    ("absolute", {"position_offset": -1}, "position_offset must be an integer >= 0"),
    ("absolute", {"max_position_embeddings": 0}, "max_position_embeddings must be an integer > 0"),
    ("alibi", {"hidden_size": 30}, "hidden_size .30. must be a multiple of num_attention_heads"),
    ("rope", {"hidden_size": 20}, "rotary dimension"),
    ("rope", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.0}},
     "partial_rotary_factor must be in"),
    ("rope", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5}},
     "partial_rotary_factor must be in"),
    ("rope", {"rope_parameters": {"rope_type": "spiral", "rope_theta": 1e4}}, "rope_type.*'spiral' is not one of"),
]


@pytest.mark.parametrize(("name", "overrides", "message"), INVALID_OPTIONS)
def test_invalid_encoding_option_names_the_field(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        bert_config(position_embedding_type=name, **overrides)


def test_deberta_share_att_key_is_refused_by_decoders():
    with pytest.raises(ValueError, match="share_att_key=True .* only the encoder"):
        gpt_config(position_embedding_type="deberta", share_att_key=True)


def test_xpos_scale_base_must_be_positive():
    with pytest.raises(ValueError, match="xpos_scale_base must be an integer > 0"):
        gpt_config(position_embedding_type="xpos", xpos_scale_base=0)


def test_rope_type_without_its_required_key():
    with pytest.raises(ValueError, match="factor"):
        bert_config(position_embedding_type="rope", rope_parameters={"rope_type": "linear", "rope_theta": 1e4})


def test_rope_theta_must_be_positive():
    with pytest.raises(ValueError, match="rope_theta"):
        bert_config(position_embedding_type="rope", rope_parameters={"rope_type": "default", "rope_theta": -5.0})


def test_rope_scaling_factor_must_be_positive():
    with pytest.raises(ValueError, match="factor"):
        bert_config(position_embedding_type="rope",
                    rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": -1.0})


# ----------------------------------------------------------------------------------------------------------------
# Wrong attention_mask shapes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 5), (2, 12), (3, 8)], ids=["short", "long", "batch"])
def test_encoder_mask_of_the_wrong_2d_shape(shape):
    with pytest.raises(ValueError, match=r"attention_mask has shape .*expected \[batch, len\] = \(2, 8\)"):
        bert()(ids(), attention_mask=torch.ones(shape, dtype=torch.long))


def padding_mask(shape) -> torch.Tensor:
    mask = torch.ones(shape, dtype=torch.long)
    mask[..., -3:] = 0
    return mask


@pytest.mark.parametrize("shape", [(8,), (2, 8, 8), (2, 1, 5, 5)], ids=["1d", "3d", "4d"])
@pytest.mark.parametrize("model", [bert, gpt], ids=["encoder", "decoder"])
def test_mask_of_the_wrong_rank_names_attention_mask(model, shape):
    mask = padding_mask(shape)
    mask = mask.bool() if mask.dim() == 4 else mask  # a 4D mask is the kernels' boolean form
    with pytest.raises(ValueError, match="attention_mask"):
        model()(ids(), attention_mask=mask)


def test_decoder_mask_shorter_than_the_sequence():
    with pytest.raises(ValueError, match=r"attention_mask covers 5 tokens but the cache holds 0 and the input adds 8"):
        gpt()(ids(), attention_mask=torch.ones(2, 5, dtype=torch.long))


def test_decoder_mask_shorter_than_cache_plus_input():
    model = gpt()
    with torch.no_grad():
        cache = getattr(model(ids(), use_cache=True), CACHE_FIELD)
        with pytest.raises(ValueError, match="the cache holds 8 and the input adds 1"):
            model(ids(2, 1), cache=cache, attention_mask=torch.ones(2, 8, dtype=torch.long))


def test_decoder_mask_longer_than_the_sequence():
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[:, :4] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        gpt()(ids(), attention_mask=mask)


def test_decoder_mask_of_another_batch_size():
    with pytest.raises(ValueError, match="attention_mask"):
        gpt()(ids(), attention_mask=torch.ones(3, 8, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# Input shapes, checked on entry to forward (encoder and decoder share one check)
# ----------------------------------------------------------------------------------------------------------------

MODELS = pytest.mark.parametrize("model", [bert, gpt], ids=["encoder", "decoder"])


@MODELS
@pytest.mark.parametrize("shape", [(0, 8), (2, 0)], ids=["empty_batch", "zero_length"])
def test_empty_input_names_the_problem(model, shape):
    with pytest.raises(ValueError, match=rf"input_ids is empty \(batch {shape[0]}, length {shape[1]}\); expected at "
                                         "least one token"):
        model()(torch.zeros(shape, dtype=torch.long))


@MODELS
def test_one_dimensional_input_ids_name_the_expected_shape(model):
    with pytest.raises(ValueError, match=r"input_ids has shape \(8,\); expected \[batch, len\]"):
        model()(ids(1, 8)[0])


@MODELS
@pytest.mark.parametrize("shape", [(2, 5), (3, 8), (8,), (2, 8, 1)])
def test_position_ids_of_the_wrong_shape_name_the_expected_shape(model, shape):
    position_ids = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"position_ids has shape {re.escape(str(shape))}; expected \[batch, len\] = "
                                         r"\(2, 8\) or \[1, len\] = \(1, 8\)"):
        model()(ids(), position_ids=position_ids)


@MODELS
@pytest.mark.parametrize("shape", [(2, 8, 16), (2, 8)])
def test_inputs_embeds_of_the_wrong_shape_name_the_hidden_size(model, shape):
    with pytest.raises(ValueError, match=r"inputs_embeds has shape .*; expected \[batch, len, hidden_size\] with "
                                         "hidden_size = 32"):
        model()(inputs_embeds=torch.zeros(shape))


# ----------------------------------------------------------------------------------------------------------------
# Input beyond the absolute table
# ----------------------------------------------------------------------------------------------------------------

BEYOND = "is beyond the learned table of position_embedding_type='absolute' .max_position_embeddings=16"


def test_encoder_input_longer_than_the_absolute_table():
    with pytest.raises(ValueError, match="Position 19 " + BEYOND):
        bert()(ids(1, 20))


def test_encoder_position_ids_beyond_the_absolute_table():
    with pytest.raises(ValueError, match="Position 107 " + BEYOND):
        bert()(ids(), position_ids=torch.arange(100, 108)[None])


def test_roberta_offset_counts_against_the_table():
    with pytest.raises(ValueError, match=r"Position 14 .*position_offset=2"):
        bert(position_offset=2)(ids(1, 15))


def test_decoder_input_longer_than_the_absolute_table():
    with pytest.raises(ValueError, match="Position 19 " + BEYOND):
        gpt()(ids(1, 20))


def test_generation_past_the_absolute_table():
    with pytest.raises(ValueError, match="Position 16 " + BEYOND):
        gpt().generate(ids(1, 10), max_new_tokens=10, min_new_tokens=10, do_sample=False)


@pytest.mark.parametrize("name", ["alibi", "rope", "t5"])
def test_relative_encodings_have_no_table_to_run_past(name):
    with torch.no_grad():
        assert torch.isfinite(bert(position_embedding_type=name)(ids(1, 40)).last_hidden_state).all()


def test_negative_position_ids_with_the_absolute_table():
    with pytest.raises(ValueError, match="position"):
        bert()(ids(), position_ids=torch.arange(-8, 0)[None])


# ----------------------------------------------------------------------------------------------------------------
# A checkpoint of one encoding loaded into a config of another
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved encoders, by encoding name."""
    folders = {}
    for name, overrides in {"alibi": {}, "t5": {"relative_attention_num_buckets": 16}}.items():
        folders[name] = tmp_path_factory.mktemp(name)
        bert(position_embedding_type=name, **overrides).save_pretrained(folders[name])
    return folders


def test_new_encoding_parameters_are_reported_missing(saved):
    model, info = RelPosBertModel.from_pretrained(saved["alibi"], position_embedding_type="t5",
                                                  output_loading_info=True)
    assert model.config.position_embedding_type == "t5"
    assert info["missing_keys"] == {"embeddings.position_embeddings.relative_attention_bias"}
    assert torch.isfinite(model.embeddings.position_embeddings.relative_attention_bias).all()


def test_dropped_encoding_parameters_are_reported_unexpected(saved):
    _, info = RelPosBertModel.from_pretrained(saved["t5"], position_embedding_type="alibi", output_loading_info=True)
    assert info["unexpected_keys"] == {"embeddings.position_embeddings.relative_attention_bias"}
    assert not info["missing_keys"]


def test_encoding_table_of_another_size_is_refused(saved):
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        RelPosBertModel.from_pretrained(saved["t5"], relative_attention_num_buckets=32)


@contextlib.contextmanager
def capture_everything():
    """Text of every warning and log record (Python root, transformers and hf_relpos loggers) in the block."""
    records: list[str] = []

    class Collect(pylogging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=pylogging.DEBUG)
    loggers = [pylogging.getLogger(), logging.get_logger("transformers"), pylogging.getLogger("hf_relpos")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(pylogging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(str(w.message) for w in caught)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def test_switching_parameter_free_encodings_on_load_is_reported(saved):
    with capture_everything() as messages:
        RelPosBertModel.from_pretrained(saved["alibi"], position_embedding_type="rope")
    assert any("alibi" in m and "rope" in m for m in messages), messages


# ----------------------------------------------------------------------------------------------------------------
# Corrupted or missing weights
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_copy(tmp_path):
    bert(position_embedding_type="alibi").save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["truncated", "empty"])
def test_corrupted_weights_file(saved_copy, keep):
    weights = saved_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SafetensorError, match="Error while deserializing header"):
        RelPosBertModel.from_pretrained(saved_copy)


def test_missing_weights_file(saved_copy):
    (saved_copy / "model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named model.safetensors") as error:
        RelPosBertModel.from_pretrained(saved_copy)
    assert str(saved_copy) in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# Safety: safetensors only, and the remote-code files import nothing but stdlib, torch and transformers
# ----------------------------------------------------------------------------------------------------------------

REMOTE_ENTRY_FILES = sorted(PACKAGE_DIR.glob("modeling_*.py")) + sorted(PACKAGE_DIR.glob("configuration_*.py"))
ALLOWED_TOP_LEVEL = {"torch", "transformers"}


def remote_code_files() -> dict[str, list[ast.stmt]]:
    """Every file reachable by relative imports from the modelling and configuration files: name -> imports."""
    graph, pending = {}, [path.stem for path in REMOTE_ENTRY_FILES]
    while pending:
        stem = pending.pop()
        if stem in graph:
            continue
        tree = ast.parse((PACKAGE_DIR / f"{stem}.py").read_text())
        graph[stem] = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
        pending += [node.module for node in graph[stem] if isinstance(node, ast.ImportFrom) and node.level]
    return graph


def test_remote_code_graph_is_the_expected_files():
    assert {"modeling_relpos_bert", "modeling_relpos_gpt", "configuration_relpos"} <= set(remote_code_files())
    assert {"attention", "encodings", "kernels"} <= set(remote_code_files())
    assert not {"cli", "convert", "hub", "extrapolation", "__init__"} & set(remote_code_files())


def test_remote_code_imports_only_stdlib_torch_transformers_and_siblings():
    problems = []
    for stem, imports in remote_code_files().items():
        for node in imports:
            where = f"{stem}.py:{node.lineno}"
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1 or not node.module or "." in node.module:
                    problems.append(f"{where}: relative import must be `from .module import name`")
                elif not (PACKAGE_DIR / f"{node.module}.py").is_file():
                    problems.append(f"{where}: .{node.module} is not a file beside it")
                continue
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            for module in modules:
                top = module.split(".")[0]
                if top not in ALLOWED_TOP_LEVEL and top not in sys.stdlib_module_names:
                    problems.append(f"{where}: imports {module}")
    assert not problems, problems


def test_save_writes_safetensors_and_no_pickle(tmp_path):
    gpt(position_embedding_type="t5").save_pretrained(tmp_path)
    names = set(os.listdir(tmp_path))
    assert "model.safetensors" in names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}, names


def test_use_safetensors_loads_and_refuses_a_pickle_only_folder(saved_copy):
    reference = bert(position_embedding_type="alibi")
    loaded = RelPosBertModel.from_pretrained(saved_copy, use_safetensors=True)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0)
    torch.save(reference.state_dict(), saved_copy / "pytorch_model.bin")
    (saved_copy / "model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named model.safetensors"):
        RelPosBertModel.from_pretrained(saved_copy, use_safetensors=True)
