"""Trainer-safe loss: under `torchrun --nproc_per_node 2` (gloo, CPU) the logged loss is the single-process loss."""

import json
import os
import subprocess
import sys
import textwrap

import pytest


# Trains the same tiny model on the same global batches (4 sequences a step): either one process with batches of 4
# or two processes with 2 each. Labels mask a different number of tokens per sequence, so each process sees a
# different token count and only a loss divided by the global `num_items_in_batch` matches the single process.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import Trainer, TrainingArguments
    from hf_relpos import RelPosGPTConfig, RelPosGPTForCausalLM

    out, per_device = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (12, 10), generator=generator)
    dataset = []
    for row in range(12):
        labels = ids[row].clone()
        labels[: row % 5 * 2] = -100
        dataset.append({"input_ids": ids[row], "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels})

    torch.manual_seed(0)
    config = RelPosGPTConfig(
        position_embedding_type="alibi", vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = RelPosGPTForCausalLM(config)
    args = TrainingArguments(
        output_dir=out + "/trainer", use_cpu=True, report_to=[], logging_steps=1, max_steps=3, seed=0,
        per_device_train_batch_size=per_device, train_sampling_strategy="sequential", learning_rate=1e-3,
        ddp_find_unused_parameters=False, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        with open(out + "/losses.json", "w") as f:
            json.dump({"losses": losses, "world_size": args.world_size}, f)
    """
)


def run(command: list[str], cwd) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def losses(directory) -> dict:
    return json.loads((directory / "losses.json").read_text())


@pytest.mark.slow
def test_torchrun_two_processes_log_the_single_process_loss(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    run([sys.executable, str(script), str(single), "4"], tmp_path)
    run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(ddp), "2"],
        tmp_path,
    )
    one, two = losses(single), losses(ddp)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["losses"]) == len(two["losses"]) == 3
    first_single, first_ddp = one["losses"][0], two["losses"][0]
    assert abs(first_ddp - first_single) <= 1e-4 * abs(first_single), (one, two)
    # The later steps also agree: gradients are averaged across processes as the single process sums them.
    for a, b in zip(one["losses"], two["losses"], strict=True):
        assert abs(a - b) <= 1e-3 * abs(a), (one, two)
