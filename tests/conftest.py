"""Shared fixtures: tiny encoder and decoder configs, a fixed seed, one torch thread, and what a child process
needs to run as on a machine without hf_relpos."""

import os
import textwrap

import pytest
import torch

from hf_relpos import POSITION_ENCODINGS, RelPosBertConfig, RelPosGPTConfig, RelPosLlamaConfig


ENCODER_ENCODINGS = [name for name, cls in POSITION_ENCODINGS.items() if not cls.decoder_only]
BIAS_ENCODINGS = [name for name, cls in POSITION_ENCODINGS.items() if cls.has_bias]


def tiny_bert_config(**overrides) -> RelPosBertConfig:
    """A two-layer, four-head encoder small enough for CPU tests; `overrides` replace any field."""
    fields = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    fields.update(overrides)
    return RelPosBertConfig(**fields)


def tiny_gpt_config(position_embedding_type: str = "absolute", **overrides) -> RelPosGPTConfig:
    """A two-layer, four-head decoder small enough for CPU tests; `overrides` replace any field."""
    fields = dict(
        position_embedding_type=position_embedding_type, vocab_size=99, n_embd=32, n_layer=2, n_head=4,
        n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return RelPosGPTConfig(**fields)


def tiny_llama_config(position_embedding_type: str = "rope", **overrides) -> RelPosLlamaConfig:
    """A two-layer Llama-family decoder with grouped-query attention (four query heads, two key/value heads)."""
    fields = dict(
        position_embedding_type=position_embedding_type, vocab_size=99, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    fields.update(overrides)
    return RelPosLlamaConfig(**fields)


def fire_piece(x: torch.Tensor, breakpoints: torch.Tensor) -> torch.Tensor:
    """The piece of FIRE's MLP that holds each `x`, written from its definition: the number of breakpoints below
    `x`, or `width + 1 +` that number when `x` is on one (that breakpoint's own piece)."""
    below = (breakpoints < x[..., None]).sum(-1)
    on_breakpoint = (breakpoints == x[..., None]).any(-1)
    return torch.where(on_breakpoint, below + breakpoints.shape[0] + 1, below)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and do not stall when the cores are shared. Opt-in per module
    (`pytestmark`): a module comparing with a subprocess bit for bit must keep the subprocess's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    return 0


# The first lines of a child script that runs as on a machine without hf_relpos: importing it (or any of its
# modules) fails, so only the code saved with a checkpoint can run. The child stops if the block did not take.
WITHOUT_HF_RELPOS = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_relpos" or name.startswith("hf_relpos."):
                raise ImportError(f"{name} is blocked in this process")
            return None


    sys.meta_path.insert(0, Block())
    try:
        import hf_relpos  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_relpos is importable in the clean process: the test would prove nothing")
    """
)


def clean_env(**overrides: str) -> dict[str, str]:
    """The environment of a child process that must not find this checkout: `os.environ` without `PYTHONPATH`
    (which puts the checkout first on `sys.path`), `PYTHONHOME` and `VIRTUAL_ENV`, then `overrides`."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(overrides)
    return env


def autograd_nodes(output: torch.Tensor) -> set[str]:
    """Names of every backward node that `output` depends on."""
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names
