"""Positions given both ways: `position_ids` and a 2D `attention_mask` agree on keys and queries, and a mask is
binarised as transformers' BertModel does (any non-zero entry is a token)."""

import pytest
import torch
from conftest import tiny_bert_config, tiny_gpt_config

from hf_relpos import POSITION_ENCODINGS, RelPosBertModel, RelPosGPTForCausalLM
from hf_relpos.attention import CACHE_FIELD, token_positions


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Encodings that depend on distances only (FIRE normalises by the query position; absolute schemes and NoPE do not
# measure distances), so shifting every position by a constant leaves their outputs unchanged.
SHIFT_INVARIANT = [name for name in POSITION_ENCODINGS if name not in ("absolute", "sinusoidal", "nope", "fire")]
ENCODER_SHIFT_INVARIANT = [name for name in SHIFT_INVARIANT if not POSITION_ENCODINGS[name].decoder_only]


def ids(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(1))


def bert(name: str) -> RelPosBertModel:
    torch.manual_seed(0)
    return RelPosBertModel(tiny_bert_config(position_embedding_type=name)).eval()


def gpt(name: str) -> RelPosGPTForCausalLM:
    torch.manual_seed(0)
    return RelPosGPTForCausalLM(tiny_gpt_config(name, n_positions=256)).eval()


@pytest.mark.parametrize("name", ENCODER_SHIFT_INVARIANT)
def test_encoder_keys_follow_position_ids_given_with_a_mask(name):
    model, tokens = bert(name), ids()
    reference = model(tokens).last_hidden_state
    shifted = model(tokens, attention_mask=torch.ones_like(tokens),
                    position_ids=torch.arange(100, 108)[None]).last_hidden_state
    torch.testing.assert_close(shifted, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SHIFT_INVARIANT)
def test_decoder_keys_follow_position_ids_given_with_a_mask(name):
    model, tokens = gpt(name), ids()
    reference = model(tokens).logits
    shifted = model(tokens, attention_mask=torch.ones_like(tokens),
                    position_ids=torch.arange(100, 108)[None]).logits
    torch.testing.assert_close(shifted, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["alibi", "rope", "t5", "relative_key"])
def test_cached_keys_are_counted_back_from_position_ids(name):
    """Prefill at positions 100..104, then one cached step at 105: the logits of a shift-invariant encoding equal a
    full forward at positions 0..5."""
    model, tokens = gpt(name), ids(2, 6)
    reference = model(tokens).logits[:, -1]
    mask = torch.ones_like(tokens)
    prefill = model(tokens[:, :5], attention_mask=mask[:, :5], position_ids=torch.arange(100, 105)[None],
                    use_cache=True)
    step = model(tokens[:, 5:], attention_mask=mask, position_ids=torch.tensor([[105]]),
                 **{CACHE_FIELD: getattr(prefill, CACHE_FIELD)}).logits[:, -1]
    torch.testing.assert_close(step, reference, atol=1e-5, rtol=1e-5)


def test_token_positions_rule_for_cached_keys_under_left_padding():
    """Row 0 has two pads on the left; the query at position 3 (its fourth real token) sees the cached real tokens
    at 0, 1, 2 and the pads, masked anyway, at the clamped count."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    query, keys = token_positions(mask, torch.tensor([[3], [5]]), 2, 1, 5, 6, torch.device("cpu"))
    assert query.tolist() == [[3], [5]]
    assert keys[0, 2:].tolist() == [0, 1, 2, 3]
    assert keys[1].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("name", ["absolute", "alibi", "rope"])
@pytest.mark.parametrize("values", [(2, 0), (0.5, 0), (-1, 0)], ids=["two", "half", "minus_one"])
def test_encoder_mask_is_binarised_like_bert(name, values):
    """Any non-zero entry is a token, as in transformers' BertModel; positions count the binarised mask."""
    model, tokens = bert(name), ids()
    binary = torch.ones_like(tokens)
    binary[1, 5:] = 0
    token, pad = values
    odd = torch.where(binary.bool(), torch.tensor(float(token)), torch.tensor(float(pad)))
    reference = model(tokens, attention_mask=binary).last_hidden_state
    torch.testing.assert_close(model(tokens, attention_mask=odd).last_hidden_state, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["absolute", "alibi", "rope"])
def test_decoder_mask_is_binarised_like_bert(name):
    model, tokens = gpt(name), ids()
    binary = torch.ones_like(tokens)
    binary[1, :3] = 0
    odd = binary.float() * torch.tensor([2.0, 0.5, -1.0, 2.0, 0.5, -1.0, 2.0, 0.5])
    reference = model(tokens, attention_mask=binary).logits
    torch.testing.assert_close(model(tokens, attention_mask=odd).logits, reference, atol=1e-6, rtol=0)
