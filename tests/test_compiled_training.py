"""Compiled training, `torch.compile(model, fullgraph=True)` over the sdpa kernel, every encoding: a bias is computed
in the compiled graph and, when it needs a gradient, added by eager's GEMM (inductor fuses its passes); a bias of
`j - i` without padding runs the Toeplitz operator instead. The step equals the eager kernel's in loss and gradients.
Compilation takes seconds to tens of seconds per encoding on CPU, hence `slow`."""

import copy

import pytest
import torch
from conftest import ENCODER_ENCODINGS, tiny_bert_config, tiny_gpt_config

from hf_relpos import POSITION_ENCODINGS, RelPosBertModel, RelPosGPTModel
from hf_relpos.attention import causal_bias
from hf_relpos.kernels import OPERATORS


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def assert_compiled_step_equals_eager(model_class, config, loss_of) -> set[str]:
    """One step of `loss_of(model)` on the eager kernel and on `torch.compile` over sdpa with the same weights: the
    compiled step must give eager's loss and every gradient, in one graph (`fullgraph`: nothing falls back to
    Python between layers). Returns the names of the ops the compiled step ran."""
    torch._dynamo.reset()  # each test's model is new code to guard on: no recompile limit carried across tests
    eager = model_class._from_config(copy.deepcopy(config), attn_implementation="eager").train()
    sdpa = model_class._from_config(config, attn_implementation="sdpa").train()
    sdpa.load_state_dict(eager.state_dict())
    losses = []
    for model in (eager, torch.compile(sdpa, dynamic=False, fullgraph=True)):
        with torch.profiler.profile() as profile:
            loss = loss_of(model)
            loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    for (parameter_name, want), got in zip(eager.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=parameter_name)
    return {event.name for event in profile.events()}


@pytest.mark.parametrize("name", ENCODER_ENCODINGS)
def test_compiled_sdpa_training_step_equals_eager_in_loss_and_gradients(seed, name):
    input_ids = torch.randint(1, 99, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, :3] = 0

    def loss_of(model):
        output = model(input_ids=input_ids, attention_mask=attention_mask)
        return (output.last_hidden_state * attention_mask[..., None]).pow(2).mean() + output.pooler_output.mean()

    assert_compiled_step_equals_eager(
        RelPosBertModel, tiny_bert_config(position_embedding_type=name, num_hidden_layers=1), loss_of
    )


@pytest.mark.parametrize("name", list(POSITION_ENCODINGS))
def test_compiled_sdpa_decoder_training_step_equals_eager_without_a_padding_mask(seed, name):
    # Without padding, sdpa's masks leave causality to `is_causal`; a bias that trains carries it instead (the
    # Toeplitz operator's diagonals, or the bias of eager's kernel), so a later key leaking into an earlier query
    # would change the loss.
    config = tiny_gpt_config(name, n_layer=1)
    input_ids, weights = torch.randint(1, 99, (2, 12)), torch.randn(2, 12, config.n_embd)

    assert_compiled_step_equals_eager(
        RelPosGPTModel, config, lambda model: (model(input_ids=input_ids).last_hidden_state * weights).mean()
    )


@pytest.mark.parametrize("name", ["t5", "kerple"])
def test_compiled_training_of_a_bias_of_the_distance_without_padding_runs_the_toeplitz_operator(seed, name):
    # No padding and no position_ids: the positions are consecutive by construction, known without reading them.
    config = tiny_bert_config(position_embedding_type=name, num_hidden_layers=1)
    input_ids, weights = torch.randint(1, 99, (2, 12)), torch.randn(2, 12, config.hidden_size)

    def loss_of(model):
        # The pooler too: a compiled step gives an unused output's parameters zero gradients, eager gives None.
        output = model(input_ids=input_ids)
        return (output.last_hidden_state * weights).mean() + output.pooler_output.mean()

    ops = assert_compiled_step_equals_eager(RelPosBertModel, config, loss_of)
    assert {f"{OPERATORS}::toeplitz_attention", f"{OPERATORS}::toeplitz_attention_backward"} <= ops


def test_compiled_alibi_training_without_padding_reads_its_diagonals_on_torchs_fused_kernel(seed):
    config = tiny_gpt_config("alibi", n_layer=1)
    input_ids, weights = torch.randint(1, 99, (2, 12)), torch.randn(2, 12, config.n_embd)

    ops = assert_compiled_step_equals_eager(
        RelPosGPTModel, config, lambda model: (model(input_ids=input_ids).last_hidden_state * weights).mean()
    )
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops


def test_compiled_sdpa_encoder_training_step_stays_bidirectional_without_a_padding_mask(seed):
    # The other side of the decoder test: an encoder's queries keep seeing later keys when no mask is given.
    config = tiny_bert_config(position_embedding_type="relative_key_query", num_hidden_layers=1)
    input_ids, weights = torch.randint(1, 99, (2, 12)), torch.randn(2, 12, config.hidden_size)

    def loss_of(model):
        output = model(input_ids=input_ids)
        return (output.last_hidden_state * weights).mean() + output.pooler_output.mean()

    assert_compiled_step_equals_eager(RelPosBertModel, config, loss_of)


@pytest.mark.parametrize("name,tables", [
    ("relative_key", dict(max_relative_positions=3)),
    ("relative_key_query", dict(max_relative_positions=3)),
    ("deberta", dict(position_buckets=4, max_relative_positions=6)),
    ("deberta", dict(position_buckets=0, max_relative_positions=3)),
])
def test_compiled_content_bias_without_padding_equals_eager_past_its_clipped_distances(seed, name, tables):
    # Consecutive positions: the compiled graph reads the tables along clipped diagonals (`clipped_bias`), here with
    # distances of 19 past reaches of 3-6, in an encoder and a decoder.
    input_ids = torch.randint(1, 99, (2, 20))
    config = tiny_bert_config(position_embedding_type=name, num_hidden_layers=1, **tables)
    weights = torch.randn(2, 20, config.hidden_size)

    def loss_of(model):
        output = model(input_ids=input_ids)
        return (output.last_hidden_state * weights).mean() + output.pooler_output.mean()

    assert_compiled_step_equals_eager(RelPosBertModel, config, loss_of)
    assert_compiled_step_equals_eager(
        RelPosGPTModel, tiny_gpt_config(name, n_layer=1, **tables),
        lambda model: (model(input_ids=input_ids).last_hidden_state * weights).mean(),
    )


def test_causal_bias_masks_the_keys_after_each_query_with_the_cached_keys_first():
    # 4 queries after 3 cached keys: query i sees keys 0 .. i + 3.
    bias = torch.randn(2, 3, 4, 7)

    got = causal_bias(bias, 7)

    for i in range(4):
        for j in range(7):
            want = bias[..., i, j] if j <= i + 3 else torch.full((2, 3), torch.finfo(bias.dtype).min)
            torch.testing.assert_close(got[..., i, j], want)


def test_compiled_alibi_training_with_dropout_and_padding_runs_the_flushing_operator_as_eager_does(seed):
    # Both steps draw the operator's dropout mask from the same seeded generator, so they drop the same weights.
    torch._dynamo.reset()
    config = tiny_bert_config(position_embedding_type="alibi", num_hidden_layers=1, attention_probs_dropout_prob=0.2)
    uncompiled = RelPosBertModel._from_config(config, attn_implementation="sdpa").train()
    model = copy.deepcopy(uncompiled)
    input_ids, attention_mask = torch.randint(1, 99, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, :3] = 0
    losses = []
    for step in (uncompiled, torch.compile(model, dynamic=False, fullgraph=True)):
        torch.manual_seed(1)
        with torch.profiler.profile() as profile:
            output = step(input_ids=input_ids, attention_mask=attention_mask)
            loss = (output.last_hidden_state * attention_mask[..., None]).pow(2).mean() + output.pooler_output.mean()
            loss.backward()
        losses.append(loss)
    ops = {event.name for event in profile.events()}
    assert {f"{OPERATORS}::flushed_dropout_attention", f"{OPERATORS}::flushed_dropout_attention_backward"} <= ops
    torch.testing.assert_close(losses[1], losses[0])
    for (parameter_name, want), got in zip(uncompiled.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=parameter_name)
