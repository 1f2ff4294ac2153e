"""Properties over random small configurations (hypothesis): every encoding with its options, 1-4 heads, head
dims 4/8, 1-2 layers, 1-12 tokens, 1-3 rows each padded left, right or not at all.

- eager == sdpa on every real token (encoder and decoder);
- a padded row == the same row alone (encoder: left/right; decoder: left/right);
- cached greedy generation == uncached, and each cached step's logits == a full forward (decoder, left padding);
- save_pretrained / from_pretrained reproduces every parameter and buffer bit for bit and the outputs to
  the last bits (in process; the remote-code path in a clean
  subprocess is covered by test_remote_code_encoder.py / test_remote_code_decoder.py).

The flex kernel is left out here: it compiles for seconds per shape on CPU; tests/test_flex.py holds it to sdpa on
fixed examples. Examples are derandomized so CI sees the same ones every run.
"""

import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_relpos import POSITION_ENCODINGS, RelPosBertConfig, RelPosBertModel, RelPosGPTConfig, RelPosGPTForCausalLM


ENCODER_ENCODINGS = [name for name, cls in POSITION_ENCODINGS.items() if not cls.decoder_only]
DECODER_ENCODINGS = list(POSITION_ENCODINGS)
PROFILE = settings(max_examples=15, deadline=None, derandomize=True, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ATOL = 2e-5


@st.composite
def encoding_options(draw, name: str, causal: bool, small_context: bool) -> dict:
    """The options of `name` (the fields it reads), drawn within their valid ranges."""
    if name in ("relative_key", "relative_key_query"):
        return {"max_relative_positions": draw(st.integers(1, 8))}
    if name == "t5":
        buckets = draw(st.integers(4, 16))
        exact = buckets // (1 if causal else 2) // 2
        return {"relative_attention_num_buckets": buckets,
                "relative_attention_max_distance": draw(st.integers(exact + 1, 32))}
    if name == "deberta":
        position_buckets = draw(st.sampled_from([0, 4, 8]))
        low = position_buckets // 2 + 2 if position_buckets else 1
        return {"position_buckets": position_buckets, "max_relative_positions": draw(st.integers(low, 16))}
    if name == "fire":
        return {"fire_mlp_width": draw(st.sampled_from([4, 8]))}
    if name in ("rope", "xpos"):
        rope_type = draw(st.sampled_from(["default", "linear", "dynamic"]))
        parameters = {"rope_type": rope_type, "rope_theta": draw(st.sampled_from([100.0, 10000.0])),
                      "partial_rotary_factor": draw(st.sampled_from([0.5, 1.0]))}
        if rope_type != "default":
            parameters["factor"] = draw(st.sampled_from([1.5, 2.0, 4.0]))
        options = {"rope_parameters": parameters}
        if rope_type == "dynamic" and small_context:
            # A short context makes dynamic NTK rescale within the test lengths.
            options["max_position_embeddings"] = draw(st.sampled_from([4, 8]))
        if name == "xpos":
            options["xpos_scale_base"] = draw(st.sampled_from([8, 512]))
        return options
    return {}


@st.composite
def configs(draw, decoder: bool, small_context: bool = True):
    """(config, name): a random small config of the encoder or decoder."""
    name = draw(st.sampled_from(DECODER_ENCODINGS if decoder else ENCODER_ENCODINGS))
    heads, head_dim = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([4, 8]))
    options = {"max_position_embeddings": 64, **draw(encoding_options(name, decoder, small_context))}
    if name == "rope" and options["rope_parameters"]["partial_rotary_factor"] * head_dim % 2:
        options["rope_parameters"]["partial_rotary_factor"] = 1.0
    common = dict(vocab_size=50, position_embedding_type=name, **options)
    size = dict(hidden_size=heads * head_dim, num_attention_heads=heads, num_hidden_layers=draw(st.integers(1, 2)))
    if decoder:
        config = RelPosGPTConfig(**common, **size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2)
    else:
        config = RelPosBertConfig(**common, **size, intermediate_size=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return config


@st.composite
def padded_batches(draw, sides=("left", "right", "none")):
    """(ids, mask): 1-3 rows of 1-12 tokens, each padded on its own side (with token 0) or full width."""
    rows = draw(st.integers(1, 3))
    width = draw(st.integers(1, 12))
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for r in range(rows):
        side = draw(st.sampled_from(sides))
        length = width if side == "none" else draw(st.integers(1, width))
        tokens = torch.tensor(draw(st.lists(st.integers(3, 49), min_size=length, max_size=length)))
        span = slice(0, length) if side == "right" else slice(width - length, width)
        ids[r, span], mask[r, span] = tokens, 1
    return ids, mask


def build(config):
    """The model of `config` with its position parameters made large enough to matter."""
    torch.manual_seed(0)
    model = (RelPosGPTForCausalLM if isinstance(config, RelPosGPTConfig) else RelPosBertModel)(config).eval()
    encoding = model.transformer.wpe if isinstance(model, RelPosGPTForCausalLM) else model.position_encoding
    with torch.no_grad():
        for parameter in encoding.parameters():
            if parameter.dim() >= 2:  # tables, MLP and projection weights; FIRE's and KERPLE's scalars keep theirs
                parameter.normal_(0.0, 0.5)
    return model


def output(model, ids, mask=None):
    out = model(ids, attention_mask=mask)
    return out.logits if isinstance(model, RelPosGPTForCausalLM) else out.last_hidden_state


def run_eager_equals_sdpa(config, batch):
    ids, mask = batch
    model = build(config)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = output(model, ids, mask)
        model.set_attn_implementation("sdpa")
        sdpa = output(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(sdpa[real], eager[real], atol=ATOL, rtol=1e-4)


@PROFILE
@given(configs(decoder=False), padded_batches())
def test_encoder_eager_equals_sdpa(config, batch):
    run_eager_equals_sdpa(config, batch)


@PROFILE
@given(configs(decoder=True), padded_batches())
def test_decoder_eager_equals_sdpa(config, batch):
    run_eager_equals_sdpa(config, batch)


def run_padded_equals_alone(config, batch, implementation):
    ids, mask = batch
    model = build(config)
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        batched = output(model, ids, mask)
        for r in range(ids.shape[0]):
            real = mask[r].bool()
            alone = output(model, ids[r][real][None])[0]
            torch.testing.assert_close(batched[r][real], alone, atol=ATOL, rtol=1e-4)


@PROFILE
@given(configs(decoder=False, small_context=False), padded_batches(), st.sampled_from(["eager", "sdpa"]))
def test_encoder_padded_row_equals_the_row_alone(config, batch, implementation):
    run_padded_equals_alone(config, batch, implementation)


@PROFILE
@given(configs(decoder=True, small_context=False), padded_batches(), st.sampled_from(["eager", "sdpa"]))
def test_decoder_padded_row_equals_the_row_alone(config, batch, implementation):
    run_padded_equals_alone(config, batch, implementation)


NEW_TOKENS = 4


@PROFILE
@given(configs(decoder=True, small_context=False), padded_batches(sides=("left", "none")),
       st.sampled_from(["eager", "sdpa"]))
def test_cached_greedy_generation_equals_uncached(config, batch, implementation):
    ids, mask = batch
    model = build(config)
    model.set_attn_implementation(implementation)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, output_logits=True, return_dict_in_generate=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
        assert torch.equal(cached.sequences, uncached)
        full_mask = torch.cat((mask, torch.ones(mask.shape[0], NEW_TOKENS, dtype=mask.dtype)), dim=-1)
        full = model(cached.sequences, attention_mask=full_mask).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(cached.logits, dim=1), full, atol=1e-4, rtol=1e-4)


def run_save_load(config, batch):
    ids, mask = batch
    model = build(config)
    with torch.no_grad():
        before = output(model, ids, mask)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = type(model).from_pretrained(folder).eval()
    assert loaded.config.position_embedding_type == config.position_embedding_type
    # Bit-identical parameters and buffers, the non-persistent ones (inverse frequencies) rebuilt on load included.
    for (key, value), (loaded_key, loaded_value) in zip(
        [*model.named_parameters(), *model.named_buffers()], [*loaded.named_parameters(), *loaded.named_buffers()],
        strict=True,
    ):
        assert key == loaded_key and torch.equal(value, loaded_value), key
    with torch.no_grad():
        after = output(loaded, ids, mask)
    # Same weights, same kernel; the loaded weights sit at other memory alignments, so CPU BLAS may round the last
    # bit differently (seen: 1.5e-8 on the logits of a 1-token batch).
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


@PROFILE
@given(configs(decoder=False), padded_batches())
def test_encoder_save_load_reproduces_outputs_exactly(config, batch):
    run_save_load(config, batch)


@PROFILE
@given(configs(decoder=True), padded_batches())
def test_decoder_save_load_reproduces_outputs_exactly(config, batch):
    run_save_load(config, batch)
