"""Compiled training, `torch.compile(model)` over the sdpa kernel: the bias of every encoding is computed in the
compiled graph and handed to sdpa as a float mask (inductor fuses its passes), and the step equals the eager
kernel's in loss and gradients. Compilation takes tens of seconds per encoding on CPU, hence `slow`."""

import copy

import pytest
import torch
from conftest import BIAS_ENCODINGS, ENCODER_ENCODINGS, tiny_bert_config

from hf_relpos import RelPosBertModel


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.mark.parametrize("name", [name for name in BIAS_ENCODINGS if name in ENCODER_ENCODINGS])
def test_compiled_sdpa_training_step_equals_eager_in_loss_and_gradients(seed, name):
    config = tiny_bert_config(position_embedding_type=name, num_hidden_layers=1)
    eager = RelPosBertModel._from_config(copy.deepcopy(config), attn_implementation="eager").train()
    sdpa = RelPosBertModel._from_config(config, attn_implementation="sdpa").train()
    sdpa.load_state_dict(eager.state_dict())
    compiled = torch.compile(sdpa, dynamic=False)
    input_ids = torch.randint(1, 99, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, :3] = 0
    losses = []
    for model in (eager, compiled):
        output = model(input_ids=input_ids, attention_mask=attention_mask)
        loss = (output.last_hidden_state * attention_mask[..., None]).pow(2).mean() + output.pooler_output.mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    for (parameter_name, want), got in zip(eager.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=parameter_name)
