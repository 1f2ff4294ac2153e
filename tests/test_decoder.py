"""The GPT-2-style decoder: kernels agree, outputs have the documented shapes, losses are Trainer-safe."""

import copy
import inspect

import pytest
import torch
from conftest import tiny_gpt_config

from hf_relpos import POSITION_ENCODINGS, RelPosGPTForCausalLM, RelPosGPTForSequenceClassification


ENCODINGS = list(POSITION_ENCODINGS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")




def tiny_lm(position_embedding_type: str, **overrides) -> RelPosGPTForCausalLM:
    torch.manual_seed(0)
    return RelPosGPTForCausalLM(tiny_gpt_config(position_embedding_type, **overrides)).eval()


def token_batch(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 99, (batch, length), generator=generator)


def left_padded(ids: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the last `lengths[i]` tokens of row i, padding on the left with 0."""
    padded, mask = ids.clone(), torch.ones_like(ids)
    for row, keep in enumerate(lengths):
        padded[row, : ids.shape[1] - keep] = 0
        mask[row, : ids.shape[1] - keep] = 0
    return padded, mask


@pytest.mark.parametrize("name", ENCODINGS)
def test_eager_and_sdpa_give_the_same_logits(name):
    model, ids = tiny_lm(name), token_batch()
    model.set_attn_implementation("eager")
    eager = model(ids).logits
    model.set_attn_implementation("sdpa")
    sdpa = model(ids).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ENCODINGS)
def test_eager_and_sdpa_agree_on_a_padded_batch(name):
    model = tiny_lm(name)
    ids, mask = left_padded(token_batch(3, 9), [9, 5, 2])
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("sdpa")
    sdpa = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ENCODINGS)
def test_padding_does_not_change_the_logits_of_real_tokens(name):
    model = tiny_lm(name)
    ids = token_batch(1, 6)
    alone = model(ids).logits
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)), dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ENCODINGS)
def test_hidden_states_are_one_per_layer_plus_the_embeddings(name):
    model, ids = tiny_lm(name), token_batch()
    outputs = model(ids, output_hidden_states=True)
    assert len(outputs.hidden_states) == model.config.n_layer + 1
    assert all(h.shape == (2, 8, 32) for h in outputs.hidden_states)


@pytest.mark.parametrize("name", ENCODINGS)
def test_eager_attentions_are_one_per_layer_batch_heads_queries_keys(name):
    model, ids = tiny_lm(name), token_batch()
    model.set_attn_implementation("eager")
    attentions = model(ids, output_attentions=True).attentions
    assert len(attentions) == model.config.n_layer
    for weights in attentions:
        assert weights.shape == (2, 4, 8, 8)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 8))
        assert torch.all(weights.triu(diagonal=1) == 0), "a query attended to a later key"


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ENCODINGS)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model = tiny_lm(name)
    ids = token_batch()
    reference = copy.deepcopy(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.transformer.gradient_checkpointing
    for m in (reference, checkpointed):
        m.train()
        m(ids, labels=ids).loss.backward()
    for (key, p), q in zip(reference.named_parameters(), checkpointed.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, key
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=f"gradient of {key}")


def manual_causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted_logits, shifted_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100, reduction="sum")


def trainer_passes_loss_kwargs(model) -> bool:
    """Trainer's rule: `model.accepts_loss_kwargs` if the model sets it, else whether forward takes `**kwargs`."""
    if hasattr(model, "accepts_loss_kwargs"):
        return model.accepts_loss_kwargs
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


def test_causal_lm_loss_is_the_mean_over_predicted_tokens():
    model, ids = tiny_lm("alibi"), token_batch(2, 8)
    labels = ids.clone()
    labels[0, 5:] = -100
    outputs = model(ids, labels=labels)
    expected = manual_causal_lm_loss_sum(outputs.logits, labels) / (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(outputs.loss, expected)


def test_causal_lm_loss_divides_the_sum_by_num_items_in_batch():
    model, ids = tiny_lm("rope"), token_batch(2, 8)
    labels = ids.clone()
    labels[1, :3] = -100
    assert trainer_passes_loss_kwargs(model), "Trainer must pass num_items_in_batch to the causal LM"
    outputs = model(ids, labels=labels, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(outputs.loss, manual_causal_lm_loss_sum(outputs.logits, labels) / 40)


def test_sequence_classification_does_not_take_loss_kwargs_and_pools_the_last_real_token():
    torch.manual_seed(0)
    model = RelPosGPTForSequenceClassification(tiny_gpt_config("t5", num_labels=3)).eval()
    assert not trainer_passes_loss_kwargs(model)
    ids = token_batch(2, 7)
    alone = model(ids[1:, :4]).logits
    right_padded = ids.clone()
    right_padded[1, 4:] = 0
    mask = (right_padded != 0).long()
    logits = model(right_padded, attention_mask=mask).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-5)
    loss = model(right_padded, attention_mask=mask, labels=torch.tensor([0, 2])).loss
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])))
