"""Remote code: a saved Llama-family decoder carries its code, and a clean process without hf_relpos loads it, gives
the same logits and generates the same tokens (dynamic and static cache, left padding)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import WITHOUT_HF_RELPOS, clean_env, tiny_llama_config

from hf_relpos import RelPosLlamaForCausalLM, RelPosLlamaForSequenceClassification


# One encoding of each family (embed, rotate, position-only bias, content bias with grouped keys); the GPT-2 layout's
# remote-code test covers every encoding of the shared files.
ENCODINGS = ["absolute", "rope", "alibi", "fire", "relative_key_query", "deberta"]
CODE_FILES = (
    "configuration_relpos.py", "modeling_relpos_llama.py", "modeling_relpos_decoder.py", "attention.py",
    "encodings.py", "kernels.py",
)
NEW_TOKENS = 5

# Runs in a clean interpreter: hf_relpos is made unimportable, so only the code saved with each checkpoint can run.
CHILD = WITHOUT_HF_RELPOS + textwrap.dedent(
    """
    import json
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    reference = torch.load("reference.pt")
    report = {}
    for name, ref in reference["causal_lm"].items():
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(ref["ids"], attention_mask=ref["mask"]).logits
        kwargs = dict(attention_mask=ref["mask"], max_new_tokens=ref["new"], min_new_tokens=ref["new"], do_sample=False)
        report[name] = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "logits_diff": (logits - ref["logits"]).abs().max().item(),
            "tokens_equal": torch.equal(model.generate(ref["ids"], **kwargs), ref["tokens"]),
            "static_tokens_equal": torch.equal(
                model.generate(ref["ids"], cache_implementation="static", **kwargs), ref["tokens"]
            ),
        }
    ref = reference["classifier"]
    model = AutoModelForSequenceClassification.from_pretrained(ref["dir"], trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ref["ids"], attention_mask=ref["mask"]).logits
    report["classifier"] = {"class": type(model).__name__, "module": type(model).__module__,
                            "logits_diff": (logits - ref["logits"]).abs().max().item(), "tokens_equal": True,
                            "static_tokens_equal": True}
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def saved_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_llama")
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    reference = {"causal_lm": {}}
    for name in ENCODINGS:
        torch.manual_seed(0)
        model = RelPosLlamaForCausalLM(tiny_llama_config(name)).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        model.save_pretrained(root / name)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
        reference["causal_lm"][name] = {"ids": ids, "mask": mask, "logits": logits, "tokens": tokens, "new": NEW_TOKENS}
    torch.manual_seed(0)
    classifier = RelPosLlamaForSequenceClassification(tiny_llama_config("alibi", num_labels=3)).eval()
    classifier.save_pretrained(root / "classifier_alibi")
    with torch.no_grad():
        logits = classifier(ids, attention_mask=mask).logits
    reference["classifier"] = {"dir": "classifier_alibi", "ids": ids, "mask": mask, "logits": logits}
    torch.save(reference, root / "reference.pt")
    return root


def test_save_pretrained_writes_the_code_safetensors_and_the_family_auto_map(saved_tree):
    config = json.loads((saved_tree / "alibi" / "config.json").read_text())
    assert config["model_type"] == "relpos_llama"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_relpos.RelPosLlamaConfig",
        "AutoModel": "modeling_relpos_llama.RelPosLlamaModel",
        "AutoModelForCausalLM": "modeling_relpos_llama.RelPosLlamaForCausalLM",
        "AutoModelForSequenceClassification": "modeling_relpos_llama.RelPosLlamaForSequenceClassification",
    }
    for filename in CODE_FILES + ("model.safetensors",):
        assert (saved_tree / "alibi" / filename).is_file(), filename


def test_clean_process_without_hf_relpos_loads_every_encoding_and_generates_the_same(saved_tree):
    env = clean_env(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(saved_tree / "modules")
    )
    result = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=saved_tree, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == set(ENCODINGS) | {"classifier"}
    for name, entry in report.items():
        assert entry["module"].startswith("transformers_modules"), (name, entry)
        assert entry["logits_diff"] < 1e-5, (name, entry)
        assert entry["tokens_equal"] and entry["static_tokens_equal"], (name, entry)
    assert report["classifier"]["class"] == "RelPosLlamaForSequenceClassification"
