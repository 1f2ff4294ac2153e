"""The README's Quickstart runs as written: its Python blocks, in order, in a fresh process and folder (the second
one in a process where hf_relpos cannot be imported, as the README says)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import WITHOUT_HF_RELPOS


README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Quickstart"): text.index("\n## ", text.index("## Quickstart") + 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_quickstart_has_the_encoder_the_remote_code_the_decoder_and_the_seq2seq_snippets():
    blocks = quickstart_blocks()
    assert len(blocks) == 4
    assert "save_pretrained" in blocks[0] and "trust_remote_code=True" in blocks[1] and "generate(" in blocks[2]
    assert "load_seq2seq" in blocks[3]


@pytest.mark.slow
def test_quickstart_snippets_run_as_written(tmp_path):
    save, load_anywhere, decoder, seq2seq = quickstart_blocks()
    for code in (save, WITHOUT_HF_RELPOS + load_anywhere, decoder, seq2seq):
        result = run_python(code, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "my-alibi-model" / "model.safetensors").exists()
    assert (tmp_path / "my-alibi-model" / "tokenizer.json").exists()
    assert (tmp_path / "bert2bert-alibi" / "model.safetensors").exists()
    assert (tmp_path / "my-alibi-decoder" / "modeling_relpos_gpt.py").exists()
