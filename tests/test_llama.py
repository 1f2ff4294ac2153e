"""The Llama-family decoder: numerically Llama with `rope`, every encoding under grouped-query attention, generation
with dynamic and static caches and left padding, the classifier, and config validation."""

import pytest
import torch
from conftest import tiny_llama_config
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_relpos import (
    POSITION_ENCODINGS,
    RelPosLlamaConfig,
    RelPosLlamaForCausalLM,
    RelPosLlamaForSequenceClassification,
)


ENCODINGS = list(POSITION_ENCODINGS)
NEW_TOKENS = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_lm(position_embedding_type: str, **overrides) -> RelPosLlamaForCausalLM:
    torch.manual_seed(0)
    model = RelPosLlamaForCausalLM(tiny_llama_config(position_embedding_type, **overrides)).eval()
    with torch.no_grad():
        # Off the init (unit norms, zero-init position terms), so that every parameter shows in the outputs.
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def prompts(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def llama_fields(**overrides) -> dict:
    fields = dict(
        vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    fields.update(overrides)
    return fields


def saved_reference(tmp_path, model_class, config):
    torch.manual_seed(0)
    reference = model_class(config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    reference.save_pretrained(tmp_path)
    return reference


def assert_same_model(reference, ours, implementation="eager"):
    reference.set_attn_implementation(implementation)
    ours.set_attn_implementation(implementation)
    ids = prompts(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=0)
    assert torch.equal(greedy(ours, ids[:1]), greedy(reference, ids[:1]))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("tied", [True, False])
def test_rope_model_loads_a_llama_checkpoint_and_is_numerically_llama(tmp_path, tied, implementation):
    reference = saved_reference(tmp_path, LlamaForCausalLM, LlamaConfig(**llama_fields(tie_word_embeddings=tied)))
    ours, info = RelPosLlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert ours.config.position_embedding_type == "rope" and ours.config.num_key_value_heads == 2
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert_same_model(reference, ours.eval(), implementation)


def test_llama_with_attention_bias_and_multi_head_attention_loads_exactly(tmp_path):
    config = LlamaConfig(**llama_fields(attention_bias=True, num_key_value_heads=4))
    reference = saved_reference(tmp_path, LlamaForCausalLM, config)
    ours, info = RelPosLlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert ours.model.layers[0].self_attn.o_proj.bias is not None
    assert_same_model(reference, ours.eval())


def test_qwen2_checkpoint_loads_with_biased_projections_and_is_numerically_qwen2(tmp_path):
    reference = saved_reference(tmp_path, Qwen2ForCausalLM, Qwen2Config(**llama_fields()))
    ours, info = RelPosLlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert ours.config.attention_bias
    # Qwen2's output projection has no bias: ours starts at zero, the one key reported missing.
    assert info["missing_keys"] == {f"model.layers.{i}.self_attn.o_proj.bias" for i in range(2)}
    assert not info["unexpected_keys"]
    assert_same_model(reference, ours.eval())


def test_mistral_checkpoint_without_sliding_window_is_numerically_mistral(tmp_path):
    reference = saved_reference(tmp_path, MistralForCausalLM, MistralConfig(**llama_fields(sliding_window=None)))
    ours, info = RelPosLlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert_same_model(reference, ours.eval())


def test_sliding_window_attention_is_refused_naming_the_field(tmp_path):
    saved_reference(tmp_path, MistralForCausalLM, MistralConfig(**llama_fields(sliding_window=16)))
    with pytest.raises(ValueError, match="sliding_window=16"):
        RelPosLlamaForCausalLM.from_pretrained(tmp_path)
    ours = RelPosLlamaForCausalLM.from_pretrained(tmp_path, sliding_window=None)
    assert ours.config.sliding_window is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer > 0"),
        ({"head_dim": 16}, "head_dim must be hidden_size / num_attention_heads"),
        ({"position_embedding_type": "learned"}, "position_embedding_type"),
    ],
)
def test_bad_config_is_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_llama_config(**fields)


def test_default_config_is_llama_with_rope_and_registered_with_the_auto_classes():
    config = RelPosLlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=8,
                               vocab_size=10)
    assert config.position_embedding_type == "rope"
    assert config.num_key_value_heads == 4
    assert config.rope_parameters["rope_type"] == "default"
    assert type(AutoModelForCausalLM.from_config(config)) is RelPosLlamaForCausalLM


@pytest.mark.parametrize("name", ENCODINGS)
def test_eager_and_sdpa_agree_under_grouped_query_attention(name):
    model, ids = tiny_lm(name), prompts(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = model(ids, attention_mask=mask).logits
    real = mask.bool()  # a padding query attends to nothing: its output is the kernel's own
    torch.testing.assert_close(outputs["sdpa"][real], outputs["eager"][real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ENCODINGS)
def test_cached_step_logits_equal_a_full_forward_of_the_final_sequence(name):
    model, ids = tiny_lm(name), prompts(2)
    out = greedy(model, ids, output_logits=True, return_dict_in_generate=True)
    full = model(out.sequences).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=1e-5, rtol=0)
    assert torch.equal(out.sequences, greedy(model, ids, use_cache=False))


@pytest.mark.parametrize("name", ENCODINGS)
def test_static_cache_gives_the_tokens_of_the_dynamic_cache(name):
    model, ids = tiny_lm(name), prompts(2)
    dynamic = greedy(model, ids, output_logits=True, return_dict_in_generate=True)
    static = greedy(model, ids, cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_left_padded_batch_generates_the_tokens_of_each_prompt_alone(name, implementation):
    model = tiny_lm(name)
    model.set_attn_implementation(implementation)
    full, lengths = prompts(3, 8), [8, 5, 2]
    padded, mask = full.clone(), torch.ones_like(full)
    for row, keep in enumerate(lengths):
        padded[row, : 8 - keep], mask[row, : 8 - keep] = 0, 0
    batch = greedy(model, padded, attention_mask=mask, output_logits=True, return_dict_in_generate=True)
    for row, keep in enumerate(lengths):
        alone = greedy(model, full[row : row + 1, 8 - keep :], output_logits=True, return_dict_in_generate=True)
        assert torch.equal(batch.sequences[row, 8:], alone.sequences[0, keep:]), f"prompt {row} of length {keep}"
        torch.testing.assert_close(torch.stack(batch.logits)[:, row], torch.stack(alone.logits)[:, 0],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["rope", "alibi", "relative_key_query", "deberta"])
def test_classifier_scores_the_last_real_token_of_a_left_padded_batch_as_each_sequence_alone(name):
    torch.manual_seed(0)
    model = RelPosLlamaForSequenceClassification(tiny_llama_config(name, num_labels=3)).eval()
    ids = prompts(2, 6)
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[1, :2], mask[1, :2] = 0, 0
    with torch.no_grad():
        batch = model(padded, attention_mask=mask).logits
        alone = model(ids[1:, 2:]).logits
    assert batch.shape == (2, 3)
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=0)


def test_causal_lm_loss_trains_every_encoding_parameter_under_gqa():
    model = tiny_lm("relative_key_query").train()
    ids = prompts(2, 9)
    model(ids, labels=ids).loss.backward()
    table = model.model.position_encoding.distance_embedding[0].weight
    assert table.grad is not None and table.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alibi", "relative_key_query"])
def test_flex_attention_serves_grouped_keys_like_eager(name):
    """Flex attention runs grouped keys with `enable_gqa` (compiled prefill, uncompiled decode steps)."""
    model, ids = tiny_lm(name), prompts(2, 16)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    outputs = {}
    for implementation in ("eager", "flex_attention"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        outputs[implementation] = (logits, greedy(model, ids, attention_mask=mask))
    real = mask.bool()
    torch.testing.assert_close(outputs["flex_attention"][0][real], outputs["eager"][0][real], atol=1e-5, rtol=0)
    assert torch.equal(outputs["flex_attention"][1], outputs["eager"][1])
