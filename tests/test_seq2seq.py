"""BERT2BERT from one checkpoint (Rothe et al. 2020): `load_seq2seq` warm-starts a RelPosBertModel encoder and a
RelPosBertForCausalLM decoder from the same BERT checkpoint, each with its own encoding; the result saves with the
code of both halves and loads with trust_remote_code where hf_relpos cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import WITHOUT_HF_RELPOS, clean_env, tiny_bert_config, tiny_gpt_config
from transformers import BertConfig, BertModel, EncoderDecoderModel

from hf_relpos import RelPosBertModel, RelPosEncoderDecoderModel, RelPosGPTForCausalLM
from hf_relpos.cli import main as cli_main
from hf_relpos.convert import load_seq2seq


START, STOP = 1, 2  # BERT2BERT starts the target with [CLS] and ends it with [SEP]: here two ids of the tiny vocab
pytestmark = pytest.mark.filterwarnings("ignore:Version v4.12.0 introduces:FutureWarning")


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory) -> str:
    """A tiny BERT saved by transformers' own BertModel: the one checkpoint both halves start from."""
    torch.manual_seed(0)
    fields = {key: value for key, value in tiny_bert_config().to_dict().items() if key in BertConfig().to_dict()}
    folder = tmp_path_factory.mktemp("bert")
    BertModel(BertConfig(**fields)).save_pretrained(folder)
    return str(folder)


def warm_start(checkpoint: str, encoder: str, decoder: str) -> RelPosEncoderDecoderModel:
    torch.manual_seed(0)
    model = load_seq2seq(checkpoint, encoder, decoder, decoder_start_token_id=START, eos_token_id=STOP)
    with torch.no_grad():
        # Move learned position terms off their near-zero init so that a badly reloaded one would show.
        for half in (model.encoder, model.decoder.bert):
            for parameter in half.position_encoding.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def sources() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def test_warm_start_loads_every_weight_but_the_position_table_and_reports_cross_attention_as_new(bert_checkpoint):
    report = warm_start(bert_checkpoint, "alibi", "alibi").conversion_report
    assert report.encoder.dropped_position_weights == ["embeddings.position_embeddings.weight"]
    assert report.decoder.dropped_position_weights == ["embeddings.position_embeddings.weight"]
    assert not report.encoder.newly_initialized
    # The encoder of an encoder-decoder has no pooler: the decoder reads every state.
    assert report.encoder.unused_checkpoint_weights == ["pooler.dense.bias", "pooler.dense.weight"]
    new = report.decoder.newly_initialized
    assert new and all("crossattention" in key or key.startswith("cls.") for key in new), new
    assert {f"bert.encoder.layer.{i}.crossattention.self.query.weight" for i in range(2)} <= set(new)
    # Only the encoder's pooler is left over in the decoder: every encoder-stack weight was loaded into it.
    assert report.decoder.unused_checkpoint_weights == ["pooler.dense.bias", "pooler.dense.weight"]


def test_warm_started_model_is_an_encoder_decoder_with_bert_start_and_end_tokens(bert_checkpoint):
    model = warm_start(bert_checkpoint, "t5", "rope")
    assert isinstance(model, EncoderDecoderModel)
    assert (model.encoder.config.position_embedding_type, model.decoder.config.position_embedding_type) == ("t5",
                                                                                                           "rope")
    assert model.decoder.config.is_decoder and model.decoder.config.add_cross_attention
    assert not model.encoder.config.is_decoder
    assert model.generation_config.decoder_start_token_id == START
    assert model.generation_config.eos_token_id == STOP


def test_absolute_warm_start_equals_transformers_bert2bert(bert_checkpoint):
    reference = EncoderDecoderModel.from_encoder_decoder_pretrained(bert_checkpoint, bert_checkpoint).eval()
    reference.config.decoder_start_token_id, reference.config.pad_token_id = START, 0
    model = warm_start(bert_checkpoint, "absolute", "absolute")
    # The new cross-attention is random in both: give ours transformers' draw.
    assert not model.load_state_dict(reference.state_dict(), strict=False).missing_keys
    ids, mask = sources()
    labels = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, labels=labels)
        actual = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.loss, expected.loss)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                  decoder_start_token_id=START)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_cli_convert_task_seq2seq_saves_both_halves_code_and_auto_map(bert_checkpoint, tmp_path):
    destination = tmp_path / "bert2bert"
    code = cli_main(["convert", bert_checkpoint, str(destination), "--position-embedding-type", "alibi",
                     "--task", "seq2seq", "--decoder-position-embedding-type", "t5", "--no-tokenizer"])
    assert code == 0
    config = json.loads((destination / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_relpos_encoder_decoder.RelPosEncoderDecoderModel"
    assert (config["encoder"]["position_embedding_type"], config["decoder"]["position_embedding_type"]) == ("alibi",
                                                                                                           "t5")
    assert {"modeling_relpos_encoder_decoder.py", "modeling_relpos_bert.py", "configuration_relpos.py",
            "attention.py", "encodings.py", "kernels.py"} <= set(os.listdir(destination))
    report = json.loads((destination / "conversion_report.json").read_text())
    assert report.keys() == {"encoder", "decoder", "cross_attention_init"}
    assert report["cross_attention_init"] == "random"


def test_cross_attention_init_self_attention_copies_each_layers_pretrained_self_attention(bert_checkpoint):
    model = load_seq2seq(bert_checkpoint, "alibi", "alibi", decoder_start_token_id=START, eos_token_id=STOP,
                         cross_attention_init="self_attention")
    pretrained = BertModel.from_pretrained(bert_checkpoint).state_dict()
    decoder = model.decoder.state_dict()
    for layer in range(model.decoder.config.num_hidden_layers):
        for part in ("self.query.weight", "self.key.weight", "self.value.bias", "output.dense.weight",
                     "output.LayerNorm.bias"):
            torch.testing.assert_close(decoder[f"bert.encoder.layer.{layer}.crossattention.{part}"],
                                       pretrained[f"encoder.layer.{layer}.attention.{part}"], rtol=0, atol=0)
    assert model.conversion_report.cross_attention_init == "self_attention"


def test_unknown_cross_attention_init_is_refused_naming_the_choices(bert_checkpoint):
    with pytest.raises(ValueError, match=r"cross_attention_init must be one of \['random', 'self_attention'\]"):
        load_seq2seq(bert_checkpoint, "alibi", "alibi", cross_attention_init="copy")


def test_cli_cross_attention_init_is_recorded_in_the_report_and_needs_task_seq2seq(bert_checkpoint, tmp_path, capsys):
    destination = tmp_path / "bert2bert"
    assert cli_main(["convert", bert_checkpoint, str(destination), "--position-embedding-type", "alibi", "--task",
                     "seq2seq", "--cross-attention-init", "self_attention", "--no-tokenizer"]) == 0
    report = json.loads((destination / "conversion_report.json").read_text())
    assert report["cross_attention_init"] == "self_attention"
    assert cli_main(["convert", bert_checkpoint, str(tmp_path / "other"), "--position-embedding-type", "alibi",
                     "--cross-attention-init", "self_attention"]) == 2
    assert "--cross-attention-init needs --task seq2seq" in capsys.readouterr().err


def test_cli_refuses_a_decoder_encoding_without_task_seq2seq(bert_checkpoint, tmp_path, capsys):
    code = cli_main(["convert", bert_checkpoint, str(tmp_path / "out"), "--position-embedding-type", "alibi",
                     "--decoder-position-embedding-type", "t5"])
    assert code == 2
    assert "--task seq2seq" in capsys.readouterr().err


LOADER = WITHOUT_HF_RELPOS + textwrap.dedent(
    """
    import json, sys

    import torch
    import transformers

    results = {}
    for folder in json.load(open("manifest.json")):
        saved = torch.load(folder + "/reference.pt")
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
        generated = model.generate(**saved["inputs"], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        with torch.no_grad():
            logits = model(**saved["inputs"], decoder_input_ids=generated).logits
        results[folder] = {
            "model_module": type(model).__module__,
            "decoder_class": type(model.decoder).__name__,
            "same_tokens": torch.equal(generated, saved["generated"]),
            "max_abs_diff": (logits - saved["logits"]).abs().max().item(),
        }
    print("RESULTS" + json.dumps(results))
    print("BLOCKED" + str("hf_relpos" not in sys.modules))
    """
)

# Encoder encoding, decoder encoding, decoder family: BERT2BERT pairs, and a GPT-2-layout decoder.
CASES = [("alibi", "alibi", "bert"), ("t5", "rope", "bert"), ("absolute", "xpos", "bert"), ("fire", "kerple", "gpt")]


@pytest.mark.slow  # one subprocess loads every folder: ~10 s on an idle 2-core machine
def test_saved_seq2seq_reloads_in_a_clean_process_and_generates_identically(bert_checkpoint, tmp_path):
    manifest = []
    ids, mask = sources()
    for index, (encoder_encoding, decoder_encoding, family) in enumerate(CASES):
        if family == "bert":
            model = warm_start(bert_checkpoint, encoder_encoding, decoder_encoding)
        else:
            torch.manual_seed(index)
            model = RelPosEncoderDecoderModel(
                encoder=RelPosBertModel(tiny_bert_config(position_embedding_type=encoder_encoding),
                                        add_pooling_layer=False),
                decoder=RelPosGPTForCausalLM(tiny_gpt_config(decoder_encoding, add_cross_attention=True)),
            ).eval()
            model.generation_config.decoder_start_token_id, model.generation_config.pad_token_id = START, 0
        folder = str(tmp_path / f"{index}_{encoder_encoding}_{decoder_encoding}_{family}")
        model.save_pretrained(folder)
        inputs = {"input_ids": ids, "attention_mask": mask}
        generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        with torch.no_grad():
            logits = model(**inputs, decoder_input_ids=generated).logits
        torch.save({"inputs": inputs, "generated": generated, "logits": logits}, folder + "/reference.pt")
        manifest.append(folder)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "load.py").write_text(LOADER)
    env = clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules_cache"))
    process = subprocess.run([sys.executable, "load.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    lines = process.stdout.splitlines()
    assert "BLOCKEDTrue" in lines
    results = json.loads(next(line for line in lines if line.startswith("RESULTS"))[len("RESULTS"):])
    for folder, (_, _, family) in zip(manifest, CASES, strict=True):
        result = results[folder]
        assert result["model_module"].startswith("transformers_modules"), result
        assert result["decoder_class"] == ("RelPosBertForCausalLM" if family == "bert" else "RelPosGPTForCausalLM")
        assert result["same_tokens"], folder
        assert result["max_abs_diff"] == 0.0, (folder, result)
