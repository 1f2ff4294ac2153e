"""The models work with the KV cache under the name the installed transformers uses (`cache` from 5.24, before it
`past_key_values`) through every generation path, EncoderDecoderModel and Seq2SeqTrainer, and our code raises no
FutureWarning / DeprecationWarning and logs no deprecation."""

import contextlib
import logging
import warnings

import pytest
import torch
from conftest import tiny_gpt_config
from test_encoder_decoder import BOS, PAD, reversal_batch, seq2seq_model
from transformers import GPT2Config, GPT2LMHeadModel, Seq2SeqTrainer, Seq2SeqTrainingArguments

from hf_relpos import POSITION_ENCODINGS, RelPosGPTForCausalLM
from hf_relpos.attention import CACHE_FIELD


ENCODINGS = list(POSITION_ENCODINGS)
NEW_TOKENS = 5
# EncoderDecoderModel itself warns on every forward with labels that its loss moved out of the decoder in v4.12.
ENCODER_DECODER_OWN_WARNING = "Version v4.12.0 introduces"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def no_deprecation(allowed: tuple[str, ...] = ()):
    """Deprecation warnings become errors; what transformers' and our loggers say is collected and checked for
    deprecations other than `allowed` (transformers' library logger does not propagate to pytest's caplog)."""
    records = Records()
    loggers = [logging.getLogger(name) for name in ("transformers", "transformers_modules", "hf_relpos")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            warnings.filterwarnings("ignore", ENCODER_DECODER_OWN_WARNING, FutureWarning)
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    deprecations = [message for message in records.messages
                    if "deprecat" in message.lower() and not message.startswith(allowed)]
    assert not deprecations, deprecations


def tiny_lm(name: str, seed: int = 0, **overrides) -> RelPosGPTForCausalLM:
    torch.manual_seed(seed)
    return RelPosGPTForCausalLM(tiny_gpt_config(name, **overrides)).eval()


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = PAD, 0
    return ids, mask


def generate(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, **kwargs)


@pytest.mark.parametrize("name", ["rope", "t5"])
def test_the_cache_is_taken_under_both_names_and_returned_under_the_installed_ones(name):
    model = tiny_lm(name)
    ids, mask = padded_prompts()
    with torch.no_grad(), no_deprecation():
        prefix = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        cache = getattr(prefix, CACHE_FIELD)
        assert cache is not None and cache.get_seq_length() == 5
        new = model(ids[:, 5:], attention_mask=mask, cache=cache).logits
    full = model(ids, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(new, full, atol=1e-5, rtol=0)
    legacy_prefix = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
    legacy = model(ids[:, 5:], attention_mask=mask, past_key_values=getattr(legacy_prefix, CACHE_FIELD)).logits
    torch.testing.assert_close(legacy, full, atol=1e-5, rtol=0)


def test_the_cache_under_both_names_at_once_is_a_value_error():
    model = tiny_lm("rope")
    ids, mask = padded_prompts()
    cache = getattr(model(ids, use_cache=True), CACHE_FIELD)
    with pytest.raises(ValueError, match="`cache` or as `past_key_values`"):
        model(ids[:, :1], cache=cache, past_key_values=cache)


@pytest.mark.parametrize("name", ENCODINGS)
def test_greedy_generation_of_a_padded_batch_equals_a_full_forward_without_deprecations(name):
    model = tiny_lm(name)
    ids, mask = padded_prompts()
    with no_deprecation():
        out = generate(model, ids, mask, output_logits=True, return_dict_in_generate=True)
    full_mask = torch.cat((mask, torch.ones(2, NEW_TOKENS, dtype=mask.dtype)), dim=-1)
    full = model(out.sequences, attention_mask=full_mask).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["absolute", "alibi", "deberta", "xpos"])
def test_beam_search_with_cache_equals_beam_search_without_cache_without_deprecations(name):
    model = tiny_lm(name)
    ids, mask = padded_prompts()
    with no_deprecation():
        cached = generate(model, ids, mask, num_beams=3, num_return_sequences=2)
    uncached = generate(model, ids, mask, num_beams=3, num_return_sequences=2, use_cache=False)
    assert torch.equal(cached, uncached)


def gpt2_assisted_decoding_deprecations() -> tuple[str, ...]:
    """What transformers' own GPT-2 logs as deprecated in assisted decoding (its candidate generator passes a
    `generation_config` with generation arguments on some releases): not caused by our code."""
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model, assistant = GPT2LMHeadModel(config).eval(), GPT2LMHeadModel(config).eval()
    ids = torch.randint(3, 99, (1, 7), generator=torch.Generator().manual_seed(1))
    records = Records()
    logging.getLogger("transformers").addHandler(records)
    try:
        model.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=assistant,
                       max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        logging.getLogger("transformers").removeHandler(records)
    return tuple(message.split("(")[0] for message in records.messages if "deprecat" in message.lower())


@pytest.mark.parametrize("name", ["rope", "t5", "relative_key_query"])
def test_assisted_decoding_gives_the_greedy_tokens_without_deprecations(name):
    model, assistant = tiny_lm(name), tiny_lm(name, seed=1)
    ids = torch.randint(3, 99, (1, 7), generator=torch.Generator().manual_seed(1))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    with no_deprecation(allowed=gpt2_assisted_decoding_deprecations()):
        assisted = model.generate(ids, assistant_model=assistant, **kwargs)
    assert torch.equal(assisted, model.generate(ids, **kwargs))


@pytest.mark.parametrize("name", ["absolute", "rope", "alibi", "fire", "deberta"])
def test_generation_continues_from_a_returned_cache_as_from_the_whole_prompt(name):
    model = tiny_lm(name)
    ids, mask = padded_prompts()
    with no_deprecation():
        first = generate(model, ids, mask, return_dict_in_generate=True)
        cache = getattr(first, CACHE_FIELD)
        assert cache is not None
        grown = torch.cat((mask, torch.ones(2, NEW_TOKENS, dtype=mask.dtype)), dim=-1)
        continued = generate(model, first.sequences, grown, **{CACHE_FIELD: cache})
    at_once = model.generate(ids, attention_mask=mask, max_new_tokens=2 * NEW_TOKENS,
                             min_new_tokens=2 * NEW_TOKENS, do_sample=False)
    assert torch.equal(continued, at_once)


@pytest.mark.parametrize("decoder_encoding", ["rope", "t5", "absolute"])
def test_encoder_decoder_generation_with_cache_and_beams_without_deprecations(decoder_encoding):
    model = seq2seq_model(decoder_encoding=decoder_encoding).eval()
    source, _ = reversal_batch(2)
    mask = torch.ones_like(source)
    source[1, 4:], mask[1, 4:] = PAD, 0
    with no_deprecation():
        cached = generate(model, source, mask)
        beams = generate(model, source, mask, num_beams=3)
    assert torch.equal(cached, generate(model, source, mask, use_cache=False))
    assert torch.equal(beams, generate(model, source, mask, num_beams=3, use_cache=False))


class ReversalDataset(torch.utils.data.Dataset):
    def __init__(self, rows: int = 6):
        self.source, self.target = reversal_batch(rows, seed=5)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.source[index], "attention_mask": torch.ones_like(self.source[index]),
                "labels": self.target[index]}


def test_seq2seq_trainer_evaluates_with_predict_with_generate_as_generate_does(tmp_path):
    model = seq2seq_model().eval()
    data = ReversalDataset()
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=3, predict_with_generate=True,
        generation_max_length=data.target.shape[1] + 1, report_to="none", use_cpu=True, disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, eval_dataset=data)
    with no_deprecation():
        metrics = trainer.evaluate()
        predictions = trainer.predict(data).predictions
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    expected = model.generate(data.source, max_length=data.target.shape[1] + 1, do_sample=False)
    assert expected[:, 0].eq(BOS).all() and expected.shape[1] <= predictions.shape[1]
    width = expected.shape[1]
    assert torch.equal(torch.as_tensor(predictions[:, :width]), expected)
    assert (torch.as_tensor(predictions[:, width:]) == PAD).all()
