"""Half precision: fp16 and bf16 forward and backward stay finite for every encoding (fully masked rows included),
and the position terms that need fp32 (long ALiBi/KERPLE distances, large rope bases, xPos scales) keep bf16
outputs close to fp32 ones.

CPU runs fp16 and bf16 matmuls, softmax and sdpa in torch 2.13, so nothing here is skipped.
"""

import pytest
import torch

from hf_relpos import POSITION_ENCODINGS, RelPosBertConfig, RelPosBertModel, RelPosGPTConfig, RelPosGPTForCausalLM


ENCODER_ENCODINGS = [name for name, cls in POSITION_ENCODINGS.items() if not cls.decoder_only]
DECODER_ENCODINGS = list(POSITION_ENCODINGS)
def bert(name: str, **overrides) -> RelPosBertModel:
    fields = dict(
        position_embedding_type=name, vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    return RelPosBertModel(RelPosBertConfig(**fields))


def gpt(name: str, **overrides) -> RelPosGPTForCausalLM:
    fields = dict(
        position_embedding_type=name, vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    return RelPosGPTForCausalLM(RelPosGPTConfig(**fields))


def batch(decoder: bool):
    """Three rows: full, padded (right for the encoder, left for the decoder) and fully masked."""
    ids = torch.randint(1, 99, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 10, dtype=torch.long)
    if decoder:
        mask[1, :4] = 0
    else:
        mask[1, 6:] = 0
    mask[2] = 0
    return ids, mask


def check_forward_backward(model, ids, mask, output):
    model.train()
    out = output(model(ids, attention_mask=mask))
    real = mask.bool()
    assert torch.isfinite(out[real]).all(), "non-finite output on real tokens"
    assert torch.isfinite(out).all(), "non-finite output on a padded/fully masked row"
    out.float().pow(2).mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ENCODER_ENCODINGS)
def test_encoder_half_precision_forward_backward(name, dtype):
    model = bert(name).to(dtype)
    model.set_attn_implementation("sdpa")
    check_forward_backward(model, *batch(decoder=False), lambda o: o.last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", DECODER_ENCODINGS)
def test_decoder_half_precision_forward_backward(name, dtype):
    model = gpt(name).to(dtype)
    model.set_attn_implementation("sdpa")
    check_forward_backward(model, *batch(decoder=True), lambda o: o.logits)


@pytest.mark.parametrize("name", ["alibi", "t5", "relative_key_query", "deberta", "rope"])
def test_eager_kernel_half_precision_with_a_fully_masked_row(name):
    model = bert(name, num_hidden_layers=1).to(torch.float16)
    model.set_attn_implementation("eager")
    check_forward_backward(model, *batch(decoder=False), lambda o: o.last_hidden_state)


# Positions far apart: distances ~4096 without a 4096-token sequence (position_ids set the positions).
FAR = torch.tensor([[0, 1, 2, 3, 2045, 2046, 4093, 4094, 4095, 4096]])


def assert_close_to_fp32(make, name, position_ids, output, atol=0.08, **overrides):
    """bf16 outputs within a loose tolerance of fp32 outputs of the same weights, at positions `position_ids`."""
    ids = torch.randint(1, 99, position_ids.shape, generator=torch.Generator().manual_seed(2))
    model = make(name, **overrides).eval()
    with torch.no_grad():
        if name == "kerple":  # large r1, r2 make the log bias steep at these distances
            model.get_submodule(_encoding_path(model)).bias_p.fill_(2.0)
        reference = output(model(ids, position_ids=position_ids))
        half = output(model.to(torch.bfloat16)(ids, position_ids=position_ids))
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, atol=atol, rtol=0.05)


def _encoding_path(model) -> str:
    return "embeddings.position_embeddings" if isinstance(model, RelPosBertModel) else "transformer.wpe"


@pytest.mark.parametrize("name", ["alibi", "kerple"])
def test_encoder_long_bias_distances_in_bf16(name):
    assert_close_to_fp32(bert, name, FAR, lambda o: o.last_hidden_state, max_position_embeddings=8192)


@pytest.mark.parametrize("name", ["alibi", "kerple", "t5", "fire"])
def test_decoder_long_bias_distances_in_bf16(name):
    # Logits of a tiny model are small: compare them at the model's own scale.
    assert_close_to_fp32(gpt, name, FAR, lambda o: o.logits, n_positions=8192)


@pytest.mark.parametrize("make", [bert, gpt], ids=["encoder", "decoder"])
def test_large_rope_base_in_bf16(make):
    rope = {"rope_type": "default", "rope_theta": 1e6}
    output = (lambda o: o.last_hidden_state) if make is bert else (lambda o: o.logits)
    assert_close_to_fp32(make, "rope", FAR, output, rope_parameters=rope)


def test_xpos_at_long_positions_in_bf16():
    # xPos scales keys by zeta^(-j/B): ~2e4 at j = 4096, B = 512; computed in fp32 before the cast.
    assert_close_to_fp32(gpt, "xpos", FAR, lambda o: o.logits)


def test_xpos_bf16_backward_at_long_positions():
    model = gpt("xpos").to(torch.bfloat16).train()
    ids = torch.randint(1, 99, FAR.shape, generator=torch.Generator().manual_seed(3))
    model(ids, position_ids=FAR, labels=ids).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_alibi_bias_is_built_in_fp32_before_the_cast():
    # Distances 4096 apart in bf16 (8 bits of mantissa) would round 4095 to 4096: the bias of neighbours must still
    # be exactly -slope.
    model = bert("alibi", max_position_embeddings=8192).to(torch.bfloat16)
    encoding = model.embeddings.position_embeddings
    positions = torch.tensor([[4095, 4096, 4097]])
    state = encoding.prepare(positions, positions, torch.bfloat16)
    query = torch.zeros(1, encoding.num_heads, 3, encoding.head_dim, dtype=torch.bfloat16)
    bias = encoding.bias(query, query, state, 0).float()
    slopes = bias[0, :, 0, 1].neg()
    torch.testing.assert_close(bias[0, :, 0, 2], -2 * slopes)
    assert (slopes > 0).all()
