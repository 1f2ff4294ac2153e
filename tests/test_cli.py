"""The `hf-relpos card` and `hf-relpos push --dry-run` subcommands on a saved model."""

import json

import pytest
from huggingface_hub import ModelCard

from hf_relpos import RelPosBertConfig, RelPosBertForSequenceClassification, RelPosGPTConfig, RelPosGPTForCausalLM
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
        "attention.py", "encodings.py", "kernels.py",
    }


def test_push_refuses_pickled_weights(saved_model, capsys):
    (saved_model / "pytorch_model.bin").write_bytes(b"not safetensors")
    assert main(["push", str(saved_model), "me/model", "--dry-run"]) == 2
    assert "pytorch_model.bin" in capsys.readouterr().err


def test_extrapolate_writes_the_table_json_and_plot_and_marks_absolute_beyond_its_table(tmp_path, capsys):
    models = []
    for name in ("alibi", "absolute"):
        config = RelPosGPTConfig(position_embedding_type=name, n_embd=32, n_layer=1, n_head=4, vocab_size=256,
                                 n_positions=16)
        RelPosGPTForCausalLM(config).save_pretrained(tmp_path / name)
        models.append(str(tmp_path / name))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    output = tmp_path / "result"
    code = main(["extrapolate", *models, "--text-file", str(text), "--lengths", "16", "32", "--tokenizer", "bytes",
                 "--output", str(output), "--no-progress"])
    assert code == 0
    results = json.loads(output.with_suffix(".json").read_text())
    assert set(results) == set(models)
    assert "n/a" in output.with_suffix(".md").read_text()
    assert output.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "max_position_embeddings" in capsys.readouterr().err
