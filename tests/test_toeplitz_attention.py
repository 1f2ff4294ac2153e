"""sdpa on CPU with a bias of `j - i` alone (ALiBi, T5, KERPLE): the fused kernel reads the bias from its
`[heads, q_len + k_len - 1]` diagonals, through a strided view over reversed queries, and gives eager's outputs and
gradients without a `[q_len, k_len]` mask. A bias that trains goes through the Toeplitz operator
(`kernels.toeplitz_attention`), whose backward gives the diagonals their gradient. With a padding mask, the mask is
folded into a bias without a gradient once per forward for every layer."""

import copy
import importlib.util
import shutil

import pytest
import torch
from conftest import autograd_nodes, tiny_bert_config, tiny_gpt_config, tiny_llama_config
from torch.autograd.graph import saved_tensors_hooks
from transformers import DynamicCache
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

import hf_relpos.attention
import hf_relpos.kernels
from hf_relpos import RelPosBertModel, RelPosGPTForCausalLM, RelPosLlamaForCausalLM
from hf_relpos.attention import consecutive_offset, position_state, toeplitz_attention_forward
from hf_relpos.encodings import PositionState, alibi_slopes, build_position_encoding
from hf_relpos.kernels import (
    OPERATORS,
    denormals_flushed,
    flushed_attention,
    flushed_denormals,
    flushed_dropout_attention,
    toeplitz_attention,
    toeplitz_mask,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOEPLITZ_ENCODINGS = ["alibi", "t5", "kerple"]
LENGTH = 40


def sdpa_config(name: str, **overrides):
    config = tiny_bert_config(position_embedding_type=name, **overrides)
    config._attn_implementation = "sdpa"
    return config


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("name", TOEPLITZ_ENCODINGS)
def test_toeplitz_bias_entry_q_len_minus_1_minus_i_plus_j_is_the_bias_of_query_i_and_key_j(name, causal):
    encoding = build_position_encoding(tiny_bert_config(position_embedding_type=name), causal)
    with torch.no_grad():
        for parameter in encoding.parameters():
            parameter.copy_(torch.rand_like(parameter) + 0.1)
    # A decode-like step: 5 queries after 12 cached keys, then 3 more slots.
    query_positions, key_positions = torch.arange(12, 17)[None], torch.arange(20)[None]
    state = PositionState(query_positions, key_positions, dense=True)
    diagonals = encoding.toeplitz_bias(state)
    assert diagonals.shape == (4, 5 + 20 - 1)
    i, j = torch.meshgrid(torch.arange(5), torch.arange(20), indexing="ij")
    dense = encoding.dense_bias(state)[0]
    torch.testing.assert_close(diagonals[:, 4 - i + j], dense)


def test_alibi_toeplitz_bias_is_minus_slope_times_distance():
    encoding = build_position_encoding(tiny_bert_config(position_embedding_type="alibi"), causal=False)
    state = PositionState(torch.arange(3)[None], torch.arange(3)[None])
    # Entries m = 0..4 are the distances -2..2.
    want = -torch.tensor([2.0, 1.0, 0.0, 1.0, 2.0]) * alibi_slopes(4)[:, None]
    torch.testing.assert_close(encoding.toeplitz_bias(state), want)


def test_sdpa_reads_the_diagonals_only_for_a_constant_bias_without_padding_on_cpu():
    positions = torch.arange(LENGTH).expand(2, -1)

    def state(name="alibi", mask=None, positions=positions, frozen=False, implementation="sdpa", grad=True,
              checkpointing=False):
        config = sdpa_config(name)
        config._attn_implementation = implementation
        encoding = build_position_encoding(config, causal=False).requires_grad_(not frozen)
        with torch.set_grad_enabled(grad):
            return position_state(config, encoding, positions, positions, torch.float32, checkpointing,
                                  attention_mask=mask)

    assert state().tables["toeplitz"].shape == (4, 2 * LENGTH - 1)
    assert not state().dense
    assert "toeplitz" in state("t5", frozen=True).tables
    assert "toeplitz" in state("kerple", grad=False).tables
    assert state("t5").tables["toeplitz"].requires_grad  # its table trains: the diagonals carry its gradient
    assert "toeplitz" not in state("t5", checkpointing=True).tables  # each checkpointed layer builds its own
    assert "toeplitz" in state(checkpointing=True).tables  # ALiBi has nothing to rebuild
    assert "toeplitz" not in state("fire", grad=False).tables  # past the threshold FIRE depends on the query
    assert "toeplitz" not in state(mask=torch.zeros(2, 1, LENGTH, LENGTH)).tables  # padding: a dense mask
    assert "toeplitz" not in state(implementation="eager").tables
    restarted = torch.cat((torch.arange(LENGTH // 2), torch.arange(LENGTH // 2))).expand(2, -1)
    assert "bias" in state(positions=restarted).tables  # packed sequences: no single diagonal per distance


def test_a_causal_encodings_diagonals_mask_the_keys_after_the_query():
    config = sdpa_config("alibi", is_decoder=True)
    encoding = build_position_encoding(config, causal=True)
    positions = torch.arange(6)[None]
    diagonals = position_state(config, encoding, positions, positions, torch.float32).tables["toeplitz"]
    # Entries 0..10 are the distances -5..5; the last five are keys after the query.
    assert (diagonals[:, 6:] == torch.finfo(torch.float32).min).all()
    torch.testing.assert_close(diagonals[:, :6], encoding.toeplitz_bias(
        PositionState(positions, positions))[:, :6])


def test_toeplitz_attention_equals_softmax_with_the_dense_bias_in_value_and_gradient(seed):
    query, key, value = (torch.randn(2, 4, LENGTH, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    distance = torch.arange(LENGTH)[None, :] - torch.arange(LENGTH)[:, None]
    slopes = torch.rand(4, 1, 1, dtype=torch.float64)
    dense = -slopes * distance.abs()
    diagonals = -slopes[:, 0] * torch.arange(1 - LENGTH, LENGTH).abs()
    scores = query @ key.transpose(-1, -2) * 8**-0.5 + dense
    want = (scores.softmax(-1) @ value).transpose(1, 2)
    got, _ = toeplitz_attention_forward(torch.nn.Module(), query, key, value, diagonals, 8**-0.5)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    for got_grad, want_grad in zip(torch.autograd.grad(got, (query, key, value), grad),
                                   torch.autograd.grad(want, (query, key, value), grad), strict=True):
        torch.testing.assert_close(got_grad, want_grad)


def tiny_product(x: torch.Tensor) -> torch.Tensor:
    """`x * 1e-40` in two normal factors: a denormal result unless denormals are flushed."""
    return x * 1e-20 * 1e-20


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_denormals_are_flushed_inside_the_block_and_the_callers_mode_restored(caller_flushes):
    torch.set_flush_denormal(caller_flushes)
    try:
        assert (tiny_product(torch.ones(3)) == 0).all() == caller_flushes
        with flushed_denormals():
            assert (tiny_product(torch.ones(3)) == 0).all()
        assert denormals_flushed() == caller_flushes
    finally:
        torch.set_flush_denormal(False)


def alibi_case(length: int = 300):
    """Queries, keys and values, and ALiBi-like diagonals steep enough that distant keys' probabilities are
    denormal in fp32 (a bias down to -150)."""
    query, key, value = (torch.randn(2, 3, length, 16, requires_grad=True) for _ in range(3))
    slopes = torch.tensor([0.5, 0.1, 0.01])[:, None]
    diagonals = -slopes * torch.arange(1 - length, length).abs()
    return query, key, value, diagonals


def padded_alibi_mask(diagonals: torch.Tensor, length: int) -> torch.Tensor:
    """The dense bias of `diagonals` (queries in order) for a batch of two, the second one's last 50 keys padding:
    `[2, heads, length, length]`, as `masked_bias` folds it."""
    dense = diagonals[:, (length - 1) - torch.arange(length)[:, None] + torch.arange(length)]
    mask = dense.expand(2, -1, -1, -1).clone()
    mask[1, ..., length - 50:] = torch.finfo(torch.float32).min
    return mask


@pytest.mark.parametrize("mask_kind", ["diagonals", "dense"])
@pytest.mark.parametrize("caller_flushes", [False, True])
def test_flushed_attention_equals_softmax_with_its_mask_and_leaves_the_callers_mode(seed, caller_flushes, mask_kind):
    query, key, value, diagonals = alibi_case()
    dense = padded_alibi_mask(diagonals, query.shape[2])
    # Entry (q_len - 1 - i) + j of the diagonals is the bias of query i and key j (the queries in reverse order); the
    # diagonals have no padding, so their dense form is the first sequence's.
    reversed_queries = mask_kind == "diagonals"
    if reversed_queries:
        dense = dense[:1]
    want = ((query.double() @ key.double().transpose(-1, -2) * 0.25 + dense.double()).softmax(-1) @ value.double())
    grad = torch.randn_like(want)
    torch.set_flush_denormal(caller_flushes)
    try:
        if reversed_queries:
            got = flushed_attention(query.flip(2), key, value, diagonals, 0.25)[0].flip(2)
        else:
            got = flushed_attention(query, key, value, dense, 0.25)[0]
        assert denormals_flushed() == caller_flushes
        grads = torch.autograd.grad(got, (query, key, value), grad.float())
        assert denormals_flushed() == caller_flushes
    finally:
        torch.set_flush_denormal(False)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, torch.autograd.grad(want, (query, key, value), grad), strict=True):
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["diagonals", "dense"])
def test_flushed_dropout_attention_equals_softmax_with_the_mask_dropped_where_it_says(seed, mask_kind):
    query, key, value, diagonals = alibi_case()
    length = query.shape[2]
    # Entry (q_len - 1 - i) + j of the diagonals is the bias of query i and key j (the queries in reverse order).
    mask, reversed_queries = ((diagonals, True) if mask_kind == "diagonals"
                              else (padded_alibi_mask(diagonals, length), False))
    dense = padded_alibi_mask(diagonals, length)[:1] if reversed_queries else mask
    ordered = query.flip(2) if reversed_queries else query
    output, probabilities, _, kept = flushed_dropout_attention(ordered, key, value, mask, 0.25, 0.2)
    assert not denormals_flushed()
    assert kept.unique().tolist() == [0.0, pytest.approx(1 / 0.8)]
    assert (kept > 0).float().mean().item() == pytest.approx(0.8, abs=0.01)
    weights = (query.double() @ key.double().transpose(-1, -2) * 0.25 + dense.double()).softmax(-1)
    ordered_kept = kept.flip(2) if reversed_queries else kept
    want = (weights * ordered_kept) @ value.double()
    got = output.flip(2) if reversed_queries else output
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    assert (probabilities[probabilities < torch.finfo(torch.float32).tiny] == 0).all()  # flushed, not denormal
    grad = torch.randn_like(want)
    grads = torch.autograd.grad(got, (query, key, value), grad.float())
    assert not denormals_flushed()
    for ours, theirs in zip(grads, torch.autograd.grad(want, (query, key, value), grad), strict=True):
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)


def test_flushed_dropout_attention_passes_torchs_custom_operator_checks(seed):
    # Its dropout mask is random: the checks that compare two calls' outputs do not apply.
    query, key, value, diagonals = alibi_case(length=60)
    torch.library.opcheck(flushed_dropout_attention, (query, key, value, padded_alibi_mask(diagonals, 60), 0.25, 0.2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("mask_kind", ["diagonals", "dense"])
def test_flushed_attention_passes_torchs_custom_operator_checks(seed, mask_kind):
    query, key, value, diagonals = alibi_case(length=60)
    mask = diagonals if mask_kind == "diagonals" else padded_alibi_mask(diagonals, 60)
    torch.library.opcheck(flushed_attention, (query, key, value, mask, 0.25))


def test_training_alibi_on_the_diagonals_leaves_the_callers_denormal_mode_as_it_was(seed):
    model = RelPosBertModel(sdpa_config("alibi")).train()
    model.set_attn_implementation("sdpa")
    state = position_state(model.config, model.position_encoding, torch.arange(LENGTH)[None],
                           torch.arange(LENGTH)[None], torch.float32)
    assert "toeplitz" in state.tables  # the fused kernel over the diagonals, which flushes
    model(torch.randint(1, 99, (1, LENGTH))).last_hidden_state.sum().backward()
    assert not denormals_flushed()


def toeplitz_inputs(length: int = 10):
    query, key, value = (torch.randn(2, 3, length, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    return query, key, value, torch.randn(3, 2 * length - 1, dtype=torch.float64, requires_grad=True)


def test_the_toeplitz_operator_equals_softmax_with_the_dense_bias_in_value_and_every_gradient(seed):
    query, key, value, diagonals = toeplitz_inputs(LENGTH)
    i, j = torch.meshgrid(torch.arange(LENGTH), torch.arange(LENGTH), indexing="ij")
    dense = diagonals[:, LENGTH - 1 - i + j]
    want = (query @ key.transpose(-1, -2) * 0.3 + dense).softmax(-1) @ value
    got = toeplitz_attention(query, key, value, diagonals, 0.3, 16)  # 16 queries per block: three blocks
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    inputs = (query, key, value, diagonals)
    for got_grad, want_grad in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad),
                                   strict=True):
        torch.testing.assert_close(got_grad, want_grad)


def test_the_toeplitz_operator_passes_torchs_custom_operator_checks(seed):
    # Schema, fake (meta) kernel with the real strides, autograd registration: what torch.compile relies on.
    torch.library.opcheck(toeplitz_attention, (*toeplitz_inputs(), 0.3, 4))
    torch.library.opcheck(toeplitz_attention, (*toeplitz_inputs(), 0.3, 4, 0.25, torch.tensor(7)))


def test_the_toeplitz_operators_dropout_backward_replays_the_forward_mask(seed):
    # One seed per call makes the dropped function deterministic, so finite differences check its backward.
    def dropped(query, key, value, diagonals):
        return toeplitz_attention(query, key, value, diagonals, 0.3, 4, 0.25, torch.tensor(11))

    assert torch.autograd.gradcheck(dropped, toeplitz_inputs())


def test_a_second_copy_of_the_kernels_file_registers_operators_of_its_own(tmp_path):
    # A checkpoint's remote code is another copy of kernels.py, maybe of another release, in the same process.
    copied = tmp_path / "kernels.py"
    shutil.copy(hf_relpos.kernels.__file__, copied)
    copied.write_text(copied.read_text() + "\n# another release\n")
    spec = importlib.util.spec_from_file_location("another_release_kernels", copied)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    assert other.OPERATORS != OPERATORS
    query, key, value, diagonals = toeplitz_inputs()
    want = (query @ key.transpose(-1, -2) * 0.3 + toeplitz_mask(diagonals, 10, 10).flip(2)).softmax(-1) @ value
    torch.testing.assert_close(getattr(torch.ops, OPERATORS).toeplitz_attention(query, key, value, diagonals, 0.3, 4),
                               want)
    torch.testing.assert_close(other.toeplitz_attention(query, key, value, diagonals, 0.3, 4), want)


def test_positions_the_model_builds_itself_have_a_known_offset():
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
    assert consecutive_offset(None, None, None) == 0
    # The new tokens follow the cached ones: key slot j and query i are j - (i + 5) apart.
    assert consecutive_offset(None, None, cache) == -5
    assert PositionState(torch.arange(5, 8)[None], torch.arange(8)[None]).uniform_offset == -5
    assert consecutive_offset(torch.ones(1, 6), None, None) is None  # padding decides them: read on the host
    assert consecutive_offset(None, torch.arange(6)[None], None) is None  # the caller's, whatever they are


def eager_and_sdpa(model_class, config):
    eager = model_class._from_config(copy.deepcopy(config), attn_implementation="eager")
    sdpa = model_class._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    return eager, sdpa


MODELS = {
    "encoder": lambda name: (RelPosBertModel, tiny_bert_config(position_embedding_type=name)),
    "gpt": lambda name: (RelPosGPTForCausalLM, tiny_gpt_config(name)),
    "llama": lambda name: (RelPosLlamaForCausalLM, tiny_llama_config(name)),  # grouped-query attention
}


@pytest.mark.parametrize("layout", list(MODELS))
@pytest.mark.parametrize("name", TOEPLITZ_ENCODINGS)
def test_inference_on_the_diagonals_equals_eager(seed, name, layout):
    eager, sdpa = (model.eval() for model in eager_and_sdpa(*MODELS[layout](name)))
    input_ids = torch.randint(3, 99, (2, LENGTH))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(input_ids=input_ids)[0], eager(input_ids=input_ids)[0])


def saved_query_by_key_storages(model, input_ids) -> list[int]:
    """Elements of the storage behind each `[..., len, len]` tensor the forward keeps for backward."""
    sizes = []

    def pack(tensor):
        if tensor.shape[-2:] == input_ids.shape[-1:] * 2:
            sizes.append(tensor.untyped_storage().nbytes() // tensor.element_size())
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(input_ids=input_ids)[0]
    output.pow(2).mean().backward()
    return sizes


@pytest.mark.parametrize("layout", list(MODELS))
def test_alibi_training_on_the_diagonals_equals_eager_and_keeps_no_query_by_key_mask(seed, layout):
    eager, sdpa = (model.train() for model in eager_and_sdpa(*MODELS[layout]("alibi")))
    input_ids = torch.randint(3, 99, (2, LENGTH))
    eager(input_ids=input_ids)[0].pow(2).mean().backward()
    # The fused kernel's operator keeps the diagonals themselves for backward, and no `[len, len]` tensor.
    assert saved_query_by_key_storages(sdpa, input_ids) == []
    for (parameter_name, want), got in zip(eager.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=parameter_name)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["without-dropout", "dropout"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_alibi_training_takes_a_flushed_kernel_padded_or_not_with_dropout_or_not(seed, padded, dropout):
    config = tiny_bert_config(position_embedding_type="alibi", attention_probs_dropout_prob=dropout)
    model = RelPosBertModel._from_config(config, attn_implementation="sdpa").train()
    attention_mask = torch.ones(2, LENGTH, dtype=torch.long)
    attention_mask[1, LENGTH - 9:] = 0 if padded else 1
    output = model(input_ids=torch.randint(3, 99, (2, LENGTH)), attention_mask=attention_mask)[0]
    operator = "flushed_attention" if dropout == 0.0 else "flushed_dropout_attention"
    attention = {name for name in autograd_nodes(output) if "ttention" in name}
    assert attention == {f"GeneratedBackwardFor_{OPERATORS}_{operator}_defaultBackward"}


@pytest.mark.parametrize("layout", list(MODELS))
def test_alibi_training_with_padding_on_the_flushed_kernel_equals_eager(seed, layout):
    eager, sdpa = (model.train() for model in eager_and_sdpa(*MODELS[layout]("alibi")))
    input_ids = torch.randint(3, 99, (2, LENGTH))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :7] = 0  # left padding, as a decoder's batch has it (and an encoder takes it as well)
    outputs = [model(input_ids=input_ids, attention_mask=attention_mask)[0] for model in (eager, sdpa)]
    assert denormals_flushed() is False
    for output in outputs:
        output[attention_mask.bool()].pow(2).mean().backward()
    torch.testing.assert_close(outputs[1][attention_mask.bool()], outputs[0][attention_mask.bool()])
    for (parameter_name, want), got in zip(eager.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=parameter_name)


def test_static_cache_generation_reads_the_diagonals_and_masks_the_empty_slots(seed):
    # A static cache's prefill attends over all its slots without a mask: the empty ones sit at positive distances.
    model = RelPosGPTForCausalLM._from_config(tiny_gpt_config("alibi"), attn_implementation="sdpa").eval()
    input_ids = torch.randint(3, 99, (1, 7))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(input_ids))
    dynamic = model.generate(input_ids, **kwargs)
    static = model.generate(input_ids, cache_implementation="static", **kwargs)
    model.set_attn_implementation("eager")
    torch.testing.assert_close(static, dynamic, rtol=0, atol=0)
    torch.testing.assert_close(model.generate(input_ids, **kwargs), dynamic, rtol=0, atol=0)


def test_output_attentions_on_the_diagonals_says_that_sdpa_returns_no_weights():
    model = RelPosBertModel._from_config(tiny_bert_config(position_embedding_type="alibi"),
                                         attn_implementation="sdpa").eval()
    logging.warning_once.cache_clear()  # the warning is emitted once per process
    with CaptureLogger(logging.get_logger(hf_relpos.attention.__name__)) as captured, torch.no_grad():
        model(input_ids=torch.randint(3, 99, (1, 9)), output_attentions=True)
    assert "eager" in captured.out and "output_attentions" in captured.out


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_padding_mask_is_folded_into_a_constant_bias_once_for_every_layer(implementation):
    config = sdpa_config("alibi")
    config._attn_implementation = implementation
    encoding = build_position_encoding(config, causal=False)
    positions = torch.stack((torch.arange(6), torch.tensor([0, 0, 0, 1, 2, 3])))  # the second row: two pads on the left
    allowed = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    allowed[1, ..., :2] = False
    state = position_state(config, encoding, positions, positions, torch.float32, attention_mask=allowed)
    assert "bias" not in state.tables
    bias = encoding.dense_bias(PositionState(positions, positions))
    want = torch.where(allowed, bias, torch.finfo(torch.float32).min)
    torch.testing.assert_close(state.tables["masked_bias"], want, rtol=0, atol=0)
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~allowed, torch.finfo(torch.float32).min)
    state = position_state(config, encoding, positions, positions, torch.float32, attention_mask=additive)
    torch.testing.assert_close(state.tables["masked_bias"], bias + additive, rtol=0, atol=0)


def test_a_bias_that_trains_keeps_its_mask_apart():
    config = sdpa_config("t5")
    encoding = build_position_encoding(config, causal=False)
    positions = torch.arange(6).expand(2, -1)
    state = position_state(config, encoding, positions, positions, torch.float32,
                           attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool))
    assert "masked_bias" not in state.tables
