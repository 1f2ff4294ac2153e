"""FIRE's CPU kernel (`kernels.piecewise_linear`, C built at first use): the piecewise-linear form of FIRE's MLP,
read per pair, equal to the formula in value and gradient, opaque to a compiled graph, split over threads, and
replaced by the torch path (with a warning) where no C compiler builds the library it shares with
`kernels.pair_dot` (tests/test_pair_dot_kernel.py), which is built once per cache folder."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fire_piece, tiny_bert_config

from hf_relpos import RelPosBertModel
from hf_relpos.kernels import cpu_kernels, piecewise_linear


pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="no C compiler builds FIRE's kernel")

WIDTH, HEADS = 6, 3


def pieces_case(batch: int = 2, queries: int = 9, keys: int = 300, rows: str = "scattered") -> tuple[torch.Tensor, ...]:
    """x `[batch, q, k]` and a piecewise-linear function with a repeated breakpoint, an infinite one (a unit whose
    slope is 0) and some x exactly on breakpoints; `keys` past the kernel's tile of 256. With `rows="sorted"` each
    row of x rises, as FIRE's does along the keys past a query: most runs of 16 keys then share one piece (the kernel's
    vector path), some cross a breakpoint."""
    x = torch.randn(batch, queries, keys) * 2
    if rows == "sorted":
        x = x.sort(-1).values
    breakpoints = torch.tensor([-1.5, -0.25, -0.25, 0.0, 1.0, torch.inf])
    x[0, 0, :4] = breakpoints[:4]
    x[1, 2, keys - 1] = 1.0
    slopes, intercepts = torch.randn(2 * WIDTH + 1, HEADS), torch.randn(2 * WIDTH + 1, HEADS)
    return x, breakpoints, slopes, intercepts


def formula(x, breakpoints, slopes, intercepts) -> torch.Tensor:
    """`slopes[p, h] x + intercepts[p, h]`, `p` the piece of `x` (`conftest.fire_piece`)."""
    piece = fire_piece(x, breakpoints)
    return (slopes[piece] * x[..., None] + intercepts[piece]).permute(0, 3, 1, 2)


def test_sorted_rows_hold_runs_of_one_piece_and_runs_across_breakpoints(seed):
    x, breakpoints, _, _ = pieces_case(rows="sorted")
    runs = fire_piece(x[..., :288], breakpoints).unflatten(-1, (-1, 16))
    one_piece = (runs == runs[..., :1]).all(-1)
    assert one_piece.any() and not one_piece.all()


@pytest.mark.parametrize("rows", ["scattered", "sorted"])
def test_piecewise_linear_equals_the_formula_per_pair(seed, rows):
    case = pieces_case(rows=rows)
    torch.testing.assert_close(piecewise_linear(*case), formula(*case), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows", ["scattered", "sorted"])
def test_piecewise_linear_has_the_gradients_of_the_formula(seed, rows):
    x, breakpoints, slopes, intercepts = (t.requires_grad_(i != 1) for i, t in enumerate(pieces_case(rows=rows)))
    grad = torch.randn(x.shape[0], HEADS, *x.shape[1:])
    inputs = (x, slopes, intercepts)
    got = torch.autograd.grad(piecewise_linear(x, breakpoints, slopes, intercepts), inputs, grad)
    want = torch.autograd.grad(formula(x.double(), breakpoints.double(), slopes.double(), intercepts.double()),
                               inputs, grad.double())
    for name, g, w in zip(("x", "slopes", "intercepts"), got, want, strict=True):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-5, msg=name)


def test_piecewise_linear_is_a_well_formed_operator(seed):
    # Schema, fake tensors, autograd registration and a compiled graph's dispatch, as torch checks an operator.
    x, breakpoints, slopes, intercepts = pieces_case(keys=20)
    torch.library.opcheck(piecewise_linear, (x.requires_grad_(), breakpoints, slopes.requires_grad_(), intercepts))


@pytest.mark.parametrize("rows", ["scattered", "sorted"])
def test_piecewise_linear_splits_rows_over_threads_without_changing_them(seed, rows):
    case = pieces_case(queries=200, rows=rows)
    x, breakpoints, slopes, intercepts = (t.requires_grad_(i != 1) for i, t in enumerate(case))
    grad = torch.randn(x.shape[0], HEADS, *x.shape[1:])
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            out = piecewise_linear(x, breakpoints, slopes, intercepts)
            results.append((out, *torch.autograd.grad(out, (x, slopes, intercepts), grad)))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results, strict=True):
        torch.testing.assert_close(three, one, rtol=1e-6, atol=1e-6)


def test_piecewise_linear_rejects_a_dtype_other_than_fp32():
    x, breakpoints, slopes, intercepts = pieces_case()
    with pytest.raises(TypeError, match="fp32"):
        piecewise_linear(x.double(), breakpoints, slopes, intercepts)


def fire_past_its_threshold() -> RelPosBertModel:
    """A tiny FIRE encoder whose queries from position 3 on have their own normaliser (the pieces' path)."""
    model = RelPosBertModel(tiny_bert_config(position_embedding_type="fire", num_hidden_layers=1)).train()
    fire = model.position_encoding
    with torch.no_grad():
        fire.threshold.fill_(3.0)
        for layer in (fire.mlp[0], fire.mlp[2]):
            layer.weight.normal_()
            layer.bias.normal_()
    return model


def step(model: RelPosBertModel, input_ids, attention_mask) -> list[torch.Tensor]:
    model.zero_grad()
    output = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    (output * attention_mask[..., None]).pow(2).mean().backward()
    return [output, *(parameter.grad for parameter in model.parameters())]


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_fire_trains_alike_on_the_cpu_kernel_and_on_torch(seed, kernel):
    input_ids = torch.randint(1, 99, (2, 40))
    attention_mask = torch.ones(2, 40, dtype=torch.long)
    attention_mask[0, :5] = 0
    native = fire_past_its_threshold()
    native.set_attn_implementation(kernel)
    torch_path = copy.deepcopy(native)
    torch_path.position_encoding.cpu_kernel = False
    assert native.position_encoding.cpu_kernel
    for got, want in zip(step(native, input_ids, attention_mask), step(torch_path, input_ids, attention_mask),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_fire_calls_the_cpu_kernel_and_trains_as_torch_does(seed):
    input_ids = torch.randint(1, 99, (1, 24))
    attention_mask = torch.ones(1, 24, dtype=torch.long)
    torch_path = fire_past_its_threshold()
    torch_path.set_attn_implementation("sdpa")
    torch_path.position_encoding.cpu_kernel = False
    native = copy.deepcopy(torch_path)
    native.position_encoding.cpu_kernel = True
    torch._dynamo.reset()
    with torch.profiler.profile() as profile:
        got = step(torch.compile(native, fullgraph=True), input_ids, attention_mask)
    assert any(event.name.endswith("::piecewise_linear_backward") for event in profile.events())
    for g, w in zip(got, step(torch.compile(torch_path, fullgraph=True), input_ids, attention_mask), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def run_kernel_users(tmp_path: Path, compiler: str) -> subprocess.CompletedProcess:
    script = (
        "import torch\n"
        "from hf_relpos import RelPosBertConfig, RelPosBertModel\n"
        "config = RelPosBertConfig(position_embedding_type='fire', vocab_size=99, hidden_size=32,"
        " num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)\n"
        "model = RelPosBertModel(config)\n"
        "model(torch.randint(1, 99, (1, 12))).last_hidden_state.sum().backward()\n"
        "print('kernel', model.position_encoding.cpu_kernel)\n"
        "from hf_relpos import RelPosGPTConfig, RelPosGPTForCausalLM\n"
        "config = RelPosGPTConfig(position_embedding_type='deberta', vocab_size=99, n_embd=32, n_layer=1, n_head=2)\n"
        "with torch.no_grad():\n"
        "    generated = RelPosGPTForCausalLM(config).generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=4,"
        " min_new_tokens=4, do_sample=False)\n"
        "print('decoded', generated.shape[1])\n"
        "from hf_relpos.kernels import piecewise_linear\n"
        "try:\n"
        "    piecewise_linear(torch.zeros(1, 2, 2), torch.zeros(1), torch.zeros(3, 4), torch.zeros(3, 4))\n"
        "except RuntimeError as error:\n"
        "    print('raises', error)\n"
    )
    env = {**os.environ, "CC": compiler, "HF_RELPOS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)


def test_without_a_c_compiler_fire_trains_and_deberta_decodes_on_torch_with_a_warning(tmp_path):
    result = run_kernel_users(tmp_path, str(tmp_path / "no-such-cc"))
    assert result.returncode == 0, result.stderr
    assert "kernel False" in result.stdout
    assert "decoded 7" in result.stdout
    assert "hf_relpos's CPU kernels could not be built" in result.stderr
    assert "no-such-cc" in result.stderr
    assert "raises piecewise_linear needs its C kernel" in result.stdout


def test_the_cpu_kernels_are_built_once_into_the_cache_folder(tmp_path):
    compiler = os.environ.get("CC", "cc")
    for _ in range(2):
        result = run_kernel_users(tmp_path, compiler)
        assert result.returncode == 0, result.stderr
        assert "kernel True" in result.stdout
        assert "decoded 7" in result.stdout
        assert "raises" not in result.stdout
    # One library, no build folder left behind (it is built beside its name and moved there).
    assert [path.suffix for path in (tmp_path / "cache").iterdir()] == [".so"]
