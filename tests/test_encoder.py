"""The BERT-style encoder: kernels, padding, word order, outputs, heads, length and gradients, per encoding."""

import pytest
import torch
from conftest import ENCODER_ENCODINGS, tiny_bert_config
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

import hf_relpos.encodings
from hf_relpos import (
    RelPosBertForMaskedLM,
    RelPosBertForMultipleChoice,
    RelPosBertForQuestionAnswering,
    RelPosBertForSequenceClassification,
    RelPosBertForTokenClassification,
    RelPosBertModel,
)


ORDER_AWARE = [name for name in ENCODER_ENCODINGS if name != "nope"]
LENGTH_FREE = [name for name in ENCODER_ENCODINGS if name != "absolute"]


def build_model(name: str, model_class=RelPosBertModel, **overrides):
    torch.manual_seed(0)
    return model_class(tiny_bert_config(position_embedding_type=name, **overrides)).eval()


def token_ids(batch: int = 2, length: int = 10) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, 99, (batch, length), generator=generator)


def padded_batch(side: str, lengths=(10, 6)):
    """Rows of different lengths padded with token 0 on `side`; also returns each row unpadded."""
    rows = [token_ids(1, n)[0] + i for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[r, span], mask[r, span] = row, 1
    return ids, mask, rows


def test_encoder_encodings_are_all_but_xpos():
    assert "xpos" not in ENCODER_ENCODINGS
    assert len(ENCODER_ENCODINGS) == 11


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", ENCODER_ENCODINGS)
def test_eager_equals_sdpa(name, padded):
    model = build_model(name)
    if padded:
        ids, mask, _ = padded_batch("right")
    else:
        ids, mask = token_ids(), None
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
        sdpa = model(ids, attention_mask=mask).last_hidden_state
    if mask is not None:
        eager, sdpa = eager[mask.bool()], sdpa[mask.bool()]
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ENCODER_ENCODINGS)
def test_padded_row_equals_unpadded_row(name, side, implementation):
    model = build_model(name)
    model.set_attn_implementation(implementation)
    ids, mask, rows = padded_batch(side)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).last_hidden_state
        for r, row in enumerate(rows):
            alone = model(row[None]).last_hidden_state[0]
            torch.testing.assert_close(batched[r][mask[r].bool()], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ORDER_AWARE)
def test_permuting_tokens_changes_output(name):
    model = build_model(name)
    with torch.no_grad():  # BERT's std-0.02 init makes learned position terms tiny: make them visible
        for parameter in model.position_encoding.parameters():
            parameter.normal_(0.0, 0.5)
    ids = torch.arange(1, 11)[None]
    permutation = torch.tensor([3, 0, 7, 1, 9, 2, 5, 8, 4, 6])
    with torch.no_grad():
        out = model(ids).last_hidden_state
        permuted = model(ids[:, permutation]).last_hidden_state
    assert (permuted - out[:, permutation]).abs().max() > 1e-4


def test_nope_output_is_exactly_permuted():
    model = build_model("nope")
    ids = torch.arange(1, 11)[None]
    permutation = torch.tensor([3, 0, 7, 1, 9, 2, 5, 8, 4, 6])
    with torch.no_grad():
        out = model(ids).last_hidden_state
        permuted = model(ids[:, permutation]).last_hidden_state
    torch.testing.assert_close(permuted, out[:, permutation], atol=1e-6, rtol=1e-6)


def test_nope_encoder_warns_it_is_order_blind():
    logging.warning_once.cache_clear()  # the warning is emitted once per process
    logger = logging.get_logger(hf_relpos.encodings.__name__)
    with CaptureLogger(logger) as captured:
        build_model("nope")
    assert "nope" in captured.out and "order" in captured.out


def test_ordered_encodings_do_not_warn_about_order():
    logging.warning_once.cache_clear()
    logger = logging.get_logger(hf_relpos.encodings.__name__)
    with CaptureLogger(logger) as captured:
        build_model("alibi")
    assert "order" not in captured.out


@pytest.mark.parametrize("name", ["absolute", "t5", "deberta", "rope"])
def test_output_attentions_under_eager(name):
    model = build_model(name)
    model.set_attn_implementation("eager")
    ids, mask, _ = padded_batch("right")
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    for weights in out.attentions:
        assert weights.shape == (2, 4, 10, 10)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 10))
        assert weights[1, :, :, 6:].abs().max() == 0  # padded keys get no attention


@pytest.mark.parametrize("name", ["absolute", "alibi"])
def test_output_hidden_states_has_embeddings_plus_every_layer(name):
    model = build_model(name)
    ids = token_ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 10, 32) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, atol=0, rtol=0)


def head_inputs(model_class):
    ids = token_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    if model_class is RelPosBertForMaskedLM:
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}
    if model_class is RelPosBertForSequenceClassification:
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    if model_class is RelPosBertForTokenClassification:
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, ids.shape)}
    if model_class is RelPosBertForQuestionAnswering:
        return {"input_ids": ids, "attention_mask": mask, "start_positions": torch.tensor([1, 2]),
                "end_positions": torch.tensor([3, 4])}
    choices = torch.stack([ids, ids.flip(-1), ids % 98 + 1], dim=1)
    return {"input_ids": choices, "attention_mask": torch.ones_like(choices), "labels": torch.tensor([0, 2])}


HEAD_CLASSES = [
    RelPosBertForMaskedLM,
    RelPosBertForSequenceClassification,
    RelPosBertForTokenClassification,
    RelPosBertForQuestionAnswering,
    RelPosBertForMultipleChoice,
]


@pytest.mark.parametrize("name", ["absolute", "alibi", "deberta", "rope"])
@pytest.mark.parametrize("model_class", HEAD_CLASSES, ids=lambda c: c.__name__)
def test_head_forward_backward_gives_finite_loss(model_class, name):
    model = build_model(name, model_class).train()
    out = model(**head_inputs(model_class))
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", LENGTH_FREE)
def test_inputs_longer_than_max_position_embeddings_work(name):
    model = build_model(name)
    length = model.config.max_position_embeddings + 16
    with torch.no_grad():
        out = model(token_ids(1, length)).last_hidden_state
    assert out.shape == (1, length, 32) and torch.isfinite(out).all()


def test_absolute_longer_than_max_position_embeddings_raises():
    model = build_model("absolute")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(token_ids(1, model.config.max_position_embeddings + 1))


def test_absolute_at_max_position_embeddings_works():
    model = build_model("absolute")
    with torch.no_grad():
        out = model(token_ids(1, model.config.max_position_embeddings)).last_hidden_state
    assert torch.isfinite(out).all()


PARAMETRISED = [name for name in ENCODER_ENCODINGS if name not in ("sinusoidal", "rope", "alibi", "nope")]


@pytest.mark.parametrize("name", PARAMETRISED)
def test_gradient_reaches_every_position_parameter(name):
    model = build_model(name).train()
    parameters = dict(model.position_encoding.named_parameters())
    assert parameters, f"{name} has no position parameters"
    out = model(token_ids(2, 12)).last_hidden_state
    (out * torch.randn_like(out)).sum().backward()
    for pname, parameter in parameters.items():
        assert parameter.grad is not None, f"{name}: no gradient for {pname}"
        assert parameter.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", ["sinusoidal", "rope", "alibi", "nope"])
def test_parameter_free_encodings_have_no_parameters(name):
    assert not list(build_model(name).position_encoding.parameters())


def test_absolute_encoding_keeps_berts_parameter_name():
    model = build_model("absolute")
    assert "embeddings.position_embeddings.weight" in model.state_dict()
    assert model.state_dict()["embeddings.position_embeddings.weight"].shape == (64, 32)
