"""Remote code: a saved decoder carries its code, and a clean process without hf_relpos loads it and generates."""

import ast
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import WITHOUT_HF_RELPOS, clean_env, tiny_gpt_config

from hf_relpos import POSITION_ENCODINGS, RelPosGPTForCausalLM, RelPosGPTForSequenceClassification


ENCODINGS = list(POSITION_ENCODINGS)
CODE_FILES = (
    "configuration_relpos.py", "modeling_relpos_gpt.py", "modeling_relpos_decoder.py", "attention.py", "encodings.py",
    "kernels.py",
)
AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification")
NEW_TOKENS = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")




def perturb_(model: torch.nn.Module) -> None:
    """Move every parameter off its init (zero biases, unit norms, zero-init position terms) so that a weight that
    fails to load shows in the outputs."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))


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
        assert type(model).__name__ == "RelPosGPTForCausalLM", type(model)
        assert not type(model).__module__.startswith("hf_relpos"), type(model).__module__
        with torch.no_grad():
            logits = model(ref["ids"], attention_mask=ref["mask"]).logits
        tokens = model.generate(
            ref["ids"], attention_mask=ref["mask"], max_new_tokens=ref["new"], min_new_tokens=ref["new"],
            do_sample=False,
        )
        report[name] = {
            "logits_diff": (logits - ref["logits"]).abs().max().item(),
            "tokens_equal": torch.equal(tokens, ref["tokens"]),
            "module": type(model).__module__,
        }
    ref = reference["classifier"]
    model = AutoModelForSequenceClassification.from_pretrained(ref["dir"], trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ref["ids"], attention_mask=ref["mask"]).logits
    report["classifier"] = {"logits_diff": (logits - ref["logits"]).abs().max().item(), "tokens_equal": True,
                            "module": type(model).__module__}
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def saved_tree(tmp_path_factory):
    """One folder per encoding (and a classifier), with reference logits and greedy tokens, in one tmp tree."""
    root = tmp_path_factory.mktemp("remote_gpt")
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    reference = {"causal_lm": {}}
    for name in ENCODINGS:
        torch.manual_seed(0)
        model = RelPosGPTForCausalLM(tiny_gpt_config(name)).eval()
        perturb_(model)
        model.save_pretrained(root / name)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
        reference["causal_lm"][name] = {"ids": ids, "mask": mask, "logits": logits, "tokens": tokens, "new": NEW_TOKENS}
    torch.manual_seed(0)
    classifier = RelPosGPTForSequenceClassification(tiny_gpt_config("t5", num_labels=3)).eval()
    perturb_(classifier)
    classifier.save_pretrained(root / "classifier_t5")
    with torch.no_grad():
        logits = classifier(ids, attention_mask=mask).logits
    reference["classifier"] = {"dir": "classifier_t5", "ids": ids, "mask": mask, "logits": logits}
    torch.save(reference, root / "reference.pt")
    return root


@pytest.mark.parametrize("name", ENCODINGS)
def test_save_pretrained_writes_the_auto_map_of_every_auto_class(saved_tree, name):
    config = json.loads((saved_tree / name / "config.json").read_text())
    assert config["model_type"] == "relpos_gpt"
    assert config["position_embedding_type"] == name
    for auto_class in AUTO_CLASSES:
        module, _, class_name = config["auto_map"][auto_class].partition(".")
        assert (saved_tree / name / f"{module}.py").is_file(), auto_class
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_relpos_gpt.RelPosGPTForCausalLM"


@pytest.mark.parametrize("name", ENCODINGS)
def test_save_pretrained_writes_the_code_and_safetensors(saved_tree, name):
    for filename in CODE_FILES + ("model.safetensors",):
        assert (saved_tree / name / filename).is_file(), filename
    assert not (saved_tree / name / "pytorch_model.bin").exists()


def test_saved_code_imports_only_same_folder_modules_and_installed_packages(saved_tree):
    allowed_top_level = set(sys.stdlib_module_names) | {"torch", "transformers"}
    for filename in CODE_FILES:
        tree = ast.parse((saved_tree / "rope" / filename).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module, f"{filename}: only `from .module import name` travels"
                assert (saved_tree / "rope" / f"{node.module}.py").is_file(), f"{filename}: {node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    assert module.split(".")[0] in allowed_top_level, f"{filename} imports {module}"


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
        assert entry["logits_diff"] == 0.0, (name, entry)
        assert entry["tokens_equal"], (name, entry)
        assert entry["module"].startswith("transformers_modules"), (name, entry)
