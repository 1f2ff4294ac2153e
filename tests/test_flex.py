"""The flex-attention kernel: the encodings' `score_mod` under a `BlockMask` agrees with the dense sdpa path.

Compiling flex attention on CPU takes seconds per shape, so the model-level checks are marked slow.
"""

import pytest
import torch
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_relpos import (
    POSITION_ENCODINGS,
    RelPosBertConfig,
    RelPosBertModel,
    RelPosGPTConfig,
    RelPosGPTForCausalLM,
)
from hf_relpos.attention import resolve_kernel


ENCODER_ENCODINGS = [name for name in POSITION_ENCODINGS if not POSITION_ENCODINGS[name].decoder_only]


def tiny_encoder(name: str) -> RelPosBertModel:
    torch.manual_seed(0)
    config = RelPosBertConfig(
        position_embedding_type=name, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, vocab_size=99, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return RelPosBertModel(config).eval()


def tiny_decoder(name: str) -> RelPosGPTForCausalLM:
    torch.manual_seed(0)
    config = RelPosGPTConfig(
        position_embedding_type=name, n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
    )
    return RelPosGPTForCausalLM(config).eval()


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 99, (2, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    return input_ids, attention_mask


@pytest.mark.slow
@pytest.mark.parametrize("name", ENCODER_ENCODINGS)
def test_encoder_flex_equals_sdpa_on_real_tokens(name):
    model = tiny_encoder(name)
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        dense = model(input_ids, attention_mask=attention_mask).last_hidden_state
        model.set_attn_implementation("flex_attention")
        flex = model(input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    torch.testing.assert_close(flex[real], dense[real], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(POSITION_ENCODINGS))
def test_decoder_flex_generation_equals_sdpa(name):
    model = tiny_decoder(name)
    input_ids, attention_mask = left_padded_batch()
    runs = {}
    with torch.no_grad():
        for kernel in ("sdpa", "flex_attention"):
            model.set_attn_implementation(kernel)
            runs[kernel] = model.generate(
                input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )
    assert torch.equal(runs["sdpa"].sequences, runs["flex_attention"].sequences)
    torch.testing.assert_close(
        torch.stack(runs["flex_attention"].logits), torch.stack(runs["sdpa"].logits), atol=1e-5, rtol=1e-5
    )


def test_flex_training_on_cpu_raises_a_clear_error():
    model = tiny_encoder("alibi")
    model.set_attn_implementation("flex_attention")
    input_ids, attention_mask = left_padded_batch()
    with pytest.raises(ValueError, match="no backward pass on CPU"):
        model(input_ids, attention_mask=attention_mask)


def test_flex_with_attention_dropout_raises_a_clear_error():
    model = tiny_encoder("t5")
    model.config.attention_probs_dropout_prob = 0.1
    for layer in model.encoder.layer:
        layer.attention.self.dropout_prob = 0.1
    model.train()
    model.set_attn_implementation("flex_attention")
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad(), pytest.raises(ValueError, match="no attention dropout"):
        model(input_ids, attention_mask=attention_mask)


def test_a_kernel_without_bias_support_falls_back_to_sdpa_with_a_warning_naming_both():
    logger = logging.get_logger("hf_relpos.attention")
    with CaptureLogger(logger) as captured:
        assert resolve_kernel("flash_attention_3", POSITION_ENCODINGS["kerple"]) == "sdpa"
    assert "flash_attention_3" in captured.out and "kerple" in captured.out and "sdpa" in captured.out


def test_kernels_that_serve_an_encoding_are_kept():
    assert resolve_kernel("flash_attention_2", POSITION_ENCODINGS["rope"]) == "flash_attention_2"
    assert resolve_kernel("flex_attention", POSITION_ENCODINGS["deberta"]) == "flex_attention"
    assert resolve_kernel("sdpa", POSITION_ENCODINGS["t5"]) == "sdpa"
