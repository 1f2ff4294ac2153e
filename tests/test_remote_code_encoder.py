"""Checkpoints that load anywhere: save every encoding (and every head), then load each folder through its Auto
class with trust_remote_code in a fresh Python process in which hf_relpos cannot be imported; outputs match
exactly."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ENCODER_ENCODINGS, WITHOUT_HF_RELPOS, clean_env, tiny_bert_config

from hf_relpos import (
    RelPosBertForMaskedLM,
    RelPosBertForMultipleChoice,
    RelPosBertForQuestionAnswering,
    RelPosBertForSequenceClassification,
    RelPosBertForTokenClassification,
    RelPosBertModel,
)


AUTO_MAP_KEYS = {
    "AutoConfig",
    "AutoModel",
    "AutoModelForMaskedLM",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMultipleChoice",
}
CODE_FILES = (
    "configuration_relpos.py", "modeling_relpos_bert.py", "attention.py", "encodings.py", "kernels.py"
)
AUTO_CLASS = {
    RelPosBertModel: "AutoModel",
    RelPosBertForMaskedLM: "AutoModelForMaskedLM",
    RelPosBertForSequenceClassification: "AutoModelForSequenceClassification",
    RelPosBertForTokenClassification: "AutoModelForTokenClassification",
    RelPosBertForQuestionAnswering: "AutoModelForQuestionAnswering",
    RelPosBertForMultipleChoice: "AutoModelForMultipleChoice",
}
# Every encoding as the bare model, and every head class with rope (whose frequencies are rebuilt on load).
CASES = [(name, RelPosBertModel) for name in ENCODER_ENCODINGS] + [
    ("rope", cls) for cls in AUTO_CLASS if cls is not RelPosBertModel
]

LOADER = WITHOUT_HF_RELPOS + textwrap.dedent(
    """
    import json, sys

    import torch
    import transformers

    results = {}
    for case in json.load(open("manifest.json")):
        saved = torch.load(case["folder"] + "/reference.pt")
        config = transformers.AutoConfig.from_pretrained(case["folder"], trust_remote_code=True)
        auto_class = getattr(transformers, case["auto_class"])
        model = auto_class.from_pretrained(case["folder"], trust_remote_code=True, attn_implementation="sdpa").eval()
        with torch.no_grad():
            out = model(**saved["inputs"])
        diffs = {key: (out[key] - value).abs().max().item() for key, value in saved["outputs"].items()}
        results[case["folder"]] = {
            "config_class": type(config).__name__,
            "config_module": type(config).__module__,
            "model_class": type(model).__name__,
            "model_module": type(model).__module__,
            "position_embedding_type": model.config.position_embedding_type,
            "max_abs_diff": max(diffs.values()),
        }
    print("RESULTS" + json.dumps(results))
    print("BLOCKED" + str("hf_relpos" not in sys.modules))
    """
)


def case_inputs(model_class) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    if model_class is RelPosBertForMultipleChoice:
        return {"input_ids": torch.stack([ids, ids.flip(-1)], 1), "attention_mask": torch.stack([mask, mask], 1)}
    return {"input_ids": ids, "attention_mask": mask}


def output_tensors(out) -> dict:
    keys = ("last_hidden_state", "pooler_output", "logits", "start_logits", "end_logits")
    return {key: out[key] for key in keys if key in out and out[key] is not None}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    manifest = []
    for index, (name, model_class) in enumerate(CASES):
        torch.manual_seed(index)
        num_labels = 2 if model_class is RelPosBertForQuestionAnswering else 3  # QA splits start/end logits
        config = tiny_bert_config(position_embedding_type=name, num_labels=num_labels)
        model = model_class(config).eval()
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            # Move learned position terms off their near-zero init so that a badly loaded one would show.
            for parameter in model.base_model.position_encoding.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.3)
        folder = root / f"{index:02d}_{name}_{model_class.__name__}"
        model.save_pretrained(folder)
        inputs = case_inputs(model_class)
        with torch.no_grad():
            outputs = output_tensors(model(**inputs))
        torch.save({"inputs": inputs, "outputs": outputs}, folder / "reference.pt")
        manifest.append({
            "folder": str(folder), "name": name, "model_class": model_class.__name__,
            "auto_class": AUTO_CLASS[model_class],
        })
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, manifest


@pytest.fixture(scope="module")
def remote_results(saved_models):
    root, manifest = saved_models
    env = clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(root / "modules_cache"))
    (root / "load.py").write_text(LOADER)
    process = subprocess.run(
        [sys.executable, "load.py"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    lines = process.stdout.splitlines()
    results = json.loads(next(line for line in lines if line.startswith("RESULTS"))[len("RESULTS"):])
    blocked = next(line for line in lines if line.startswith("BLOCKED"))
    return results, blocked


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{n}-{c.__name__}" for n, c in CASES])
def test_saved_folder_has_weights_code_and_full_auto_map(saved_models, index):
    _, manifest = saved_models
    folder = manifest[index]["folder"]
    files = set(os.listdir(folder))
    assert "model.safetensors" in files
    assert set(CODE_FILES) <= files, f"missing modelling files: {set(CODE_FILES) - files}"
    config = json.load(open(os.path.join(folder, "config.json")))
    assert set(config["auto_map"]) == AUTO_MAP_KEYS
    assert config["model_type"] == "relpos_bert"
    assert config["position_embedding_type"] == manifest[index]["name"]


def test_saved_code_imports_only_relative_siblings(saved_models):
    _, manifest = saved_models
    folder = manifest[0]["folder"]
    siblings = {file[:-3] for file in CODE_FILES}
    for file in CODE_FILES:
        tree = ast.parse(open(os.path.join(folder, file)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in siblings, f"{file}: from {'.' * node.level}{node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    assert not name.startswith("hf_relpos"), f"{file}: absolute import of {name}"


@pytest.mark.slow  # one subprocess loads every folder: ~10 s on an idle 2-core machine, 30 s on a busy one
def test_subprocess_could_not_import_hf_relpos(remote_results):
    _, blocked = remote_results
    assert blocked == "BLOCKEDTrue"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{n}-{c.__name__}" for n, c in CASES])
def test_remote_code_load_reproduces_outputs_exactly(saved_models, remote_results, index):
    _, manifest = saved_models
    results, _ = remote_results
    case = manifest[index]
    result = results[case["folder"]]
    assert result["model_class"] == case["model_class"]
    assert result["config_class"] == "RelPosBertConfig"
    assert result["position_embedding_type"] == case["name"]
    assert result["model_module"].startswith("transformers_modules"), result["model_module"]
    assert result["config_module"].startswith("transformers_modules"), result["config_module"]
    assert result["max_abs_diff"] == 0.0
