"""generate() with the KV cache is right for every encoding: greedy, static cache, left padding, sampling, beams."""

import pytest
import torch
from conftest import tiny_gpt_config

from hf_relpos import POSITION_ENCODINGS, RelPosGPTForCausalLM


ENCODINGS = list(POSITION_ENCODINGS)
NEW_TOKENS = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_lm(position_embedding_type: str, **overrides) -> RelPosGPTForCausalLM:
    torch.manual_seed(0)
    return RelPosGPTForCausalLM(tiny_gpt_config(position_embedding_type, **overrides)).eval()


def prompts(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 99, (batch, length), generator=generator)


def greedy(model, ids, **kwargs):
    # min_new_tokens keeps a random model from stopping at eos, so every comparison covers all the steps.
    return model.generate(
        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kwargs
    )


@pytest.mark.parametrize("name", ENCODINGS)
def test_greedy_with_cache_gives_the_tokens_of_greedy_without_cache(name):
    model, ids = tiny_lm(name), prompts(1)
    assert torch.equal(greedy(model, ids, use_cache=True), greedy(model, ids, use_cache=False))


@pytest.mark.parametrize("name", ENCODINGS)
def test_cached_step_logits_equal_a_full_forward_of_the_final_sequence(name):
    model, ids = tiny_lm(name), prompts(2)
    out = greedy(model, ids, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, ids.shape[1] + NEW_TOKENS)
    steps = torch.stack(out.logits, dim=1)
    full = model(out.sequences).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ENCODINGS)
def test_static_cache_gives_the_tokens_of_the_dynamic_cache(name):
    model, ids = tiny_lm(name), prompts(2)
    dynamic = greedy(model, ids, output_logits=True, return_dict_in_generate=True)
    static = greedy(model, ids, cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ENCODINGS)
def test_static_cache_with_left_padding_gives_each_prompt_alone(name):
    model, ids = tiny_lm(name), prompts(2, 7)
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[1, :3], mask[1, :3] = 0, 0
    batch = greedy(model, padded, attention_mask=mask, cache_implementation="static")
    assert torch.equal(batch[0], greedy(model, ids[:1])[0])
    assert torch.equal(batch[1, 7:], greedy(model, ids[1:, 3:])[0, 4:])


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_left_padded_batch_generates_the_tokens_of_each_prompt_alone(name, implementation):
    model = tiny_lm(name)
    model.set_attn_implementation(implementation)
    full = prompts(3, 8)
    lengths = [8, 5, 2]
    padded, mask = full.clone(), torch.ones_like(full)
    for row, keep in enumerate(lengths):
        padded[row, : 8 - keep], mask[row, : 8 - keep] = 0, 0
    batch = greedy(model, padded, attention_mask=mask, output_logits=True, return_dict_in_generate=True)
    for row, keep in enumerate(lengths):
        alone = greedy(model, full[row : row + 1, 8 - keep :], output_logits=True, return_dict_in_generate=True)
        assert torch.equal(batch.sequences[row, 8:], alone.sequences[0, keep:]), f"prompt {row} of length {keep}"
        torch.testing.assert_close(
            torch.stack(batch.logits)[:, row], torch.stack(alone.logits)[:, 0], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("name", ENCODINGS)
def test_sampling_with_a_fixed_seed_is_reproducible_and_returns_vocabulary_tokens(name):
    model, ids = tiny_lm(name), prompts(2)

    def sample():
        torch.manual_seed(123)
        return model.generate(ids, do_sample=True, top_k=10, temperature=0.9, max_new_tokens=NEW_TOKENS)

    first, second = sample(), sample()
    assert torch.equal(first, second)
    assert torch.equal(first[:, : ids.shape[1]], ids)
    assert first.shape[1] <= ids.shape[1] + NEW_TOKENS
    assert int(first.min()) >= 0 and int(first.max()) < model.config.vocab_size


@pytest.mark.parametrize("name", ENCODINGS)
def test_beam_search_with_cache_equals_beam_search_without_cache(name):
    model, ids = tiny_lm(name), prompts(2)
    kwargs = dict(num_beams=3, num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
    cached = greedy(model, ids, use_cache=True, **kwargs)
    uncached = greedy(model, ids, use_cache=False, **kwargs)
    assert cached.sequences.shape == (4, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["rope", "alibi"])
def test_generation_past_n_positions_for_relative_encodings(name):
    """Relative encodings have no position table: the cache grows past `n_positions` and stays exact."""
    model = tiny_lm(name, n_positions=8)
    ids = prompts(1, 6)
    out = greedy(model, ids, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 12
    full = model(out.sequences).logits[:, 5:-1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=1e-5, rtol=0)
