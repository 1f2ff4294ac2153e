"""The `hf-relpos` command, run as a real subprocess: every user error is one line `hf-relpos: error: ...` on stderr
with exit status 2 and no traceback, nothing is written, and `--help` starts without importing torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertConfig, BertForSequenceClassification


ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "hf_relpos")


def hf_relpos(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hf_relpos_cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("hf-relpos: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "bert"
    BertForSequenceClassification(BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=40)).save_pretrained(folder)
    return folder


@pytest.fixture
def occupied(tmp_path) -> Path:
    """A destination that already holds a user's files."""
    folder = tmp_path / "dst"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"keep me")
    return folder


# -- start-up --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--help"], ["convert", "--help"], ["convert", "only-one-argument"]],
                         ids=["help", "convert-help", "argument-error"])
def test_help_and_argument_errors_do_not_import_torch_or_transformers(args):
    code = ("import sys, hf_relpos_cli\n"
            "try:\n    hf_relpos_cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


# -- convert --------------------------------------------------------------------------------------------------------
def test_unknown_encoding(source, tmp_path):
    result = hf_relpos("convert", source, tmp_path / "dst", "--position-embedding-type", "nonsense")
    assert_one_line_error(result, "unknown --position-embedding-type 'nonsense'", "alibi")
    assert not (tmp_path / "dst").exists()


def test_xpos_on_an_encoder(source, tmp_path):
    result = hf_relpos("convert", source, tmp_path / "dst", "--position-embedding-type", "xpos")
    assert_one_line_error(result, "xpos", "decoder")
    assert not (tmp_path / "dst").exists()


def test_non_empty_destination_is_refused_byte_identical(source, occupied):
    before = snapshot(occupied)
    result = hf_relpos("convert", source, occupied, "--position-embedding-type", "alibi")
    assert_one_line_error(result, f"{occupied} is not empty", "--overwrite")
    assert snapshot(occupied) == before


def test_source_as_destination_is_refused_byte_identical(source):
    before = snapshot(source)
    result = hf_relpos("convert", source, source, "--position-embedding-type", "alibi", "--overwrite")
    assert_one_line_error(result, "never writes into its source")
    assert snapshot(source) == before


@pytest.mark.parametrize("kind", ["absolute", "dot-relative", "under-an-existing-folder"])
def test_missing_local_source_is_a_missing_path_not_a_hub_id(kind, tmp_path):
    (tmp_path / "models").mkdir()
    source = {"absolute": str(tmp_path / "nowhere"), "dot-relative": "./nowhere",
              "under-an-existing-folder": "models/nowhere"}[kind]
    result = hf_relpos("convert", source, tmp_path / "dst", "--position-embedding-type", "alibi", cwd=tmp_path)
    assert_one_line_error(result, f"SRC {source} does not exist")
    assert not (tmp_path / "dst").exists()


def test_bad_json_option(source, tmp_path):
    result = hf_relpos("convert", source, tmp_path / "dst", "--position-embedding-type", "rope",
                       "--rope-parameters", "{rope_type: default")
    assert_one_line_error(result, "--rope-parameters", "not valid JSON")


def test_invalid_config_value_from_the_library(source, tmp_path):
    result = hf_relpos("convert", source, tmp_path / "dst", "--position-embedding-type", "relative_key",
                       "--max-relative-positions", "0")
    assert_one_line_error(result, "max_relative_positions must be an integer > 0, got 0")
    assert not (tmp_path / "dst").exists()


def test_unknown_task(source, tmp_path):
    result = hf_relpos("convert", source, tmp_path / "dst", "--position-embedding-type", "alibi", "--task", "chat")
    assert_one_line_error(result, "unknown --task 'chat'", "sequence-classification")


# -- push and card ----------------------------------------------------------------------------------------------------
def test_push_of_a_missing_folder(tmp_path):
    result = hf_relpos("push", tmp_path / "nowhere", "me/model")
    assert_one_line_error(result, f"DIR {tmp_path / 'nowhere'} does not exist")


def test_push_refuses_a_symlink_out_of_the_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "relpos_bert"}))
    (folder / "model.safetensors").write_bytes(b"")
    (tmp_path / "secret.txt").write_text("password")
    (folder / "vocab.txt").symlink_to("../secret.txt")
    assert_one_line_error(hf_relpos("push", folder, "me/model", "--dry-run"), "vocab.txt ->", "secret.txt")


def test_card_of_a_missing_folder(tmp_path):
    assert_one_line_error(hf_relpos("card", tmp_path / "nowhere"), "does not exist")
