"""The query-blocked CPU training kernel (sdpa with a bias under autograd): the same outputs and gradients as dense
attention over the encoding's dense bias, and no `[q_len, k_len]` tensor kept for backward."""

import copy

import pytest
import torch
from conftest import BIAS_ENCODINGS, ENCODER_ENCODINGS, autograd_nodes, tiny_bert_config, tiny_gpt_config
from torch.autograd.graph import saved_tensors_hooks

from hf_relpos import RelPosBertModel, RelPosGPTForCausalLM
from hf_relpos.attention import BLOCK_SCORES, dense_bias
from hf_relpos.encodings import build_position_encoding
from hf_relpos.kernels import (
    OPERATORS,
    ClippedRows,
    DiagonalRows,
    DistanceRows,
    QueryBlockedAttention,
    RunGather,
    SkewedRows,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTH = 11
ENCODER_BIAS_ENCODINGS = [name for name in BIAS_ENCODINGS if name in ENCODER_ENCODINGS]
POSITIONS = {
    # Every row counts 0, 1, ...: the static biases read Toeplitz rows straight from their distance table.
    "consecutive": torch.arange(LENGTH).expand(2, -1),
    # Left padding in the first row (three pads at position 0), as `token_positions` counts it: a gather.
    "padded": torch.stack((torch.tensor([0, 0, 0, *range(LENGTH - 3)]), torch.arange(LENGTH))),
}


def random_encoding(name: str, causal: bool = False):
    """The encoding in float64 with random parameters (FIRE's threshold at 4, so most queries are past it)."""
    encoding = build_position_encoding(tiny_bert_config(position_embedding_type=name), causal).double()
    with torch.no_grad():
        for parameter in encoding.parameters():
            parameter.copy_(torch.rand_like(parameter) + 0.1)
        if name == "fire":
            encoding.threshold.fill_(4.0)
    return encoding


def dense_attention(query, key, value, bias, mask):
    """softmax(q k^T / sqrt(d) + bias, masked) v, written out."""
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5 + bias
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(-1) @ value


def blocked_attention(encoding, state, query, key, value, mask, block_size, dropout=0.0, causal=False):
    tables = encoding.bias_tables(query, key, state, 0)
    return QueryBlockedAttention.apply(
        query, key, value, mask, lambda tables, rows: encoding.bias_rows(tables, state, rows), encoding.row_tables,
        query.shape[-1] ** -0.5, dropout, causal, block_size, *tables,
    )


def qkv(batch: int = 2, length: int = LENGTH):
    return [torch.randn(batch, 4, length, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("positions", list(POSITIONS))
@pytest.mark.parametrize("name", ENCODER_BIAS_ENCODINGS)
def test_blocked_attention_equals_dense_attention_in_value_and_gradient(seed, name, positions):
    encoding = random_encoding(name)
    position_ids = POSITIONS[positions]
    query, key, value = qkv()
    mask = torch.ones(2, 1, LENGTH, LENGTH, dtype=torch.bool)
    if positions == "padded":
        mask[0, :, :, :3] = False
    inputs = [query, key, value, *encoding.parameters()]

    dense_state = encoding.prepare(position_ids, position_ids, torch.float64, dense=True)
    expected = dense_attention(query, key, value, encoding.bias(query, key, dense_state, 0), mask)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), inputs, materialize_grads=True)

    state = encoding.prepare(position_ids, position_ids, torch.float64, dense=False)
    output = blocked_attention(encoding, state, query, key, value, mask, block_size=3)
    grads = torch.autograd.grad(output.pow(2).sum(), inputs, materialize_grads=True)

    # FIRE's MLP runs in fp32 whatever the model's dtype (by its pieces, in the dense bias and the blocked rows):
    # values and gradients carry fp32 rounding: the bias reaches about 35 here, where fp32's spacing is 4e-6, and the
    # blocks before the threshold read it from the MLP's table of distances (gradients up to 2e-5 apart measured).
    value_atol, grad_atol = (1e-5, 1e-4) if name == "fire" else (1e-9, 1e-8)
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=value_atol)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=grad_atol)


def test_blocked_attention_without_a_mask_is_causal_when_asked(seed):
    encoding = random_encoding("t5", causal=True)
    positions = torch.arange(LENGTH)[None]
    query, key, value = qkv(batch=1)
    causal_mask = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    bias = encoding.bias(query, key, encoding.prepare(positions, positions, torch.float64, dense=True), 0)
    expected = dense_attention(query, key, value, bias, causal_mask)

    state = encoding.prepare(positions, positions, torch.float64, dense=False)
    output = blocked_attention(encoding, state, query, key, value, None, block_size=4, causal=True)

    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-9)


def test_blocked_attention_dropout_backward_replays_the_forward_mask():
    # One fixed seed per call makes the dropped function deterministic, so finite differences check its backward.
    encoding = random_encoding("t5")
    positions = torch.arange(6)[None]
    state = encoding.prepare(positions, positions, torch.float64, dense=False)
    torch.manual_seed(0)
    query, key, value = qkv(batch=1, length=6)

    def dropped(query, key, value, table):
        torch.manual_seed(1)
        return QueryBlockedAttention.apply(
            query, key, value, None, lambda tables, rows: encoding.bias_rows(tables, state, rows), 0, 0.3, 0.25,
            False, 4, table,
        )

    table = encoding.bias_tables(query, key, state, 0)[0].detach().requires_grad_()
    assert torch.autograd.gradcheck(dropped, (query, key, value, table))


def test_blocked_attention_dropout_drops_a_quarter_of_the_weights():
    torch.manual_seed(0)
    length = 64
    value = torch.eye(length, dtype=torch.float64)[None, None].expand(1, 4, -1, -1)
    query = torch.zeros(1, 4, length, length, dtype=torch.float64)
    output = QueryBlockedAttention.apply(
        query, query, value, None, lambda tables, rows: torch.zeros(()), 0, 1.0, 0.25, False, 16,
    )
    # Uniform weights 1/L, each kept with probability 3/4 and rescaled by 4/3.
    assert set(output.unique().tolist()) == {0.0, 4 / 3 / length}
    assert (output == 0).double().mean().item() == pytest.approx(0.25, abs=0.02)


def test_diagonal_rows_reads_a_toeplitz_matrix_and_sums_its_gradient_along_diagonals():
    table = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    start, rows, cols = 12, 5, 8
    expected = torch.stack([table[:, start - r : start - r + cols] for r in range(rows)], dim=1)

    assert torch.equal(DiagonalRows.apply(table, start, rows, cols), expected)
    assert torch.autograd.gradcheck(lambda t: DiagonalRows.apply(t, start, rows, cols), (table,))


@pytest.mark.parametrize("start,cols", [(3, 9), (0, 3), (20, 4), (-4, 12), (4, 3)])
@pytest.mark.parametrize("reader", [SkewedRows, ClippedRows], ids=["copies", "gathers"])
def test_skewed_rows_read_each_row_along_a_clipped_diagonal(reader, start, cols):
    # Two implementations of one map: padded copies (eager blocks) and gathers (a compiled graph).
    table = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    index = (start + torch.arange(cols) - torch.arange(5)[:, None]).clamp(0, 6)
    expected = table.gather(-1, index.expand(2, 3, -1, -1))

    assert torch.equal(reader.apply(table, start, cols), expected)
    assert torch.autograd.gradcheck(lambda t: reader.apply(t, start, cols), (table,))


@pytest.mark.parametrize("rows,cols,low,high", [(5, 7, -3, 3), (7, 5, 2, 9), (4, 6, -20, 20), (6, 6, 0, 0)])
@pytest.mark.parametrize("descending", [False, True])
def test_distance_rows_read_each_row_through_a_monotone_map_of_its_diagonals(rows, cols, low, high, descending):
    table = torch.randn(2, 3, rows, 11, dtype=torch.float64, requires_grad=True)
    diagonal = torch.arange(1 - rows, cols)  # c - r, bottom-left first
    columns = (diagonal.clamp(low, high) - low).clamp(max=10)
    columns = columns.flip(0) if descending else columns
    index = columns[rows - 1 + torch.arange(cols) - torch.arange(rows)[:, None]]
    expected = table.gather(-1, index.expand(2, 3, -1, -1))
    head = int((columns == columns[0]).sum())
    runs = (head, min(int((columns == columns[-1]).sum()), len(columns) - head))

    assert torch.equal(DistanceRows.apply(table, columns, runs, cols), expected)
    assert torch.autograd.gradcheck(lambda t: DistanceRows.apply(t, columns, runs, cols), (table,))
    # Shorter runs than the real ones (what a caller may know for sure) give the same gradient.
    assert torch.autograd.gradcheck(lambda t: DistanceRows.apply(t, columns, (head // 2, 0), cols), (table,))


@pytest.mark.parametrize("falls", [False, True])
@pytest.mark.parametrize("table_batch,index_batch", [(2, 2), (2, 1), (1, 2)])
def test_run_gather_reads_a_monotone_index_and_sums_its_runs_in_backward(falls, table_batch, index_batch):
    table = torch.randn(table_batch, 3, 5, 9, dtype=torch.float64, requires_grad=True)
    # Left and right padding repeat a position: runs of equal entries inside rows, and the clipped runs at the ends.
    positions = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 5, 5]])[:index_batch]
    index = (positions[:, None, :] - torch.arange(5)[None, :, None]).clamp(-4, 4) + 4
    index = index.flip(-1) if falls else index
    batch = max(table_batch, index_batch)
    expected = table.expand(batch, -1, -1, -1).gather(-1, index[:, None].expand(batch, 3, -1, -1))

    assert torch.equal(RunGather.apply(table, index, falls), expected)
    assert torch.autograd.gradcheck(lambda t: RunGather.apply(t, index, falls), (table,))


def shapes_saved_for_backward(model, input_ids) -> list[tuple[int, ...]]:
    """Shapes of the tensors the forward keeps for backward (what a training step holds at its peak)."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        hidden = model(input_ids=input_ids).last_hidden_state
    hidden.sum().backward()
    return shapes


# Long enough for two blocks of queries (below one block the kernel keeps the block's probabilities).
LONG = 600


@pytest.mark.parametrize("name", ["t5", "relative_key", "deberta"])
def test_sdpa_training_on_cpu_keeps_no_query_by_key_tensor_for_backward(seed, name):
    length = LONG
    assert 2 * 4 * length * length > BLOCK_SCORES
    model = RelPosBertModel._from_config(
        tiny_bert_config(position_embedding_type=name), attn_implementation="sdpa"
    ).train()
    input_ids = torch.randint(1, 99, (2, length))
    shapes = shapes_saved_for_backward(model, input_ids)
    assert not [shape for shape in shapes if shape[-2:] == (length, length)]


def test_eager_training_keeps_query_by_key_tensors_for_backward(seed):
    # The check above can fail: the dense reference kernel does keep its scores.
    length = LONG
    model = RelPosBertModel._from_config(
        tiny_bert_config(position_embedding_type="t5"), attn_implementation="eager"
    ).train()
    input_ids = torch.randint(1, 99, (2, length))
    shapes = shapes_saved_for_backward(model, input_ids)
    assert [shape for shape in shapes if shape[-2:] == (length, length)]


@pytest.mark.parametrize("length", [9, LONG], ids=["one-block", "blocks"])
@pytest.mark.parametrize("name", ENCODER_BIAS_ENCODINGS)
def test_encoder_sdpa_training_step_equals_eager_in_loss_and_gradients(seed, name, length):
    config = tiny_bert_config(position_embedding_type=name)
    eager = RelPosBertModel._from_config(copy.deepcopy(config), attn_implementation="eager").train()
    sdpa = RelPosBertModel._from_config(config, attn_implementation="sdpa").train()
    sdpa.load_state_dict(eager.state_dict())
    input_ids = torch.randint(1, 99, (2, length))
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[0, :2] = 0
    losses = []
    for model in (eager, sdpa):
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        loss = (hidden * attention_mask[..., None]).pow(2).mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    for (parameter_name, want), got in zip(eager.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=parameter_name)


@pytest.mark.parametrize("name", BIAS_ENCODINGS)
def test_decoder_sdpa_training_step_equals_eager_in_loss_and_gradients(seed, name):
    config = tiny_gpt_config(name)
    eager = RelPosGPTForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager").train()
    sdpa = RelPosGPTForCausalLM._from_config(config, attn_implementation="sdpa").train()
    sdpa.load_state_dict(eager.state_dict())
    input_ids = torch.randint(3, 99, (2, 10))
    losses = []
    for model in (eager, sdpa):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    for (parameter_name, want), got in zip(eager.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=parameter_name)


def test_sdpa_training_on_cpu_reads_a_dense_bias_only_when_one_block_holds_every_query():
    config = tiny_bert_config(position_embedding_type="t5")
    config._attn_implementation = "sdpa"
    encoding = build_position_encoding(config, causal=False)
    short, long = torch.arange(LENGTH)[None], torch.arange(LONG).expand(2, -1)
    assert not dense_bias(config, encoding, long, long)
    assert dense_bias(config, encoding, short, short)
    with torch.no_grad():
        assert dense_bias(config, encoding, long, long)
    encoding.requires_grad_(False)  # a frozen table: the bias is a constant, torch's fused kernel takes it
    assert dense_bias(config, encoding, long, long)
    encoding.requires_grad_(True)
    assert dense_bias(config, encoding, long.to("meta"), long.to("meta"))  # not CPU: sdpa's own kernels
    config._attn_implementation = "eager"
    assert dense_bias(config, encoding, long, long)
    config._attn_implementation = "flex_attention"
    assert not dense_bias(config, encoding, short, short)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_through_several_blocks_gives_the_same_gradients(seed, use_reentrant):
    model = RelPosBertModel._from_config(
        tiny_bert_config(position_embedding_type="t5"), attn_implementation="sdpa"
    ).train()
    input_ids = torch.randint(1, 99, (2, LONG))

    def gradients():
        model.zero_grad()
        model(input_ids=input_ids).last_hidden_state.pow(2).mean().backward()
        return {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                if parameter.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def frozen(model):
    """`model` with its position encoding's parameters frozen (ALiBi has none)."""
    model.position_encoding.requires_grad_(False)
    return model


@pytest.mark.parametrize("name", ["alibi", "t5"])
def test_sdpa_training_of_a_bias_without_a_gradient_runs_torchs_fused_kernel_and_equals_eager(seed, name):
    # ALiBi has no parameters; a frozen T5 table gets no gradient: the bias is a constant float mask.
    config = tiny_bert_config(position_embedding_type=name)
    eager = frozen(RelPosBertModel._from_config(copy.deepcopy(config), attn_implementation="eager").train())
    sdpa = frozen(RelPosBertModel._from_config(config, attn_implementation="sdpa").train())
    sdpa.load_state_dict(eager.state_dict())
    input_ids = torch.randint(1, 99, (2, LONG))
    attention_mask = torch.ones(2, LONG, dtype=torch.long)
    attention_mask[0, :5] = 0
    losses = []
    for model in (eager, sdpa):
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        loss = (hidden * attention_mask[..., None]).pow(2).mean()
        loss.backward()
        losses.append(loss)
    nodes = autograd_nodes(losses[1])
    # The fused kernel inside the operator that flushes denormal floats around it (`kernels.flushed_attention`).
    assert f"GeneratedBackwardFor_{OPERATORS}_flushed_attention_defaultBackward" in nodes
    assert "QueryBlockedAttentionBackward" not in nodes
    torch.testing.assert_close(losses[1], losses[0])
    for (parameter_name, want), got in zip(eager.named_parameters(), sdpa.parameters(), strict=True):
        if want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=parameter_name)


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("name", ["t5", "kerple"])
def test_training_a_bias_of_the_distance_runs_the_toeplitz_operator_on_torchs_kernel_and_equals_eager(
    seed, name, decoder
):
    # No padding: forward reads the bias's diagonals on torch's fused kernel, backward reduces blocks into them.
    config = tiny_bert_config(position_embedding_type=name, is_decoder=decoder)
    eager = RelPosBertModel._from_config(copy.deepcopy(config), attn_implementation="eager").train()
    sdpa = RelPosBertModel._from_config(config, attn_implementation="sdpa").train()
    sdpa.load_state_dict(eager.state_dict())
    input_ids = torch.randint(1, 99, (2, LONG))
    eager(input_ids=input_ids).last_hidden_state.pow(2).mean().backward()
    with torch.profiler.profile() as profile:
        hidden = sdpa(input_ids=input_ids).last_hidden_state
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in {event.name for event in profile.events()}
    assert any(node.endswith("_toeplitz_attention_defaultBackward") for node in autograd_nodes(hidden))
    hidden.pow(2).mean().backward()
    for (parameter_name, want), got in zip(eager.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=parameter_name)
