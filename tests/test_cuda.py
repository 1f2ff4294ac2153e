"""The GPU kernels: on CUDA every encoding trains on flex attention (its `score_mod`, compiled to a Triton kernel,
backward included) and on sdpa (the bias as a float mask) with the loss and gradients of the eager reference, its
learnable tables included, with left padding (a dense content bias is a gather by a monotone index, `RunGather`) and
with consecutive positions (read along its diagonals, `DistanceRows`); a flex KV-cache generation agrees with the
full forward; DistanceRows and RunGather equal a gather on the GPU, gradients included.

Skipped where torch sees no GPU (CI has none): run `python -m pytest tests/test_cuda.py` on a GPU machine.
"""

import copy

import pytest
import torch
from conftest import ENCODER_ENCODINGS, tiny_bert_config, tiny_gpt_config, tiny_llama_config

from hf_relpos import POSITION_ENCODINGS, RelPosBertModel, RelPosGPTForCausalLM, RelPosLlamaForCausalLM
from hf_relpos.encodings import PositionEncoding
from hf_relpos.kernels import DistanceRows, RunGather


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
TRAINED_KERNELS = ("flex_attention", "sdpa")
DECODER_ENCODINGS = list(POSITION_ENCODINGS)
# Four heads of 16: flex's Triton kernels need a head_dim of at least 16.
WIDTHS = {"hidden_size": 64}


def token_batch(length: int = 40, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences, the second left-padded by 7 tokens (`padded`; else consecutive positions, which dense biases
    read along diagonals); longer than one 16-token block and not a multiple of it."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 99, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[1, :7] = 0
    return input_ids.to(DEVICE), attention_mask.to(DEVICE)


def pair(model_class, config, kernel: str):
    """The eager reference and a copy with the same weights on `kernel`, both on the GPU in training mode. FIRE's
    threshold is lowered to 16 so that queries on both sides of it are trained."""
    torch.manual_seed(0)
    eager = model_class._from_config(copy.deepcopy(config), attn_implementation="eager").to(DEVICE).train()
    for name, parameter in eager.named_parameters():
        if name.endswith("threshold"):
            parameter.data.fill_(16.0)
    other = model_class._from_config(config, attn_implementation=kernel).to(DEVICE).train()
    other.load_state_dict(eager.state_dict())
    return eager, other


def assert_same_gradients(eager, other) -> None:
    """Every parameter's gradient agrees with eager's (None where eager's is None), and the position encoding's
    learnable tables, where it has any, are among those that got one."""
    for (name, want), got in zip(eager.named_parameters(), other.parameters(), strict=True):
        if want.grad is None:
            assert got.grad is None, name
            continue
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5, msg=name)
    tables = [parameter for module in other.modules() if isinstance(module, PositionEncoding)
              for parameter in module.parameters()]
    if tables:
        assert sum(table.grad.abs().sum() for table in tables if table.grad is not None) > 0


def assert_trains_like_eager(eager, other, padded: bool, causal_lm: bool = False) -> None:
    """One backward through both models: the same loss and the same gradients (`assert_same_gradients`). The loss is
    the causal-LM loss, or the mean square of the encoder's states at real tokens."""
    input_ids, attention_mask = token_batch(padded=padded)
    losses = []
    for model in (eager, other):
        if causal_lm:
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        else:
            hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            loss = (hidden * attention_mask[..., None]).pow(2).mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    assert_same_gradients(eager, other)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("kernel", TRAINED_KERNELS)
@pytest.mark.parametrize("name", ENCODER_ENCODINGS)
def test_encoder_training_on_cuda_equals_eager_in_loss_and_gradients(name, kernel, padded):
    eager, other = pair(RelPosBertModel, tiny_bert_config(position_embedding_type=name, **WIDTHS), kernel)
    assert_trains_like_eager(eager, other, padded)


@pytest.mark.parametrize("kernel", TRAINED_KERNELS)
@pytest.mark.parametrize("name", DECODER_ENCODINGS)
def test_decoder_training_on_cuda_equals_eager_in_loss_and_gradients(name, kernel):
    eager, other = pair(RelPosGPTForCausalLM, tiny_gpt_config(name, n_embd=64), kernel)
    assert_trains_like_eager(eager, other, padded=True, causal_lm=True)


@pytest.mark.parametrize("name", ["rope", "alibi", "t5"])
def test_llama_flex_training_on_cuda_with_grouped_query_attention_equals_eager(name):
    eager, other = pair(RelPosLlamaForCausalLM, tiny_llama_config(name, **WIDTHS), "flex_attention")
    assert_trains_like_eager(eager, other, padded=True, causal_lm=True)


@pytest.mark.parametrize("name", DECODER_ENCODINGS)
def test_flex_generation_with_kv_cache_on_cuda_equals_the_full_forward(name):
    torch.manual_seed(0)
    model = RelPosGPTForCausalLM._from_config(tiny_gpt_config(name, n_embd=64), attn_implementation="flex_attention")
    model = model.to(DEVICE).eval()
    input_ids, attention_mask = token_batch(length=20)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        model.set_attn_implementation("eager")
        full_mask = torch.cat((attention_mask, torch.ones_like(out.sequences[:, 20:])), dim=-1)
        logits = model(out.sequences, attention_mask=full_mask).logits
    step_logits = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(step_logits, logits[:, 19:-1], rtol=1e-4, atol=1e-4)


def gather_and_its_gradient(table, read, index, upstream):
    """`read(table)` and its gradient for `upstream`, next to a plain `gather` of `table` by `index` and its
    gradient."""
    got = read(table)
    want = table.expand(upstream.shape[0], -1, -1, -1).gather(-1, index.expand(upstream.shape))
    return (got, *torch.autograd.grad(got, table, upstream)), (want, *torch.autograd.grad(want, table, upstream))


@pytest.mark.parametrize("descending", [False, True])
def test_distance_rows_on_cuda_equal_a_gather_in_value_and_gradient(descending):
    """Rows long past the clip distance, so thousands of pairs share each end entry (what a scatter serialises)."""
    rows, cols, k = 300, 280, 16
    table = torch.randn(2, 4, rows, 2 * k + 1, device=DEVICE, dtype=torch.float64, requires_grad=True)
    columns = torch.arange(1 - rows, cols, device=DEVICE).clamp(-k, k) + k
    columns = columns.flip(0) if descending else columns
    index = columns[rows - 1 + torch.arange(cols, device=DEVICE) - torch.arange(rows, device=DEVICE)[:, None]]
    head = int((columns == columns[0]).sum())
    runs = (head, min(int((columns == columns[-1]).sum()), len(columns) - head))
    upstream = torch.randn(2, 4, rows, cols, device=DEVICE, dtype=torch.float64)
    got, want = gather_and_its_gradient(table, lambda t: DistanceRows.apply(t, columns, runs, cols), index, upstream)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("falls", [False, True])
def test_run_gather_on_cuda_equals_a_gather_in_value_and_gradient(falls):
    """Left padding (a run of position 0) in one row, consecutive positions in the other."""
    rows, cols, k = 300, 300, 16
    table = torch.randn(1, 4, rows, 2 * k + 1, device=DEVICE, dtype=torch.float64, requires_grad=True)
    positions = torch.stack((torch.arange(cols, device=DEVICE), (torch.arange(cols, device=DEVICE) - 40).clamp(0)))
    index = (positions[:, None, :] - torch.arange(rows, device=DEVICE)[None, :, None]).clamp(-k, k) + k
    index = index.flip(-1) if falls else index
    upstream = torch.randn(2, 4, rows, cols, device=DEVICE, dtype=torch.float64)
    got, want = gather_and_its_gradient(table, lambda t: RunGather.apply(t, index, falls), index[:, None], upstream)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
