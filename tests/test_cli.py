"""The `hf-relpos card` and `hf-relpos push --dry-run` subcommands on a saved model."""

import json

import pytest
from huggingface_hub import ModelCard

from hf_relpos import RelPosBertConfig, RelPosBertForSequenceClassification
from hf_relpos.cli import main


@pytest.fixture
def saved_model(tmp_path):
    config = RelPosBertConfig(
        position_embedding_type="t5", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=37, vocab_size=99,
    )
    folder = tmp_path / "model"
    RelPosBertForSequenceClassification(config).save_pretrained(folder)
    (folder / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.75}))
    return folder


def test_card_writes_a_readme_whose_metadata_the_hub_parses(saved_model):
    assert main(["card", str(saved_model), "--base-model", "org/minilm", "--dataset", "imdb"]) == 0
    data = ModelCard.load(saved_model / "README.md").data.to_dict()
    assert data["base_model"] == "org/minilm"
    assert "hf-relpos" in data["tags"] and "position-encoding-t5" in data["tags"]
    assert data["model-index"][0]["results"][0]["metrics"] == [{"type": "accuracy", "value": 0.75}]


def test_push_dry_run_lists_exactly_what_loading_needs(saved_model, capsys):
    main(["card", str(saved_model)])
    capsys.readouterr()
    assert main(["push", str(saved_model), "me/model", "--dry-run"]) == 0
    listed = set(capsys.readouterr().out.split())
    assert listed == {
        "config.json", "model.safetensors", "README.md", "configuration_relpos.py", "modeling_relpos_bert.py",
        "attention.py", "encodings.py",
    }


def test_push_refuses_pickled_weights(saved_model, capsys):
    (saved_model / "pytorch_model.bin").write_bytes(b"not safetensors")
    assert main(["push", str(saved_model), "me/model", "--dry-run"]) == 2
    assert "pytorch_model.bin" in capsys.readouterr().err
