"""The length-extrapolation harness: perplexity against a direct computation, clear errors, plots, passkey."""

import math

import pytest
import torch
from torch.nn import functional as F

from hf_relpos import RelPosBertConfig, RelPosBertForMaskedLM, RelPosGPTConfig, RelPosGPTForCausalLM
from hf_relpos.extrapolation import (
    PasskeyScheme,
    evaluate_mlm_accuracy,
    evaluate_perplexity,
    load_json,
    markdown_table,
    passkey_accuracy,
    plot,
    save_json,
)


VOCAB = 40


def tiny_gpt(encoding="alibi", n_positions=32, vocab_size=VOCAB) -> RelPosGPTForCausalLM:
    torch.manual_seed(0)
    config = RelPosGPTConfig(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=n_positions,
        position_embedding_type=encoding, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return RelPosGPTForCausalLM(config).eval()


@pytest.fixture(scope="module")
def corpus() -> torch.Tensor:
    return torch.randint(0, VOCAB, (130,), generator=torch.Generator().manual_seed(1))


def direct_nll(model, windows: list[torch.Tensor], scored_from: list[int]) -> tuple[float, int]:
    """Sum of the NLL of every target at window offset >= scored_from (one plain forward of all windows), and the
    number of such targets."""
    batch = torch.stack(windows)
    with torch.no_grad():
        logits = model(input_ids=batch).logits[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    total, count = 0.0, 0
    for row, first in zip(nll, scored_from, strict=True):
        total += row[first - 1:].double().sum().item()
        count += len(row[first - 1:])
    return total, count


@pytest.mark.parametrize("encoding", ["alibi", "rope", "absolute"])
def test_nonoverlapping_matches_direct_computation(corpus, encoding):
    model = tiny_gpt(encoding)
    lengths = [8, 16, 32]
    rows = evaluate_perplexity(model, corpus, lengths, mode="nonoverlapping", batch_size=3, progress=False)
    for row, length in zip(rows, lengths, strict=True):
        windows = [corpus[start:start + length] for start in range(0, len(corpus) - length + 1, length)]
        total, count = direct_nll(model, windows, [1] * len(windows))
        assert row["tokens"] == count == len(windows) * (length - 1)
        assert row["windows"] == len(windows)
        assert math.isclose(row["nll"], total / count, rel_tol=1e-5)
        assert math.isclose(row["perplexity"], math.exp(total / count), rel_tol=1e-5)


def test_sliding_with_full_stride_is_nonoverlapping(corpus):
    model = tiny_gpt("t5")
    sliding = evaluate_perplexity(model, corpus, [16], mode="sliding", stride=16, progress=False)[0]
    plain = evaluate_perplexity(model, corpus, [16], mode="nonoverlapping", progress=False)[0]
    assert sliding["tokens"] == plain["tokens"]
    assert math.isclose(sliding["perplexity"], plain["perplexity"], rel_tol=1e-6)


def test_sliding_matches_direct_computation(corpus):
    model = tiny_gpt("kerple")
    length, stride = 16, 4
    row = evaluate_perplexity(model, corpus, [length], mode="sliding", stride=stride, batch_size=5, progress=False)[0]
    # Window 0 scores all its targets; window k ends at 16 + 4k and scores only its last 4 tokens.
    windows, scored_from = [corpus[:length]], [1]
    end = length
    while end + stride <= len(corpus):
        end += stride
        windows.append(corpus[end - length:end])
        scored_from.append(length - stride)
    total, count = direct_nll(model, windows, scored_from)
    assert row["tokens"] == count == (length - 1) + stride * (len(windows) - 1)
    assert math.isclose(row["perplexity"], math.exp(total / count), rel_tol=1e-5)
    # Every scored token is a distinct corpus position: no token is counted twice.
    assert count <= len(corpus) - 1


def test_absolute_beyond_its_table_is_a_clear_error(corpus):
    model = tiny_gpt("absolute", n_positions=16)
    with pytest.raises(ValueError, match=r"max_position_embeddings=16") as error:
        evaluate_perplexity(model, corpus, [16, 32], progress=False)
    assert "32" in str(error.value)
    with pytest.raises(ValueError, match=r"max_position_embeddings=16"):
        passkey_accuracy(tiny_gpt("absolute", n_positions=16), [32], num_samples=2, progress=False)


def test_absolute_beyond_its_table_as_not_applicable(corpus, tmp_path):
    model = tiny_gpt("absolute", n_positions=16)
    rows = evaluate_perplexity(model, corpus, [16, 32], progress=False, on_unsupported="nan")
    assert math.isfinite(rows[0]["perplexity"]) and "skipped" not in rows[0]
    assert math.isnan(rows[1]["perplexity"]) and "max_position_embeddings=16" in rows[1]["skipped"]
    path = save_json({"absolute": rows}, tmp_path / "results.json")
    assert '"perplexity": null' in path.read_text()  # valid JSON: NaN is written as null
    assert math.isnan(load_json(path)["absolute"][1]["perplexity"])
    assert "n/a" in markdown_table({"absolute": rows}, train_length=16)


def test_plot_writes_a_png(corpus, tmp_path):
    results = {
        "alibi": evaluate_perplexity(tiny_gpt("alibi"), corpus, [8, 16, 32], progress=False),
        "absolute": evaluate_perplexity(tiny_gpt("absolute", n_positions=16), corpus, [8, 16, 32], progress=False,
                                        on_unsupported="nan"),
    }
    path = plot(results, tmp_path / "sub" / "extrapolation.png", train_length=16)
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(b"\x89PNG")


def test_passkey_accuracy_runs_and_is_a_fraction():
    scheme = PasskeyScheme(num_digits=3)
    input_ids, labels, passkeys = scheme.make_batch(24, 4, torch.Generator().manual_seed(0))
    assert input_ids.shape == labels.shape == (4, 24)
    assert torch.equal(input_ids[:, -3:], passkeys)  # digit_offset 0: the answer digits are the passkey
    assert (input_ids == scheme.key_marker).sum() == 4 and (input_ids[:, -4] == scheme.query_marker).all()
    assert (labels[:, :-3] == -100).all()
    model = tiny_gpt("rope", vocab_size=scheme.first_free_id)
    rows = passkey_accuracy(model, [24, 48], scheme, num_samples=6, batch_size=4, progress=False)
    assert [row["length"] for row in rows] == [24, 48]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert 0.0 <= row["digit_accuracy"] <= 1.0
        assert row["samples"] == 6


def test_mlm_accuracy(corpus):
    torch.manual_seed(0)
    config = RelPosBertConfig(
        vocab_size=VOCAB + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=16, position_embedding_type="absolute",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = RelPosBertForMaskedLM(config).eval()
    rows = evaluate_mlm_accuracy(model, corpus, [8, 16], mask_token_id=VOCAB, progress=False)
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["tokens"] >= len(corpus) // row["length"]
        assert math.isfinite(row["perplexity"])
    again = evaluate_mlm_accuracy(model, corpus, [8, 16], mask_token_id=VOCAB, progress=False)
    assert rows == again  # seeded masking
    with pytest.raises(ValueError, match=r"max_position_embeddings=16"):
        evaluate_mlm_accuracy(model, corpus, [32], mask_token_id=VOCAB, progress=False)


def test_bad_arguments(corpus):
    model = tiny_gpt("alibi")
    with pytest.raises(ValueError, match="mode"):
        evaluate_perplexity(model, corpus, [8], mode="strided", progress=False)
    with pytest.raises(ValueError, match="stride"):
        evaluate_perplexity(model, corpus, [8], mode="sliding", stride=9, progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate_perplexity(model, corpus[:10], [16], progress=False)
