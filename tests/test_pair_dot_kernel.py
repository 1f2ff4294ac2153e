"""The decode bias of the content encodings by a C kernel (`kernels.pair_dot`): each pair's key, query and table rows
read once, equal to the formula, and taken by deberta and relative_key_query decode steps that need no gradient."""

import pytest
import torch
from conftest import tiny_gpt_config

from hf_relpos import RelPosGPTForCausalLM
from hf_relpos.encodings import build_position_encoding
from hf_relpos.kernels import cpu_kernels, pair_dot, pair_dot_applies


pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="no C compiler builds the CPU kernels")

BATCH, HEADS, QUERIES, KEYS, ROWS = 2, 3, 2, 21, 11


def formula(query, key, query_rows, key_rows, index, scale) -> torch.Tensor:
    """`scale (q_i . query_rows[h, r] + k_j . key_rows[h, r])`, `r = index[b, i, j]`, by advanced indexing."""
    index = index.expand(BATCH, -1, -1)
    heads = torch.arange(HEADS)[:, None, None, None]
    bias = 0
    if query is not None:
        rows = query_rows.expand(HEADS, -1, -1)[heads, index]  # [heads, batch, q, k, d]
        bias = bias + (rows * query.transpose(0, 1)[:, :, :, None]).sum(-1)
    if key is not None:
        rows = key_rows.expand(HEADS, -1, -1)[heads, index]
        bias = bias + (rows * key.transpose(0, 1)[:, :, None]).sum(-1)
    return scale * bias.transpose(0, 1)


@pytest.mark.parametrize("dim", [8, 40, 64])  # below, across and at multiples of the kernel's 16 lanes
@pytest.mark.parametrize("terms", ["both", "query", "key"])
@pytest.mark.parametrize("table_heads", [1, HEADS])
@pytest.mark.parametrize("index_batch", [1, BATCH])
def test_pair_dot_equals_the_formula_per_pair(seed, dim, terms, table_heads, index_batch):
    query, key = torch.randn(BATCH, HEADS, QUERIES, dim), torch.randn(BATCH, HEADS, KEYS, dim)
    query_rows, key_rows = torch.randn(table_heads, ROWS, dim), torch.randn(table_heads, ROWS, dim)
    index = torch.randint(0, ROWS, (index_batch, QUERIES, KEYS))
    if terms == "query":
        key, key_rows = None, None
    if terms == "key":
        query, query_rows = None, None
    got = pair_dot(query, key, query_rows, key_rows, index, 0.3)
    torch.testing.assert_close(got, formula(query, key, query_rows, key_rows, index, 0.3))


def test_pair_dot_reads_transposed_inputs_as_their_values(seed):
    query = torch.randn(BATCH, QUERIES, HEADS, 16).transpose(1, 2)
    key = torch.randn(BATCH, KEYS, HEADS, 16).transpose(1, 2)
    rows = torch.randn(ROWS, HEADS, 16).transpose(0, 1)
    index = torch.randint(0, ROWS, (BATCH, QUERIES, KEYS), dtype=torch.int32)
    torch.testing.assert_close(pair_dot(query, key, rows, rows, index, 1.0),
                               formula(query, key, rows, rows, index.long(), 1.0))


@pytest.mark.parametrize("bad", [-1, ROWS])
def test_pair_dot_rejects_an_index_outside_the_rows(bad):
    index = torch.zeros(1, 1, KEYS, dtype=torch.long)
    index[0, 0, 5] = bad
    with pytest.raises(IndexError, match=f"outside the {ROWS} rows"):
        pair_dot(torch.randn(1, HEADS, 1, 8), None, torch.randn(HEADS, ROWS, 8), None, index, 1.0)


def test_pair_dot_rejects_tables_of_another_head_count():
    with pytest.raises(ValueError, match="do not fit"):
        pair_dot(torch.randn(1, HEADS, 1, 8), None, torch.randn(HEADS + 1, ROWS, 8), None,
                 torch.zeros(1, 1, KEYS, dtype=torch.long), 1.0)


def test_pair_dot_applies_to_fp32_cpu_tensors_that_need_no_gradient():
    table = torch.nn.Parameter(torch.randn(ROWS, 8))
    query = torch.randn(1, HEADS, 1, 8)
    assert not pair_dot_applies(query, table)  # autograd would need the table's gradient
    assert pair_dot_applies(query, table.detach())
    with torch.no_grad():
        assert pair_dot_applies(query, table)
        assert not pair_dot_applies(query.bfloat16(), table)


@pytest.mark.parametrize("name", ["deberta", "relative_key_query"])
@pytest.mark.parametrize("causal", [False, True])
def test_a_decode_step_without_autograd_takes_the_kernel_and_equals_the_table_bias(seed, name, causal):
    config = tiny_gpt_config(name, n_embd=96, n_head=3)  # head_dim 32: two of the kernel's runs of 16 lanes
    encoding = build_position_encoding(config, causal=causal)
    encoding.init_weights(config)
    with torch.no_grad():
        for parameter in encoding.parameters():
            parameter.normal_()
    key_positions = torch.stack([torch.arange(20), torch.arange(20) + 3])
    query, key = torch.randn(2, 3, 1, 32), torch.randn(2, 3, 20, 32)
    state = encoding.prepare(key_positions[:, -1:], key_positions, torch.float32)
    with torch.no_grad():
        assert pair_dot_applies(query, key, *(p for p in encoding.parameters()))
        got = encoding.bias(query, key, state, 0)
        expected = encoding.bias_rows(encoding.bias_tables(query, key, state, 0), state)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["deberta", "relative_key_query"])
def test_greedy_generation_on_the_kernel_equals_the_full_forward(seed, name):
    model = RelPosGPTForCausalLM(tiny_gpt_config(name, n_embd=64, n_head=2)).eval()
    prompt = torch.randint(3, 99, (1, 7))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        logits = model(generated).logits
    # Each generated token is the argmax of the full forward over the tokens before it.
    torch.testing.assert_close(generated[0, 7:], logits[0, 6:-1].argmax(-1))
