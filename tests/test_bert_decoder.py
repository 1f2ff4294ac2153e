"""RelPosBertForCausalLM: BERT as a decoder (`is_decoder`, `add_cross_attention`), as transformers' BertLMHeadModel."""

import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertConfig, BertLMHeadModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from hf_relpos import POSITION_ENCODINGS, RelPosBertConfig, RelPosBertForCausalLM, RelPosBertModel
from hf_relpos.attention import CACHE_FIELD


pytestmark = pytest.mark.usefixtures("one_torch_thread")

DECODER = dict(is_decoder=True, add_cross_attention=True, pad_token_id=0)


def decoder(position_embedding_type: str = "absolute", seed: int = 0) -> RelPosBertForCausalLM:
    torch.manual_seed(seed)
    model = RelPosBertForCausalLM(tiny_bert_config(position_embedding_type=position_embedding_type, **DECODER))
    with torch.no_grad():
        # Move learned position terms off their near-zero init so that a wrong position would show.
        for parameter in model.bert.position_encoding.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def encoder_states(batch: int = 2, length: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder outputs `[batch, src_len, 32]` and their mask, the second source padded after 3 tokens."""
    states = torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 3:] = 0
    return states, mask


def prompts(batch: int = 2, length: int = 4) -> torch.Tensor:
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(2))


def bert_lm_head_model() -> BertLMHeadModel:
    """transformers' own BERT decoder with the same tiny shape, random weights."""
    torch.manual_seed(0)
    fields = {key: value for key, value in tiny_bert_config().to_dict().items() if key in BertConfig().to_dict()}
    return BertLMHeadModel(BertConfig(**{**fields, **DECODER})).eval()


def generate(model, ids, states, mask, **kwargs) -> torch.Tensor:
    return model.generate(
        ids, encoder_hidden_states=states, encoder_attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
        do_sample=False, **kwargs,
    )


def test_absolute_decoder_loads_bert_lm_head_model_weights_by_name():
    reference = bert_lm_head_model()
    model = RelPosBertForCausalLM(tiny_bert_config(**DECODER))
    result = model.load_state_dict(reference.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys


def test_absolute_decoder_logits_equal_bert_lm_head_model_with_cross_attention():
    reference = bert_lm_head_model()
    model = RelPosBertForCausalLM(tiny_bert_config(**DECODER)).eval()
    model.load_state_dict(reference.state_dict())
    states, mask = encoder_states()
    ids = prompts(length=7)
    with torch.no_grad():
        expected = reference(ids, encoder_hidden_states=states, encoder_attention_mask=mask).logits
        actual = model(ids, encoder_hidden_states=states, encoder_attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_absolute_decoder_greedy_generation_equals_bert_lm_head_model():
    reference = bert_lm_head_model()
    model = RelPosBertForCausalLM(tiny_bert_config(**DECODER)).eval()
    model.load_state_dict(reference.state_dict())
    states, mask = encoder_states()
    ids = prompts()
    # BertLMHeadModel alone cannot build the cross-attention cache: both get one, under the release's name for it.
    def cross_cache() -> dict:
        return {CACHE_FIELD: EncoderDecoderCache(DynamicCache(), DynamicCache())}

    expected = generate(reference, ids, states, mask, **cross_cache())
    actual = generate(model, ids, states, mask, **cross_cache())
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("name", sorted(POSITION_ENCODINGS))
def test_decoder_is_causal_for_every_encoding(name):
    model = decoder(name)
    states, mask = encoder_states()
    ids = prompts(length=7)
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 99
    with torch.no_grad():
        logits = model(ids, encoder_hidden_states=states, encoder_attention_mask=mask).logits
        changed_logits = model(changed, encoder_hidden_states=states, encoder_attention_mask=mask).logits
    torch.testing.assert_close(logits[:, :4], changed_logits[:, :4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[:, 4:], changed_logits[:, 4:])


@pytest.mark.parametrize("name", sorted(POSITION_ENCODINGS))
def test_cached_and_uncached_greedy_generation_agree_for_every_encoding(name):
    model = decoder(name)
    states, mask = encoder_states()
    ids = prompts()
    kwargs = dict(output_logits=True, return_dict_in_generate=True)
    cached = generate(model, ids, states, mask, use_cache=True, **kwargs)
    uncached = generate(model, ids, states, mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(POSITION_ENCODINGS))
def test_left_padded_batch_generates_as_each_prompt_alone(name):
    model = decoder(name)
    states, source_mask = encoder_states()
    long_prompt, short_prompt = prompts(1, 5), prompts(1, 3)
    batch = torch.cat((long_prompt, torch.cat((torch.zeros(1, 2, dtype=torch.long), short_prompt), dim=1)))
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    together = model.generate(batch, attention_mask=mask, encoder_hidden_states=states,
                              encoder_attention_mask=source_mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for row, prompt in enumerate((long_prompt, short_prompt)):
        alone = generate(model, prompt, states[row : row + 1, : int(source_mask[row].sum())], None)
        assert torch.equal(together[row, -5:], alone[0, -6:-1]), (row, together, alone)


def test_cross_attention_uses_bert_module_names():
    names = {name for name, _ in decoder().named_parameters()}
    for suffix in ("crossattention.self.query.weight", "crossattention.self.key.weight",
                   "crossattention.self.value.weight", "crossattention.output.dense.weight",
                   "crossattention.output.LayerNorm.weight"):
        assert f"bert.encoder.layer.0.{suffix}" in names


def test_causal_lm_needs_is_decoder():
    with pytest.raises(ValueError, match="is_decoder=True"):
        RelPosBertForCausalLM(tiny_bert_config())


def test_cross_attention_needs_is_decoder():
    with pytest.raises(ValueError, match="add_cross_attention=True needs is_decoder=True"):
        RelPosBertConfig(add_cross_attention=True)


def test_xpos_is_allowed_only_in_the_decoder():
    with pytest.raises(ValueError, match="position_embedding_type='xpos'"):
        tiny_bert_config(position_embedding_type="xpos")
    assert tiny_bert_config(position_embedding_type="xpos", is_decoder=True).is_decoder


@pytest.mark.parametrize("name", ["t5", "alibi", "fire", "kerple"])
def test_decoder_builds_the_causal_form_of_the_encoding_and_the_encoder_the_bidirectional(name):
    assert decoder(name).bert.position_encoding.causal
    assert not RelPosBertModel(tiny_bert_config(position_embedding_type=name)).position_encoding.causal
