"""Each position encoding against an independent formula or transformers' own implementation of it."""

import math
import threading

import pytest
import torch
from conftest import BIAS_ENCODINGS, fire_piece, tiny_bert_config
from transformers import LlamaConfig
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.deberta_v2.modeling_deberta_v2 import (
    DebertaV2Config,
    DisentangledSelfAttention,
    build_relative_position,
)
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position as hf_make_log_bucket_position
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.t5.modeling_t5 import T5Attention

from hf_relpos import POSITION_ENCODINGS
from hf_relpos.configuration_relpos import RelPosGPTConfig
from hf_relpos.encodings import (
    PositionState,
    XPosEncoding,
    alibi_slopes,
    build_position_encoding,
    make_log_bucket_position,
    relative_position_bucket,
)


HEADS, HEAD_DIM = 4, 8


def make_encoding(name: str, causal: bool = False, **overrides):
    """The encoding `name` of a tiny config, with its parameters initialised as in a model."""
    config = tiny_bert_config(position_embedding_type=name, **overrides)
    encoding = build_position_encoding(config, causal=causal)
    encoding.init_weights(config)
    return encoding, config


def positions(batch: int = 2, length: int = 9, offset: int = 3):
    """Non-trivial positions: row 0 counts from 0, row 1 from `offset` (as after a cache or left padding)."""
    rows = [torch.arange(length) + b * offset for b in range(batch)]
    return torch.stack(rows)


def qk(batch: int, q_len: int, k_len: int):
    return torch.randn(batch, HEADS, q_len, HEAD_DIM), torch.randn(batch, HEADS, k_len, HEAD_DIM)


# ---------------------------------------------------------------------------------------------------------------
# Absolute schemes
# ---------------------------------------------------------------------------------------------------------------


def test_sinusoidal_table_is_vaswani_at_the_embedding_scale(seed):
    encoding, config = make_encoding("sinusoidal")
    d = config.hidden_size
    position_ids = torch.tensor([[0, 1, 2, 7, 30, 63, 100]])
    table = encoding.embed(torch.zeros(1, 7, d), position_ids)[0]
    expected = torch.empty(7, d)
    for row, pos in enumerate(position_ids[0].tolist()):
        for m in range(d // 2):
            expected[row, 2 * m] = math.sin(pos / 10000 ** (2 * m / d))
            expected[row, 2 * m + 1] = math.cos(pos / 10000 ** (2 * m / d))
    torch.testing.assert_close(table, expected / math.sqrt(d), atol=1e-5, rtol=1e-5)


def test_absolute_adds_learned_row_at_position_plus_offset(seed):
    encoding, config = make_encoding("absolute", position_offset=2)
    position_ids = torch.tensor([[0, 1, 5]])
    hidden = torch.randn(1, 3, config.hidden_size)
    out = encoding.embed(hidden, position_ids)
    torch.testing.assert_close(out, hidden + encoding.weight[position_ids + 2], atol=0, rtol=0)


def test_absolute_beyond_table_raises_naming_max_position_embeddings():
    encoding, config = make_encoding("absolute")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        encoding.embed(torch.zeros(1, 1, config.hidden_size), torch.tensor([[config.max_position_embeddings]]))


# ---------------------------------------------------------------------------------------------------------------
# Relative key (Shaw / Huang m3) and key-query (Huang m4)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["relative_key", "relative_key_query"])
@pytest.mark.parametrize("num_queries", [5, 9], ids=["cached_prefix", "full"])
def test_relative_key_bias_is_q_dot_r_of_clipped_distance(seed, name, num_queries):
    # 5 queries (fewer than the 2k + 1 = 7 table rows) and 9 queries exercise both ways of computing the k.r term.
    k = 3
    encoding, _ = make_encoding(name, max_relative_positions=k)
    kpos = positions(2, 9)
    qpos = kpos[:, 9 - num_queries :]  # queries are the last keys (after a cached prefix)
    q, key = qk(2, num_queries, 9)
    state = encoding.prepare(qpos, kpos, torch.float32)
    for layer in range(2):
        table = encoding.distance_embedding[layer].weight
        expected = torch.zeros(2, HEADS, num_queries, 9)
        for b in range(2):
            for h in range(HEADS):
                for i in range(num_queries):
                    for j in range(9):
                        r = table[max(-k, min(k, int(kpos[b, j] - qpos[b, i]))) + k]
                        value = q[b, h, i] @ r
                        if name == "relative_key_query":
                            value = value + key[b, h, j] @ r
                        expected[b, h, i, j] = value / math.sqrt(HEAD_DIM)
        got = encoding.bias(q, key, state, layer).expand(2, HEADS, num_queries, 9)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# T5
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 40), (64, 256)])
def test_t5_buckets_equal_transformers(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-600, 601)[None, :]
    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("causal", [False, True])
def test_t5_bias_is_table_at_transformers_bucket(seed, causal):
    encoding, config = make_encoding("t5", causal=causal)
    kpos = positions(2, 40, offset=150)
    qpos = kpos
    state = encoding.prepare(qpos, kpos, torch.float32)
    relative = kpos[:, None, :] - qpos[:, :, None]
    bucket = T5Attention._relative_position_bucket(
        relative, bidirectional=not causal, num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
    )
    expected = encoding.relative_attention_bias[bucket].permute(0, 3, 1, 2)
    got = encoding.bias(None, None, state, 0).expand_as(expected)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# ALiBi
# ---------------------------------------------------------------------------------------------------------------


def bloom_slopes(num_heads: int) -> torch.Tensor:
    """BLOOM's alibi is `slope * position`: read the slopes at position 1 of an all-ones mask."""
    alibi = build_alibi_tensor(torch.ones(1, 4, dtype=torch.long), num_heads, torch.float32)
    return alibi[:, 0, 1]


@pytest.mark.parametrize("num_heads", list(range(1, 17)))
def test_alibi_slopes_equal_bloom(num_heads):
    torch.testing.assert_close(alibi_slopes(num_heads), bloom_slopes(num_heads), atol=0, rtol=0)


@pytest.mark.parametrize("num_heads", [4, 6])
def test_alibi_bias_is_minus_slope_times_abs_distance(num_heads):
    encoding, _ = make_encoding("alibi", hidden_size=8 * num_heads, num_attention_heads=num_heads)
    kpos = positions(2, 11)
    state = encoding.prepare(kpos, kpos, torch.float32)
    slopes = bloom_slopes(num_heads)
    distance = (kpos[:, None, :] - kpos[:, :, None]).abs().float()
    expected = -slopes[None, :, None, None] * distance[:, None]
    torch.testing.assert_close(encoding.bias(None, None, state, 0).expand_as(expected), expected)


# ---------------------------------------------------------------------------------------------------------------
# KERPLE and FIRE
# ---------------------------------------------------------------------------------------------------------------


def test_kerple_bias_is_minus_r1_log_one_plus_r2_distance():
    encoding, _ = make_encoding("kerple")
    r1, r2 = torch.tensor([0.5, 1.0, 1.5, 2.0]), torch.tensor([0.1, 0.3, 0.6, 0.9])
    with torch.no_grad():
        encoding.bias_p.copy_(r1)
        encoding.bias_a.copy_(r2)
    kpos = positions(2, 10)
    got = encoding.bias(None, None, encoding.prepare(kpos, kpos, torch.float32), 0)
    expected = torch.zeros(2, HEADS, 10, 10)
    for b in range(2):
        for h in range(HEADS):
            for i in range(10):
                for j in range(10):
                    distance = abs(int(kpos[b, j] - kpos[b, i]))
                    expected[b, h, i, j] = -r1[h] * math.log(1 + r2[h] * distance)
    torch.testing.assert_close(got.expand_as(expected), expected)


def test_fire_bias_is_mlp_of_log_normalised_distance(seed):
    encoding, _ = make_encoding("fire", fire_mlp_width=5)
    c, threshold = 0.1, 6.0
    with torch.no_grad():
        encoding.threshold.fill_(threshold)  # below the largest query position: both branches of max(L, i)
    kpos = positions(2, 10)
    got = encoding.bias(None, None, encoding.prepare(kpos, kpos, torch.float32), 0)
    w1, b1 = encoding.mlp[0].weight[:, 0], encoding.mlp[0].bias
    w2, b2 = encoding.mlp[2].weight, encoding.mlp[2].bias
    expected = torch.zeros(2, HEADS, 10, 10)
    for b in range(2):
        for i in range(10):
            for j in range(10):
                qi, kj = int(kpos[b, i]), int(kpos[b, j])
                x = math.log(c * abs(qi - kj) + 1) / math.log(c * max(threshold, qi) + 1)
                expected[b, :, i, j] = w2 @ torch.relu(w1 * x + b1) + b2
    torch.testing.assert_close(got.expand_as(expected), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["relative_key_query", "deberta"])
def test_decode_step_bias_from_key_pairs_equals_the_table_bias(seed, name, causal):
    # A decode step scores each cached key against its own table row only (a causal one reads only the rows of
    # earlier keys); the general path scores every key against every row and gathers. Both must give the same bias.
    encoding, _ = make_encoding(name, causal=causal)
    with torch.no_grad():
        for parameter in encoding.parameters():
            parameter.normal_()
    key_positions = positions(2, 20)
    query_positions = key_positions[:, -1:]
    query, key = torch.randn(2, HEADS, 1, HEAD_DIM), torch.randn(2, HEADS, 20, HEAD_DIM)
    state = encoding.prepare(query_positions, key_positions, torch.float32)

    got = encoding.bias(query, key, state, 0)
    expected = encoding.bias_rows(encoding.bias_tables(query, key, state, 0), state)

    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["relative_key_query", "deberta"])
def test_decode_step_bias_from_key_pairs_has_the_gradients_of_the_elementwise_formula(seed, name):
    # The decode paths multiply in place (DeBERTa its copied rows by the keys, relative_key_query the keys shifted
    # by the query by its rows); autograd must still see every factor. The reference reads each pair's row by
    # advanced indexing and sums the products without any in-place write.
    encoding, _ = make_encoding(name)
    key_positions = positions(2, 12)
    query_positions = key_positions[:, -2:]
    query = torch.randn(2, HEADS, 2, HEAD_DIM, requires_grad=True)
    key = torch.randn(2, HEADS, 12, HEAD_DIM, requires_grad=True)
    state = encoding.prepare(query_positions, key_positions, torch.float32)
    index = state.tables["index"]
    if name == "deberta":
        pos_key, pos_query = encoding.position_projections(0, torch.float32)
        rows = {"query": pos_key.transpose(0, 1)[index], "key": pos_query.transpose(0, 1)[index]}  # [b, i, j, h, d]
        table = encoding.rel_embeddings.weight
    else:
        table = encoding.distance_embedding[0].weight
        rows = {"query": table[index][:, :, :, None], "key": table[index][:, :, :, None]}
    scale = encoding.scaling(HEAD_DIM)
    expected = ((query.transpose(1, 2)[:, :, None] * rows["query"]).sum(-1)
                + (key.transpose(1, 2)[:, None] * rows["key"]).sum(-1)).permute(0, 3, 1, 2) * scale
    weights = torch.randn_like(expected)
    inputs = (query, key, table)

    got = encoding.bias(query, key, state, 0)

    torch.testing.assert_close(got, expected)
    for ours, theirs in zip(torch.autograd.grad((got * weights).sum(), inputs),
                            torch.autograd.grad((expected * weights).sum(), inputs), strict=True):
        torch.testing.assert_close(ours, theirs)


def assert_fire_pieces_equal_its_mlp(encoding, x: torch.Tensor, **tolerance) -> None:
    """`f` by its pieces at `x` equals the ReLU MLP, in value and (to `tolerance`) in the gradients of `x` and of
    every weight."""
    mlp = encoding.mlp[0], encoding.mlp[2]
    parameters = [x, *(p for layer in mlp for p in layer.parameters())]
    expected = mlp[1](torch.relu(mlp[0](x[:, None])))
    breakpoints, slopes, intercepts = encoding.f_pieces(encoding.parameter_tables())
    piece = encoding.piece(x.detach(), breakpoints)
    got = slopes[piece] * x[:, None] + intercepts[piece]

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(expected)
    for ours, theirs in zip(torch.autograd.grad((got * weights).sum(), parameters),
                            torch.autograd.grad((expected * weights).sum(), parameters), strict=True):
        torch.testing.assert_close(ours, theirs, **tolerance)


def test_fire_piecewise_linear_form_equals_its_mlp_in_value_and_gradient(seed):
    encoding, _ = make_encoding("fire", fire_mlp_width=16)
    with torch.no_grad():
        encoding.mlp[0].weight[:3] = 0.0  # units whose ReLU does not depend on x: constant or off
    x = torch.linspace(-3.0, 3.0, 601, requires_grad=True)
    assert_fire_pieces_equal_its_mlp(encoding, x, atol=1e-4, rtol=1e-4)


def test_fire_pieces_on_a_breakpoint_have_relus_gradient_at_zero(seed):
    # Zero-initialised biases (transformers' init) put every breakpoint at x = 0, where each query meets its own key:
    # there ReLU's gradient is 0, so the first layer's biases get no gradient from x = 0.
    encoding, _ = make_encoding("fire", fire_mlp_width=16)
    with torch.no_grad():
        encoding.mlp[0].bias.zero_()
    assert_fire_pieces_equal_its_mlp(encoding, torch.tensor([-0.5, 0.0, 0.0, 0.25, 1.0], requires_grad=True))


def test_fire_piece_by_comparisons_equals_its_search(seed):
    # A compiled graph and a score_mod count the breakpoints below x; eager searches for them. Repeated breakpoints
    # (zero biases), units whose ReLU ignores x (infinite breakpoints), x on a breakpoint and past every one.
    encoding, _ = make_encoding("fire", fire_mlp_width=16)
    with torch.no_grad():
        encoding.mlp[0].bias[:6] = 0.0
        encoding.mlp[0].weight[6:8] = 0.0
    breakpoints = encoding.f_pieces(encoding.parameter_tables())[0]
    x = torch.cat((torch.linspace(-4.0, 4.0, 801), breakpoints[breakpoints.isfinite()]))
    expected = fire_piece(x, breakpoints)

    assert torch.equal(encoding.piece(x, breakpoints), expected)
    assert torch.equal(encoding.piece_by_comparisons(x, breakpoints), expected)


# ---------------------------------------------------------------------------------------------------------------
# DeBERTa
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bucket_size,max_position", [(256, 512), (64, 512), (8, 16), (32, 33)])
def test_deberta_log_buckets_equal_transformers(bucket_size, max_position):
    relative = torch.arange(-1000, 1001)
    ours = make_log_bucket_position(relative, bucket_size, max_position)
    theirs = hf_make_log_bucket_position(relative, bucket_size, max_position)
    assert torch.equal(ours.long(), theirs.long())


@pytest.mark.parametrize("position_buckets,max_relative_positions", [(8, 16), (0, 6)])
def test_deberta_relative_positions_equal_transformers(position_buckets, max_relative_positions):
    encoding, _ = make_encoding(
        "deberta", position_buckets=position_buckets, max_relative_positions=max_relative_positions
    )
    length = 40
    arange = torch.arange(length)[None]
    index = encoding.distance_index(arange[:, :, None], arange[:, None, :])
    reference = build_relative_position(
        torch.zeros(1, length, 1), torch.zeros(1, length, 1), bucket_size=position_buckets,
        max_position=max_relative_positions,
    )
    span = position_buckets if position_buckets > 0 else max_relative_positions
    assert torch.equal(index, (reference + span).clamp(0, 2 * span - 1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("position_buckets,max_relative_positions", [(64, 128), (256, 512), (8, 16), (0, 6), (2, 3),
                                                                    (4, 40)])
def test_deberta_rows_stop_changing_past_their_saturating_distance(causal, position_buckets, max_relative_positions):
    encoding, _ = make_encoding("deberta", causal=causal, position_buckets=position_buckets,
                                max_relative_positions=max_relative_positions)
    reach = encoding.saturating_distance()
    near = torch.arange(-4 * reach - 10, 4 * reach + 11)
    distances = torch.cat((near, torch.tensor([10**6, 10**9, 2**40]), -torch.tensor([10**6, 10**9, 2**40])))
    clipped = distances.clamp(-reach, reach)

    rows = encoding.distance_index(torch.zeros_like(distances), distances)

    assert torch.equal(rows, encoding.distance_index(torch.zeros_like(clipped), clipped))
    # No smaller reach would do.
    edges = torch.tensor([reach - 1, reach, 1 - reach, -reach])
    edge_rows = encoding.distance_index(torch.zeros_like(edges), edges)
    assert reach == 1 or edge_rows[0] != edge_rows[1] or edge_rows[2] != edge_rows[3]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("position_buckets,max_relative_positions", [(64, 128), (256, 512), (8, 16), (0, 6), (4, 40)])
def test_deberta_window_holds_the_row_of_every_distance_clipped_to_its_reach(causal, position_buckets,
                                                                            max_relative_positions):
    # What the compiled path reads (`clipped_bias`): row(t) = window[clip(t, reach) + reach], where the window is
    # at most twice the table; few buckets over a long max_relative_positions read by index instead.
    encoding, _ = make_encoding("deberta", causal=causal, position_buckets=position_buckets,
                                max_relative_positions=max_relative_positions)
    reach = encoding.saturating_distance()
    if reach > 2 * encoding.span:
        assert encoding.reach is None
        return
    distances = torch.arange(-2 * reach, 2 * reach + 1)

    rows = encoding.distance_index(torch.zeros_like(distances), distances)

    assert encoding.reach == reach
    assert torch.equal(rows, encoding.window_rows(torch.device("cpu"))[distances.clamp(-reach, reach) + reach])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("position_buckets,max_relative_positions", [(64, 128), (8, 16), (0, 6), (4, 40)])
def test_deberta_relative_index_is_the_row_of_every_pair(causal, position_buckets, max_relative_positions):
    # What eager layers read (the window where there is one, a gather by distance where there is none), for
    # positions that a padded batch and a cache leave: gaps, repeats and distances far past the reach.
    encoding, _ = make_encoding("deberta", causal=causal, position_buckets=position_buckets,
                                max_relative_positions=max_relative_positions)
    query_positions = torch.tensor([[0, 0, 3, 500], [7, 8, 9, 10]])
    key_positions = torch.tensor([[0, 0, 0, 2, 3, 300, 500, 2000], [0, 1, 2, 3, 7, 8, 9, 10]])
    state = PositionState(query_positions, key_positions)

    index = encoding.relative_index(state, slice(1, 4))

    reference = encoding.distance_index(query_positions[:, 1:, None], key_positions[:, None, :])
    assert torch.equal(index, reference)


@pytest.mark.parametrize("position_buckets,max_relative_positions", [(8, 16), (0, 6)])
def test_causal_deberta_gives_earlier_keys_the_bias_of_the_bidirectional_one(seed, position_buckets,
                                                                                max_relative_positions):
    # A causal encoding projects only the upper half of the relative table, the rows of keys j <= i.
    sizes = dict(position_buckets=position_buckets, max_relative_positions=max_relative_positions)
    causal, _ = make_encoding("deberta", causal=True, **sizes)
    bidirectional, _ = make_encoding("deberta", **sizes)
    bidirectional.load_state_dict(causal.state_dict())
    kpos = positions(2, 30, offset=4)
    q, key = qk(2, 30, 30)
    earlier = (kpos[:, None, :] <= kpos[:, :, None])[:, None].expand(2, HEADS, 30, 30)

    got = causal.bias(q, key, causal.prepare(kpos, kpos, torch.float32), 1)
    expected = bidirectional.bias(q, key, bidirectional.prepare(kpos, kpos, torch.float32), 1)

    torch.testing.assert_close(got[earlier], expected[earlier])


def test_deberta_bias_is_c2p_plus_p2c(seed):
    encoding, config = make_encoding("deberta", position_buckets=8, max_relative_positions=16)
    span = 8
    kpos = positions(2, 20, offset=5)
    qpos = kpos
    q, key = qk(2, 20, 20)
    state = encoding.prepare(qpos, kpos, torch.float32)
    rel = torch.nn.functional.layer_norm(
        encoding.rel_embeddings.weight, (config.hidden_size,), encoding.LayerNorm.weight, encoding.LayerNorm.bias,
        config.layer_norm_eps,
    )
    for layer in range(2):
        kr = encoding.pos_key_proj[layer](rel).view(2 * span, HEADS, HEAD_DIM)
        qr = encoding.pos_query_proj[layer](rel).view(2 * span, HEADS, HEAD_DIM)
        bucket = hf_make_log_bucket_position(qpos[:, :, None] - kpos[:, None, :], span, 16).long()
        index = (bucket + span).clamp(0, 2 * span - 1)
        expected = torch.einsum("bhid,bijhd->bhij", q, kr[index]) + torch.einsum("bhjd,bijhd->bhij", key, qr[index])
        expected = expected / math.sqrt(3 * HEAD_DIM)
        torch.testing.assert_close(encoding.bias(q, key, state, layer), expected, atol=1e-5, rtol=1e-5)
    assert encoding.scaling(HEAD_DIM) == pytest.approx((3 * HEAD_DIM) ** -0.5)


def test_deberta_bias_equals_transformers_disentangled_attention(seed):
    encoding, config = make_encoding("deberta", position_buckets=8, max_relative_positions=16)
    hf_config = DebertaV2Config(
        hidden_size=config.hidden_size, num_attention_heads=HEADS, relative_attention=True, position_buckets=8,
        max_relative_positions=16, share_att_key=False, pos_att_type=["c2p", "p2c"], hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf_attention = DisentangledSelfAttention(hf_config).eval()
    hf_attention.pos_key_proj.load_state_dict(encoding.pos_key_proj[0].state_dict())
    hf_attention.pos_query_proj.load_state_dict(encoding.pos_query_proj[0].state_dict())
    length = 20
    arange = torch.arange(length)[None]
    q, key = qk(1, length, length)
    rel = encoding.LayerNorm(encoding.rel_embeddings.weight)
    with torch.no_grad():
        theirs = hf_attention.disentangled_attention_bias(q[0], key[0], None, rel, scale_factor=3)
        ours = encoding.bias(q, key, encoding.prepare(arange, arange, torch.float32), 0)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_deberta_bias_without_autograd_follows_parameter_updates(seed):
    # Without autograd the projected position tables are kept between calls; an in-place update must refresh them.
    encoding, _ = make_encoding("deberta")
    kpos = positions(1, 6)
    q, key = qk(1, 6, 6)
    state = encoding.prepare(kpos, kpos, torch.float32)
    with torch.no_grad():
        before = encoding.bias(q, key, state, 0)
        encoding.pos_key_proj[0].weight.add_(0.5)
        after = encoding.bias(q, key, state, 0)
    fresh = encoding.bias(q, key, state, 0)  # with autograd: nothing kept
    assert not torch.allclose(before, after)
    # Without autograd a CPU step may take the C kernel (`kernels.pair_dot`): the same products, summed in another
    # order, so equal to fp32 rounding.
    torch.testing.assert_close(after, fresh.detach())


# ---------------------------------------------------------------------------------------------------------------
# RoPE and xPos
# ---------------------------------------------------------------------------------------------------------------


ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 32},
    "longrope": {
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
        "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [1.5, 2.0, 2.5, 3.0],
    },
    "llama3": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
    },
}


@pytest.mark.parametrize("length", [16, 100])  # 100 > max_position_embeddings: dynamic/longrope rescale
@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_rope_equals_llama_rotary_embedding(seed, rope_type, length):
    parameters = ROPE_PARAMETERS[rope_type]
    encoding, config = make_encoding("rope", rope_parameters=dict(parameters))
    llama_config = LlamaConfig(
        hidden_size=config.hidden_size, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        max_position_embeddings=config.max_position_embeddings, rope_parameters=dict(parameters),
    )
    llama_rope = LlamaRotaryEmbedding(llama_config)
    position_ids = torch.arange(length)[None].expand(2, -1)
    q, key = qk(2, length, length)
    cos, sin = llama_rope(q, position_ids)
    expected_q, expected_k = apply_rotary_pos_emb(q, key, cos, sin)
    got_q, got_k = encoding.rotate(q, key, encoding.prepare(position_ids, position_ids, torch.float32))
    torch.testing.assert_close(got_q, expected_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k, expected_k, atol=1e-6, rtol=1e-6)


def test_rope_partial_rotary_factor_rotates_head_and_leaves_tail(seed):
    encoding, _ = make_encoding("rope", rope_parameters={"rope_type": "default", "rope_theta": 100.0,
                                                         "partial_rotary_factor": 0.5})
    rotary = HEAD_DIM // 2
    position_ids = torch.arange(12)[None]
    q, key = qk(1, 12, 12)
    got_q, got_k = encoding.rotate(q, key, encoding.prepare(position_ids, position_ids, torch.float32))
    torch.testing.assert_close(got_q[..., rotary:], q[..., rotary:], atol=0, rtol=0)
    torch.testing.assert_close(got_k[..., rotary:], key[..., rotary:], atol=0, rtol=0)
    inv_freq = 1.0 / 100.0 ** (torch.arange(0, rotary, 2).float() / rotary)
    angles = position_ids[0, :, None].float() * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    expected_q, expected_k = apply_rotary_pos_emb(q[..., :rotary], key[..., :rotary], cos[None], sin[None])
    torch.testing.assert_close(got_q[..., :rotary], expected_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k[..., :rotary], expected_k, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rope_type", ["default", "linear"])
def test_rope_scores_depend_only_on_distance(seed, rope_type):
    encoding, _ = make_encoding("rope", rope_parameters=dict(ROPE_PARAMETERS[rope_type]))
    length = 12
    position_ids = torch.arange(length)[None]
    q = torch.randn(1, HEADS, 1, HEAD_DIM).expand(1, HEADS, length, HEAD_DIM)
    key = torch.randn(1, HEADS, 1, HEAD_DIM).expand(1, HEADS, length, HEAD_DIM)
    q, key = encoding.rotate(q, key, encoding.prepare(position_ids, position_ids, torch.float32))
    scores = q @ key.transpose(-1, -2)
    for shift in range(-length + 1, length):
        diagonal = torch.diagonal(scores, offset=shift, dim1=-2, dim2=-1)
        torch.testing.assert_close(diagonal, diagonal[..., :1].expand_as(diagonal), atol=1e-5, rtol=1e-5)


def test_xpos_scores_depend_only_on_distance_and_equal_formula(seed):
    base, gamma = 64, 0.4
    config = RelPosGPTConfig(n_embd=32, n_head=HEADS, n_layer=2, position_embedding_type="xpos",
                             xpos_scale_base=base)
    encoding = XPosEncoding(config, causal=True)
    encoding.init_weights(config)
    length = 24
    position_ids = torch.arange(length)[None]
    q0, k0 = torch.randn(HEADS, HEAD_DIM), torch.randn(HEADS, HEAD_DIM)
    q = q0[None, :, None].expand(1, HEADS, length, HEAD_DIM)
    key = k0[None, :, None].expand(1, HEADS, length, HEAD_DIM)
    q, key = encoding.rotate(q, key, encoding.prepare(position_ids, position_ids, torch.float32))
    scores = (q @ key.transpose(-1, -2))[0]
    half = HEAD_DIM // 2
    theta = [1.0 / 10000 ** (2 * m / HEAD_DIM) for m in range(half)]
    zeta = [(2 * m / HEAD_DIM + gamma) / (1 + gamma) for m in range(half)]
    expected = torch.zeros(HEADS, length, length, dtype=torch.float64)
    for h in range(HEADS):
        for i in range(length):
            for j in range(length):
                total = 0.0
                for m in range(half):
                    qa, qb, ka, kb = q0[h, m], q0[h, m + half], k0[h, m], k0[h, m + half]
                    phi = (j - i) * theta[m]
                    rotated = math.cos(phi) * (qa * ka + qb * kb) + math.sin(phi) * (qb * ka - qa * kb)
                    total += zeta[m] ** ((i - j) / base) * float(rotated)
                expected[h, i, j] = total
    torch.testing.assert_close(scores.double(), expected, atol=1e-4, rtol=1e-4)
    for shift in range(-length + 1, length):
        diagonal = torch.diagonal(scores, offset=shift, dim1=-2, dim2=-1)
        torch.testing.assert_close(diagonal, diagonal[..., :1].expand_as(diagonal), atol=1e-4, rtol=1e-4)


def test_xpos_is_refused_by_encoders():
    config = RelPosGPTConfig(n_embd=32, n_head=HEADS, n_layer=2, position_embedding_type="xpos")
    with pytest.raises(ValueError, match="position_embedding_type"):
        build_position_encoding(config, causal=False)


# ---------------------------------------------------------------------------------------------------------------
# Dense bias == flex score_mod
# ---------------------------------------------------------------------------------------------------------------


def test_bias_encodings_cover_the_catalog():
    assert set(BIAS_ENCODINGS) == {"relative_key", "relative_key_query", "t5", "alibi", "kerple", "fire", "deberta"}
    assert set(POSITION_ENCODINGS) >= set(BIAS_ENCODINGS) | {"absolute", "sinusoidal", "rope", "xpos", "nope"}


def score_mod_and_dense_bias(name: str, causal: bool):
    """An encoding's flex `score_mod` evaluated at every (batch, head, query, key), next to its dense bias. FIRE's
    threshold is 7, so that its queries (positions 4 to 12) lie on both sides of it."""
    encoding, _ = make_encoding(name, causal=causal, max_relative_positions=6, position_buckets=4)
    if name == "fire":
        encoding.threshold.data.fill_(7.0)
    batch, q_len, k_len = 2, 5, 9
    kpos = positions(batch, k_len, offset=4)
    qpos = kpos[:, k_len - q_len:]
    q, key = qk(batch, q_len, k_len)
    state = encoding.prepare(qpos, kpos, torch.float32)
    dense = encoding.bias(q, key, state, 1).expand(batch, HEADS, q_len, k_len)
    score_mod = encoding.score_mod(q, key, state, 1)
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.arange(HEADS).view(1, -1, 1, 1)
    q_idx = torch.arange(q_len).view(1, 1, -1, 1)
    kv_idx = torch.arange(k_len).view(1, 1, 1, -1)
    return encoding, score_mod(torch.zeros(batch, HEADS, q_len, k_len), b, h, q_idx, kv_idx), dense


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", BIAS_ENCODINGS)
def test_score_mod_equals_dense_bias(seed, name, causal, grad):
    with torch.set_grad_enabled(grad):
        _, flex, dense = score_mod_and_dense_bias(name, causal)
    torch.testing.assert_close(flex, dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["t5", "kerple", "fire"])
def test_score_mod_of_a_learned_bias_has_the_dense_bias_gradient(seed, name, causal):
    """What flex differentiates: the parameters' gradient through the score_mod equals the dense bias's."""
    encoding, flex, dense = score_mod_and_dense_bias(name, causal)
    upstream = torch.randn_like(dense)
    parameter_names, parameters = zip(*encoding.named_parameters(), strict=True)
    want = torch.autograd.grad((dense * upstream).sum(), parameters, allow_unused=True)
    got = torch.autograd.grad((flex * upstream).sum(), parameters, allow_unused=True)
    for parameter_name, expected, actual in zip(parameter_names, want, got, strict=True):
        assert (expected is None) == (actual is None), parameter_name
        if expected is not None:
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=parameter_name)


@pytest.mark.parametrize("name", [n for n, cls in POSITION_ENCODINGS.items() if not cls.has_bias])
def test_encodings_without_bias_have_no_bias_or_score_mod(name):
    if POSITION_ENCODINGS[name].decoder_only:
        config = RelPosGPTConfig(n_embd=32, n_head=HEADS, n_layer=2, position_embedding_type=name)
        encoding = build_position_encoding(config, causal=True)
    else:
        encoding, _ = make_encoding(name)
    pos = torch.arange(5)[None]
    state = encoding.prepare(pos, pos, torch.float32)
    q, key = qk(1, 5, 5)
    assert encoding.bias(q, key, state, 0) is None
    assert encoding.score_mod(q, key, state, 0) is None


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_rope_forward_does_not_mutate_the_module(rope_type):
    encoding, _ = make_encoding("rope", rope_parameters=dict(ROPE_PARAMETERS[rope_type]))
    before = {name: buffer.clone() for name, buffer in encoding.named_buffers()}
    attributes = dict(vars(encoding))
    for length in (200, 10, 100):
        encoding.prepare(torch.arange(length)[None], torch.arange(length)[None], torch.float32)
    assert before.keys() == dict(encoding.named_buffers()).keys()
    for name, buffer in encoding.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert {name: value for name, value in vars(encoding).items() if name[0] != "_"} == {
        name: value for name, value in attributes.items() if name[0] != "_"
    }


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_rope_from_four_threads_gives_each_call_its_single_threaded_result(rope_type):
    """Lengths on both sides of the original length, in a random order, from 4 threads sharing one module: every
    cos/sin equals that of the same call alone on a fresh module (the frequencies are computed per call)."""
    parameters = ROPE_PARAMETERS[rope_type]
    lengths = [12, 40, 100, 150, 20, 64, 65, 200]
    reference = {}
    for length in lengths:
        fresh, _ = make_encoding("rope", rope_parameters=dict(parameters))
        reference[length] = fresh.prepare(torch.arange(length)[None], torch.arange(length)[None], torch.float32)
    shared, _ = make_encoding("rope", rope_parameters=dict(parameters))
    barrier, wrong = threading.Barrier(4), []

    def work(seed: int) -> None:
        order = torch.randint(len(lengths), (200,), generator=torch.Generator().manual_seed(seed)).tolist()
        barrier.wait()
        for index in order:
            length = lengths[index]
            state = shared.prepare(torch.arange(length)[None], torch.arange(length)[None], torch.float32)
            expected = reference[length].tables
            if not (torch.equal(state.tables["cos"], expected["cos"]) and
                    torch.equal(state.tables["sin"], expected["sin"])):
                wrong.append(length)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, f"{len(wrong)} of 800 calls were wrong (lengths {sorted(set(wrong))})"
