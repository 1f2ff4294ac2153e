"""EncoderDecoderModel pairs a RelPosBertModel encoder with a RelPosGPTForCausalLM decoder (cross-attention)."""

import pytest
import torch
from transformers import EncoderDecoderModel

from hf_relpos import RelPosBertConfig, RelPosBertModel, RelPosGPTConfig, RelPosGPTForCausalLM


PAD, BOS, EOS = 0, 1, 2

# EncoderDecoderModel warns on every training forward that its loss moved out of the decoder in v4.12.


pytestmark = [
    pytest.mark.filterwarnings("ignore:Version v4.12.0 introduces:FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def seq2seq_model(encoder_encoding: str = "alibi", decoder_encoding: str = "rope") -> EncoderDecoderModel:
    torch.manual_seed(0)
    encoder = RelPosBertModel(
        RelPosBertConfig(
            position_embedding_type=encoder_encoding, vocab_size=99, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=PAD,
        )
    )
    decoder = RelPosGPTForCausalLM(
        RelPosGPTConfig(
            position_embedding_type=decoder_encoding, vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
            add_cross_attention=True, is_decoder=True,
        )
    )
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = BOS
    model.config.pad_token_id = PAD
    model.config.eos_token_id = EOS
    model.generation_config.decoder_start_token_id = BOS
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


def reversal_batch(batch: int = 8, length: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources of random tokens; targets are the reversed source then EOS (a task that needs word order)."""
    source = torch.randint(3, 20, (batch, length), generator=torch.Generator().manual_seed(seed))
    target = torch.cat((source.flip(-1), torch.full((batch, 1), EOS)), dim=-1)
    return source, target


def test_decoder_has_gpt2_cross_attention_modules():
    names = {name for name, _ in seq2seq_model().decoder.named_parameters()}
    for suffix in ("crossattention.q_attn.weight", "crossattention.c_attn.weight", "crossattention.c_proj.weight",
                   "ln_cross_attn.weight"):
        assert f"transformer.h.0.{suffix}" in names


def test_encoder_decoder_trains_on_reversal_and_the_loss_decreases():
    model = seq2seq_model().train()
    source, target = reversal_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(input_ids=source, attention_mask=torch.ones_like(source), labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_cross_attention_receives_gradients():
    model = seq2seq_model().train()
    source, target = reversal_batch()
    model(input_ids=source, labels=target).loss.backward()
    for name, parameter in model.decoder.named_parameters():
        if "crossattention" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Everything of the encoder but its (unused) pooler learns through the cross-attention.
    no_grad = [name for name, p in model.encoder.named_parameters() if p.grad is None and "pooler" not in name]
    assert not no_grad


@pytest.mark.parametrize("decoder_encoding", ["rope", "alibi", "t5", "absolute"])
def test_encoder_decoder_generates_the_same_tokens_with_and_without_cache(decoder_encoding):
    model = seq2seq_model(decoder_encoding=decoder_encoding).eval()
    source, _ = reversal_batch(2)
    mask = torch.ones_like(source)
    source[1, 4:], mask[1, 4:] = PAD, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=7, min_new_tokens=7, do_sample=False)
    cached = model.generate(source, use_cache=True, output_logits=True, return_dict_in_generate=True, **kwargs)
    uncached = model.generate(source, use_cache=False, output_logits=True, return_dict_in_generate=True, **kwargs)
    assert cached.sequences.shape == (2, 8)
    assert torch.all(cached.sequences[:, 0] == BOS)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-5, rtol=0)


def test_encoder_decoder_beam_search_runs():
    model = seq2seq_model().eval()
    source, _ = reversal_batch(2)
    out = model.generate(source, num_beams=3, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (2, 6)


def test_cross_attentions_are_returned_under_eager():
    model = seq2seq_model().eval()
    model.set_attn_implementation("eager")
    source, target = reversal_batch(2)
    mask = torch.ones_like(source)
    mask[1, 4:] = 0
    outputs = model(input_ids=source, attention_mask=mask, labels=target, output_attentions=True)
    assert len(outputs.cross_attentions) == 2
    assert len(outputs.decoder_attentions) == 2
    for weights in outputs.cross_attentions:
        assert weights.shape == (2, 4, target.shape[1], source.shape[1])
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, target.shape[1]))
        assert torch.all(weights[1, :, :, 4:] == 0), "cross-attention looked at encoder padding"


def test_cross_attention_carries_no_position_terms():
    """Permuting the encoder's output permutes nothing the decoder sees: cross-attention treats it as a set."""
    decoder = seq2seq_model().decoder.eval()
    states = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(3, 99, (2, 4), generator=torch.Generator().manual_seed(4))
    permutation = torch.tensor([3, 0, 4, 1, 2])
    logits = decoder(ids, encoder_hidden_states=states).logits
    permuted = decoder(ids, encoder_hidden_states=states[:, permutation]).logits
    torch.testing.assert_close(logits, permuted, atol=1e-5, rtol=1e-5)
