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


@pytest.mark.parametrize("name", DECODER_ENCODINGS)
def test_fp64_eager_equals_fp64_sdpa_on_a_left_padded_batch(name):
    """The eager kernel's softmax runs in fp64 for fp64 scores: in fp32, the mask value finfo(float64).min becomes
    -inf, the fully masked row NaN, and the next layer spreads it."""
    model = gpt(name).double().eval()
    ids, mask = batch(decoder=True)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        reference = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask).logits
    assert torch.isfinite(eager).all()
    real = mask.bool()
    torch.testing.assert_close(eager[real], reference[real], atol=1e-10, rtol=1e-10)



@pytest.mark.parametrize("name", [name for name, cls in POSITION_ENCODINGS.items() if cls.has_bias])
def test_fp64_blocked_training_kernel_equals_fp64_eager_on_a_left_padded_batch(name):
    """sdpa under autograd on CPU runs the query-blocked kernel for a bias: its softmax is in fp64 too."""
    model = gpt(name).double().train()
    ids, mask = batch(decoder=True)
    model.set_attn_implementation("eager")
    reference = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("sdpa")
    blocked = model(ids, attention_mask=mask).logits
    assert torch.isfinite(blocked).all()
    real = mask.bool()
    torch.testing.assert_close(blocked[real], reference[real], atol=1e-10, rtol=1e-10)

def xpos_scores_fp64(query, key, query_positions, key_positions, scale_base, theta=10000.0, gamma=0.4):
    """`q_i . k_j` of xPos from its definition, in fp64: for each rotary pair m (channels m and m + d/2, the
    GPT-NeoX layout), `zeta_m^((i-j)/B) [(q1 k1 + q2 k2) cos((j-i) theta_m) + (q2 k1 - q1 k2) sin((j-i) theta_m)]`."""
    half = query.shape[-1] // 2
    m = torch.arange(half, dtype=torch.float64)
    theta_m = theta ** (-2 * m / (2 * half))
    zeta = (2 * m / (2 * half) + gamma) / (1 + gamma)
    distance = (key_positions[None, :] - query_positions[:, None]).double()[..., None]  # [q, k, half]
    q1, q2 = query[..., :half].double()[:, :, :, None], query[..., half:].double()[:, :, :, None]
    k1, k2 = key[..., :half].double()[:, :, None], key[..., half:].double()[:, :, None]
    angle = distance * theta_m
    terms = (q1 * k1 + q2 * k2) * angle.cos() + (q2 * k1 - q1 * k2) * angle.sin()
    return (terms * zeta ** (-distance / scale_base)).sum(-1)


@pytest.mark.parametrize(
    ("dtype", "scale_base", "atol"),
    [(torch.float16, 512, 0.03), (torch.bfloat16, 64, 0.15), (torch.float32, 64, 1e-3)],
    ids=["fp16", "bf16", "fp32"],
)
def test_xpos_scores_at_its_safe_length_equal_the_fp64_definition(dtype, scale_base, atol):
    encoding = gpt("xpos", xpos_scale_base=scale_base, n_positions=8192).transformer.wpe
    safe = encoding.safe_length(dtype)
    positions = torch.arange(safe - 63, safe + 1)[None]
    generator = torch.Generator().manual_seed(4)
    query, key = (torch.randn(1, encoding.num_heads, 64, encoding.head_dim, generator=generator) for _ in range(2))
    state = encoding.prepare(positions, positions, dtype)
    rotated_query, rotated_key = encoding.rotate(query.to(dtype), key.to(dtype), state)
    assert torch.isfinite(rotated_query).all() and torch.isfinite(rotated_key).all()
    scores = rotated_query.double() @ rotated_key.double().transpose(-1, -2)
    reference = xpos_scores_fp64(query.to(dtype), key.to(dtype), positions[0], positions[0], scale_base)
    torch.testing.assert_close(scores, reference, atol=atol, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "scale_base", "position"),
    [(torch.float16, 512, 5007), (torch.bfloat16, 64, 4535), (torch.float32, 64, 4535)],
    ids=["fp16", "bf16", "fp32"],
)
def test_xpos_past_its_safe_length_raises_naming_it(dtype, scale_base, position):
    model = gpt("xpos", xpos_scale_base=scale_base, n_positions=8192).to(dtype).eval()
    with pytest.raises(ValueError, match=r"xpos_scale_base=\d+ holds positions up to \d+ in torch\.\w+"):
        model(torch.tensor([[5, 6]]), position_ids=torch.tensor([[position - 1, position]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rope_frequencies_stay_fp32_under_a_cast(dtype):
    """`model.half()` / `.to(bfloat16)` leave rope's frequencies fp32: the angles at position 16384 are those of the
    fp32 model, and the cast cos/sin are within the dtype's rounding of the fp64 definition."""
    reference = gpt("rope", n_positions=32768).transformer.wpe
    encoding = gpt("rope", n_positions=32768).to(dtype).transformer.wpe
    assert encoding.inv_freq.dtype == torch.float32
    positions = torch.tensor([[16384]])
    expected = reference.prepare(positions, positions, torch.float32).tables
    got = encoding.prepare(positions, positions, torch.float32).tables
    assert torch.equal(got["cos"], expected["cos"]) and torch.equal(got["sin"], expected["sin"])
    half = encoding.prepare(positions, positions, dtype).tables
    angles = 16384 * 10000.0 ** (-torch.arange(0, encoding.head_dim, 2, dtype=torch.float64) / encoding.head_dim)
    angles = torch.cat((angles, angles))
    rounding = torch.finfo(dtype).eps
    torch.testing.assert_close(half["cos"][0, 0].double(), angles.cos(), atol=rounding, rtol=0)
    torch.testing.assert_close(half["sin"][0, 0].double(), angles.sin(), atol=rounding, rtol=0)
