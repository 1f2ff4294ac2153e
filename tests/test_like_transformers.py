"""The relpos models behave like transformers' own models where its common tests look: gradient checkpointing
(reentrant and not), typed `**kwargs`, the tuples of `return_dict=False` with attentions and hidden states,
`torch.export` and fullgraph `torch.compile`, and compiled static-cache generation."""

import copy
import inspect
import typing

import pytest
import torch
from conftest import tiny_bert_config, tiny_gpt_config
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model
from transformers.utils import TransformersKwargs

from hf_relpos import (
    POSITION_ENCODINGS,
    RelPosBertForMaskedLM,
    RelPosBertForSequenceClassification,
    RelPosBertModel,
    RelPosGPTForCausalLM,
    RelPosGPTForSequenceClassification,
    RelPosGPTModel,
)


ENCODINGS = list(POSITION_ENCODINGS)
ENCODER_ENCODINGS = [name for name, cls in POSITION_ENCODINGS.items() if not cls.decoder_only]
FAMILIES = [("encoder", name) for name in ENCODER_ENCODINGS] + [("decoder", name) for name in ENCODINGS]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(family: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "encoder":
        return RelPosBertModel(tiny_bert_config(position_embedding_type=name))
    return RelPosGPTModel(tiny_gpt_config(name))


def padded_batch(length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 99, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def enable_checkpointing(model, use_reentrant: bool) -> None:
    """`activation_checkpointing_enable` from transformers 5.24, `gradient_checkpointing_enable` before it."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


# ----------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize(("family", "name"), FAMILIES)
def test_checkpointed_gradients_equal_plain_gradients(family, name, use_reentrant):
    plain = tiny_model(family, name).train()
    checkpointed = copy.deepcopy(plain)
    enable_checkpointing(checkpointed, use_reentrant)
    ids, mask = padded_batch()
    for model in (plain, checkpointed):
        # A loss that reads every position, so every position term gets a gradient.
        hidden = model(ids, attention_mask=mask).last_hidden_state
        (hidden * torch.linspace(-1, 1, hidden.shape[-1])).mean().backward()
    for (key, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), key
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-7, rtol=1e-4, msg=key)
    position_grads = [p.grad for key, p in plain.named_parameters()
                      if ("position_embeddings" in key or "wpe" in key) and p.grad is not None]
    assert all(grad.abs().sum() > 0 for grad in position_grads)


# ----------------------------------------------------------------------------------------------------------------
# Typed kwargs, and the outputs of return_dict=False with attentions and hidden states
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [
    RelPosBertModel, RelPosBertForMaskedLM, RelPosBertForSequenceClassification, RelPosGPTModel,
    RelPosGPTForCausalLM, RelPosGPTForSequenceClassification,
])
def test_public_forward_types_its_kwargs_as_transformers_kwargs(model_class):
    kwargs = [p for p in inspect.signature(model_class.forward).parameters.values() if p.kind == p.VAR_KEYWORD]
    assert len(kwargs) == 1
    annotation = typing.get_type_hints(model_class.forward)[kwargs[0].name]
    assert typing.get_args(annotation) == (TransformersKwargs,), annotation


def structure(output) -> object:
    """Tensors as their shapes, sequences as lists of their structures, anything else as its kind."""
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)):
        return [structure(item) for item in output]
    return "cache" if hasattr(output, "get_seq_length") else type(output).__name__


def transformers_twin(family: str) -> torch.nn.Module:
    """transformers' own BertModel / GPT2Model of the tiny configs' sizes."""
    if family == "encoder":
        config = BertConfig(**{k: v for k, v in tiny_bert_config().to_dict().items() if k in BertConfig().to_dict()})
        return BertModel(config)
    fields = GPT2Config().to_dict()
    return GPT2Model(GPT2Config(**{k: v for k, v in tiny_gpt_config().to_dict().items() if k in fields}))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(("family", "name"), [("encoder", "t5"), ("encoder", "rope"), ("decoder", "alibi"),
                                              ("decoder", "deberta")])
def test_return_dict_false_gives_transformers_tuples_of_attentions_and_hidden_states(family, name, use_cache):
    ours, theirs = tiny_model(family, name).eval(), transformers_twin(family).eval()
    for model in (ours, theirs):
        model.set_attn_implementation("eager")
    ids, mask = padded_batch()
    kwargs = dict(attention_mask=mask, output_attentions=True, output_hidden_states=True, return_dict=False)
    if family == "decoder":
        kwargs["use_cache"] = use_cache
    with torch.no_grad():
        mine, reference = ours(ids, **kwargs), theirs(ids, **kwargs)
    assert isinstance(mine, tuple)
    assert structure(mine) == structure(reference)
    dict_output = ours(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True,
                       **({"use_cache": use_cache} if family == "decoder" else {}))
    assert structure(dict_output.to_tuple()) == structure(mine)
    assert torch.equal(dict_output.hidden_states[-1], dict_output.last_hidden_state)


def test_hidden_states_and_attentions_are_off_by_default_as_in_transformers():
    for family in ("encoder", "decoder"):
        ours, theirs = tiny_model(family, "alibi").eval(), transformers_twin(family).eval()
        ids, mask = padded_batch()
        with torch.no_grad():
            assert structure(ours(ids, attention_mask=mask, return_dict=False)) == \
                structure(theirs(ids, attention_mask=mask, return_dict=False))


# ----------------------------------------------------------------------------------------------------------------
# torch.export and fullgraph torch.compile: no host read of the data in forward
# ----------------------------------------------------------------------------------------------------------------


def eager_and_graph_inputs(family: str) -> tuple[dict, dict]:
    """Inputs of the eager reference and of the graph: a padded batch, and another of the same shapes."""
    ids, mask = padded_batch()
    other_ids = torch.randint(3, 99, ids.shape, generator=torch.Generator().manual_seed(7))
    other_mask = torch.ones_like(mask)
    other_mask[0, :5] = 0
    extra = {"use_cache": False} if family == "decoder" else {}
    return dict(input_ids=ids, attention_mask=mask, **extra), dict(input_ids=other_ids, attention_mask=other_mask,
                                                                   **extra)


@pytest.mark.parametrize(("family", "name"), FAMILIES)
def test_exported_program_gives_the_eager_outputs(family, name):
    model = tiny_model(family, name).eval()
    inputs, other = eager_and_graph_inputs(family)
    exported = torch.export.export(model, (), inputs).module()
    with torch.no_grad():
        for batch in (inputs, other):
            torch.testing.assert_close(exported(**batch)[0], model(**batch).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "name"), FAMILIES)
def test_fullgraph_compile_gives_the_eager_outputs(family, name):
    model = tiny_model(family, name).eval()
    inputs, other = eager_and_graph_inputs(family)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for batch in (inputs, other):
            torch.testing.assert_close(compiled(**batch)[0], model(**batch).last_hidden_state, atol=1e-5, rtol=1e-5)
