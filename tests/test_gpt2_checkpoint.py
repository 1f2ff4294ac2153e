"""A checkpoint saved by transformers' own GPT2LMHeadModel loads into RelPosGPTForCausalLM by name."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_relpos import RelPosGPTConfig, RelPosGPTForCausalLM


TINY = dict(
    vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY)).eval()
    # GPT-2's init leaves biases and LayerNorms at 0 / 1: perturb them so that every weight is exercised.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()


def token_batch(batch: int = 3, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(1))


def test_absolute_loads_every_weight_of_the_gpt2_checkpoint(gpt2_dir):
    model, info = RelPosGPTForCausalLM.from_pretrained(gpt2_dir, output_loading_info=True)
    assert isinstance(model.config, RelPosGPTConfig)
    assert model.config.position_embedding_type == "absolute"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_absolute_gives_the_logits_of_gpt2(gpt2_dir, gpt2):
    model = RelPosGPTForCausalLM.from_pretrained(gpt2_dir).eval()
    ids = token_batch()
    assert (model(ids).logits - gpt2(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_absolute_gives_the_logits_of_gpt2_on_a_padded_batch(gpt2_dir, gpt2, implementation):
    model = RelPosGPTForCausalLM.from_pretrained(gpt2_dir, attn_implementation=implementation).eval()
    gpt2.set_attn_implementation(implementation)
    ids, mask = token_batch(), torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding; GPT-2 takes the matching position ids
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = model(ids, attention_mask=mask).logits
    theirs = gpt2(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5


def test_absolute_generates_the_tokens_of_gpt2(gpt2_dir, gpt2):
    model = RelPosGPTForCausalLM.from_pretrained(gpt2_dir).eval()
    ids, mask = token_batch(2, 6), torch.ones(2, 6, dtype=torch.long)
    ids[1, :2], mask[1, :2] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), gpt2.generate(ids, **kwargs))


def test_another_encoding_loads_every_weight_but_the_position_table(gpt2_dir, gpt2):
    model, info = RelPosGPTForCausalLM.from_pretrained(
        gpt2_dir, position_embedding_type="alibi", output_loading_info=True
    )
    assert model.config.position_embedding_type == "alibi"
    assert info["unexpected_keys"] == {"transformer.wpe.weight"}
    assert not info["missing_keys"] and not info["mismatched_keys"]
    ours, theirs = model.state_dict(), gpt2.state_dict()
    expected = {key for key in theirs if key != "transformer.wpe.weight"}
    assert set(ours) == expected
    for key in expected:
        assert torch.equal(ours[key], theirs[key]), key


def test_dropping_the_position_table_is_reported_once(gpt2_dir):
    with CaptureLogger(logging.get_logger("transformers")) as captured:
        RelPosGPTForCausalLM.from_pretrained(gpt2_dir, position_embedding_type="rope")
    assert captured.out.count("transformer.wpe.weight") == 1, captured.out
    assert "UNEXPECTED" in captured.out


def test_the_absolute_load_reports_nothing(gpt2_dir):
    with CaptureLogger(logging.get_logger("transformers")) as captured:
        RelPosGPTForCausalLM.from_pretrained(gpt2_dir)
    assert "LOAD REPORT" not in captured.out, captured.out
