"""examples/run_translation.py never trains a random decoder silently: a checkpoint whose layout the chosen decoder
cannot load is refused with the class that can, before any training."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, BertTokenizerFast, GPT2Config, GPT2LMHeadModel, T5Config


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "run_translation.py"
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def run_translation():
    spec = importlib.util.spec_from_file_location("run_translation", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Tiny BERT, GPT-2, T5 (config only) and a BERT-typed checkpoint whose weights carry foreign names, each saved
    with a tiny BERT tokenizer, and a two-row training file."""
    root = tmp_path_factory.mktemp("checkpoints")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefgh"]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    folders = {name: root / name for name in ("bert", "gpt2", "t5", "renamed")}
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), **SMALL))
    bert.save_pretrained(folders["bert"])
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4)).save_pretrained(
        folders["gpt2"]
    )
    T5Config(vocab_size=len(tokenizer), d_model=32, num_layers=2, num_heads=4).save_pretrained(folders["t5"])
    bert.config.save_pretrained(folders["renamed"])
    save_file({f"foreign.{key}": value.contiguous() for key, value in bert.state_dict().items()},
              folders["renamed"] / "model.safetensors")
    for folder in folders.values():
        tokenizer.save_pretrained(folder)
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"source": "a b c", "target": "c b a"}) + "\n" for _ in range(2)))
    return {**{name: str(folder) for name, folder in folders.items()}, "train": str(train), "out": str(root / "out")}


def main(checkpoints, *args):
    return run_translation().main([
        *args, "--train_file", checkpoints["train"], "--output_dir", checkpoints["out"], "--do_train",
        "--max_steps", "1", "--use_cpu", "--report_to", "none",
    ])


def test_bert_checkpoint_is_refused_as_a_gpt2_decoder_naming_the_bert_decoder(checkpoints):
    with pytest.raises(ValueError, match="use --decoder_class RelPosBertForCausalLM"):
        main(checkpoints, "--model_name_or_path", checkpoints["bert"], "--decoder_class", "RelPosGPTForCausalLM")


def test_gpt2_checkpoint_is_refused_as_a_bert_decoder_naming_the_gpt_decoder(checkpoints):
    with pytest.raises(ValueError, match="use --decoder_class RelPosGPTForCausalLM"):
        main(checkpoints, "--encoder_name_or_path", checkpoints["bert"], "--decoder_name_or_path",
             checkpoints["gpt2"], "--decoder_class", "RelPosBertForCausalLM")


def test_checkpoint_no_relpos_decoder_can_load_is_refused_naming_both_decoders(checkpoints):
    with pytest.raises(ValueError, match="model_type 't5'.*RelPosBertForCausalLM.*RelPosGPTForCausalLM"):
        main(checkpoints, "--encoder_name_or_path", checkpoints["bert"], "--decoder_name_or_path", checkpoints["t5"])


def test_gpt2_checkpoint_is_refused_as_the_encoder(checkpoints):
    with pytest.raises(ValueError, match="the encoder is RelPosBertModel"):
        main(checkpoints, "--encoder_name_or_path", checkpoints["gpt2"], "--decoder_name_or_path", checkpoints["gpt2"])


def test_decoder_checkpoint_whose_weights_do_not_load_is_refused_instead_of_trained_from_random(checkpoints):
    with pytest.raises(ValueError, match="it would train a randomly initialised decoder"):
        main(checkpoints, "--encoder_name_or_path", checkpoints["bert"], "--decoder_name_or_path",
             checkpoints["renamed"])


@pytest.mark.parametrize("family", ["relpos", "transformers"])
def test_cross_attention_init_self_attention_starts_cross_attention_as_the_pretrained_self_attention(
    checkpoints, family
):
    module = run_translation()
    encodings = {"transformers_bert2bert": True} if family == "transformers" else {
        "encoder_position_embedding_type": "alibi", "decoder_position_embedding_type": "alibi"}
    args = module.ModelArguments(model_name_or_path=checkpoints["bert"], cross_attention_init="self_attention",
                                 **encodings)
    model = module.build_model(args, BertTokenizerFast.from_pretrained(checkpoints["bert"]))
    pretrained = BertModel.from_pretrained(checkpoints["bert"]).state_dict()
    decoder = model.decoder.state_dict()
    for layer in range(SMALL["num_hidden_layers"]):
        for part in ("self.query.weight", "self.key.bias", "self.value.weight", "output.dense.weight",
                     "output.LayerNorm.weight"):
            torch.testing.assert_close(decoder[f"bert.encoder.layer.{layer}.crossattention.{part}"],
                                       pretrained[f"encoder.layer.{layer}.attention.{part}"], rtol=0, atol=0)


def test_cross_attention_init_random_leaves_cross_attention_unlike_self_attention(checkpoints):
    module = run_translation()
    args = module.ModelArguments(model_name_or_path=checkpoints["bert"], encoder_position_embedding_type="alibi",
                                 decoder_position_embedding_type="alibi")
    decoder = module.build_model(args, BertTokenizerFast.from_pretrained(checkpoints["bert"])).decoder.state_dict()
    assert not torch.equal(decoder["bert.encoder.layer.0.crossattention.self.query.weight"],
                           decoder["bert.encoder.layer.0.attention.self.query.weight"])


def test_unknown_cross_attention_init_is_refused_naming_the_choices(checkpoints):
    with pytest.raises(ValueError, match=r"--cross_attention_init must be one of \['random', 'self_attention'\]"):
        main(checkpoints, "--model_name_or_path", checkpoints["bert"], "--cross_attention_init", "copy")
