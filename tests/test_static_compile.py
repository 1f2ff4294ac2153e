"""Static-cache generation under `torch.compile`: one fullgraph graph for every decode step, eager's tokens.

`generate(cache_implementation="static", compile_config=CompileConfig(fullgraph=True, dynamic=False))` runs the
prefill eagerly and compiles the model's forward for the decode steps, whose shapes no longer change (the cache
keeps `max_cache_len` slots; `generate` hands the model a 4D mask over them and the positions). `fullgraph=True`
raises on any graph break and `error_on_recompile` on any recompilation, so a run that returns proves both; the
graph count proves the compiled forward ran. transformers compiles on CPU only with `_compile_all_devices`.
Every encoding is traced with `aot_eager` (dynamo and functionalisation, no C++ build); a few run through inductor,
the backend users get.
"""

import functools

import pytest
import torch
from conftest import tiny_bert_config, tiny_gpt_config, tiny_llama_config
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import CompileConfig

from hf_relpos import POSITION_ENCODINGS, RelPosBertForCausalLM, RelPosGPTForCausalLM, RelPosLlamaForCausalLM
from hf_relpos.attention import token_positions


pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW_TOKENS = 4
SLOW = pytest.mark.slow


def relpos_decoder(layout: str, name: str, kernel: str):
    """A one-layer decoder of `layout` with encoding `name` and attention `kernel`."""
    torch.manual_seed(0)
    if layout == "gpt":
        model_class, config = RelPosGPTForCausalLM, tiny_gpt_config(name, n_layer=1)
    elif layout == "llama":
        model_class, config = RelPosLlamaForCausalLM, tiny_llama_config(name, num_hidden_layers=1)
    else:
        model_class = RelPosBertForCausalLM
        config = tiny_bert_config(position_embedding_type=name, num_hidden_layers=1, is_decoder=True, pad_token_id=0)
    return model_class._from_config(config, attn_implementation=kernel).eval()


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of six slots; the first has two pads on the left."""
    ids = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    return ids, mask


def compile_config(backend: str) -> CompileConfig:
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend)
    config._compile_all_devices = True
    return config


def generations(model, backend: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Greedy tokens of eager dynamic-cache generation and of compiled static-cache generation, and the number of
    graphs dynamo captured for the latter."""
    ids, mask = left_padded_batch()
    greedy = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    eager = model.generate(ids, **greedy)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.generate(ids, cache_implementation="static", compile_config=compile_config(backend), **greedy)
    return eager, compiled, counters["stats"]["unique_graphs"]


@functools.cache
def relpos_generations(layout: str, name: str, backend: str, kernel: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    return generations(relpos_decoder(layout, name, kernel), backend)


ENCODINGS = sorted(POSITION_ENCODINGS)
TRACED = [
    *[pytest.param("gpt", name, "aot_eager", id=f"gpt-{name}") for name in ENCODINGS],
    *[pytest.param("llama", name, "aot_eager", id=f"llama-{name}", marks=SLOW) for name in ENCODINGS],
    *[pytest.param("bert", name, "aot_eager", id=f"bert-{name}", marks=SLOW) for name in ENCODINGS],
    pytest.param("gpt", "rope", "inductor", id="gpt-rope-inductor"),
    pytest.param("llama", "alibi", "inductor", id="llama-alibi-inductor"),
    pytest.param("gpt", "deberta", "inductor", id="gpt-deberta-inductor", marks=SLOW),
    pytest.param("llama", "t5", "inductor", id="llama-t5-inductor", marks=SLOW),
]



def test_static_cache_slots_count_on_from_the_query_with_a_tensor_past_length():
    """A decode step over a static cache of 8 slots holding 4 tokens, with `generate`'s position ids and 4D mask:
    slot j sits at `position - 4 + j`, before and after the query alike."""
    query, keys = token_positions(None, torch.tensor([[7], [5]]), 2, 1, torch.tensor(4), 8, torch.device("cpu"))
    assert query.tolist() == [[7], [5]]
    assert keys.tolist() == [list(range(3, 11)), list(range(1, 9))]


def test_relpos_decoders_declare_fullgraph_compile():
    assert RelPosGPTForCausalLM._can_compile_fullgraph
    assert RelPosLlamaForCausalLM._can_compile_fullgraph
    assert RelPosBertForCausalLM._can_compile_fullgraph


@pytest.mark.parametrize("layout, name, backend", TRACED)
def test_compiled_static_generation_gives_eager_tokens(layout, name, backend):
    eager, compiled, _ = relpos_generations(layout, name, backend, "sdpa")
    assert compiled.shape == (2, 6 + NEW_TOKENS)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("layout, name, backend", TRACED)
def test_every_decode_step_runs_one_compiled_graph(layout, name, backend):
    """One graph serves all decode steps (no graph break, no recompilation as the cache fills)."""
    _, _, graphs = relpos_generations(layout, name, backend, "sdpa")
    assert graphs == 1


@SLOW
@pytest.mark.parametrize("name", ["alibi", "deberta"])
def test_eager_kernel_compiles_the_static_decode_step_too(name):
    """The dense bias reaches the reference kernel instead of sdpa's float mask; same graph count, same tokens."""
    eager, compiled, graphs = relpos_generations("llama", name, "aot_eager", "eager")
    assert torch.equal(compiled, eager)
    assert graphs == 1


def test_transformers_llama_compiles_to_one_graph_under_the_same_call():
    """The control: transformers' own LlamaForCausalLM gives the same count under the same call."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    eager, compiled, graphs = generations(LlamaForCausalLM(config).eval(), "aot_eager")
    assert torch.equal(compiled, eager)
    assert graphs == 1
