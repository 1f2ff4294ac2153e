"""Training features work with the relpos models: gradient checkpointing (same gradients), torch.compile (same
outputs), PEFT LoRA on the attention projections (only LoRA parameters train), Trainer resume from a checkpoint
(same loss curve) and mixed precision through TrainingArguments (finite loss)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from hf_relpos import (
    RelPosBertConfig,
    RelPosBertForSequenceClassification,
    RelPosBertModel,
    RelPosGPTConfig,
    RelPosGPTForCausalLM,
)


def bert_config(name: str, **overrides) -> RelPosBertConfig:
    fields = dict(
        position_embedding_type=name, vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    fields.update(overrides)
    return RelPosBertConfig(**fields)


def gpt(name: str, **overrides) -> RelPosGPTForCausalLM:
    fields = dict(
        position_embedding_type=name, vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    return RelPosGPTForCausalLM(RelPosGPTConfig(**fields))


def bert_classifier(name: str, **overrides) -> RelPosBertForSequenceClassification:
    torch.manual_seed(0)
    return RelPosBertForSequenceClassification(bert_config(name, num_labels=3, **overrides))


def batch(length: int = 10):
    ids = torch.randint(3, 99, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def gradients(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_fn(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["absolute", "t5", "deberta", "rope"])
def test_encoder_gradient_checkpointing_gives_the_same_gradients(name):
    model = bert_classifier(name).train()
    ids, mask = batch()

    def loss_fn(m):
        return m(ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss

    plain = gradients(model, loss_fn)
    model.gradient_checkpointing_enable()
    assert model.bert.encoder.layer[0].gradient_checkpointing
    checkpointed = gradients(model, loss_fn)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["alibi", "relative_key_query", "xpos", "fire"])
def test_decoder_gradient_checkpointing_gives_the_same_gradients(name):
    model = gpt(name).train()
    ids, mask = batch()

    def loss_fn(m):
        return m(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss

    plain = gradients(model, loss_fn)
    model.gradient_checkpointing_enable()
    assert model.transformer.h[0].gradient_checkpointing
    checkpointed = gradients(model, loss_fn)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5, msg=key)


# ----------------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "name", "implementation"),
                         [("encoder", "deberta", "eager"), ("decoder", "rope", "sdpa")])
def test_compiled_forward_equals_eager_mode(arch, name, implementation):
    torch.manual_seed(0)
    model = (RelPosBertModel(bert_config(name)) if arch == "encoder" else gpt(name)).eval()
    model.set_attn_implementation(implementation)
    ids, mask = batch()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask)[0]
        compiled = torch.compile(model, dynamic=False)
        out = compiled(ids, attention_mask=mask)[0]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# PEFT LoRA on the attention projections
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "targets"), [("encoder", ["query", "value"]), ("decoder", ["c_attn"])])
@pytest.mark.parametrize("name", ["t5", "rope"])
def test_lora_on_attention_projections_trains_only_lora_parameters(arch, targets, name):
    ids, mask = batch()
    if arch == "encoder":
        base = bert_classifier(name)
        labels = torch.tensor([0, 2])
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS")
    else:
        base = gpt(name)
        labels = ids.masked_fill(mask == 0, -100)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.train()
    lora_names = {n for n, p in model.named_parameters() if "lora_" in n}
    assert lora_names and all(p.requires_grad for n, p in model.named_parameters() if n in lora_names)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and not p.requires_grad}
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        # The classifier head of SEQ_CLS is trained too (peft's modules_to_save); nothing else.
        assert {n for n in with_grad if "lora_" not in n and "modules_to_save" not in n} == set()
        assert any(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad & lora_names)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# ----------------------------------------------------------------------------------------------------------------
# Trainer: resume from a checkpoint, mixed precision
# ----------------------------------------------------------------------------------------------------------------


class TokenDataset(Dataset):
    """Random token rows with a little structure (each row counts up from a random start)."""

    def __init__(self, rows: int = 48, length: int = 12):
        generator = torch.Generator().manual_seed(0)
        starts = torch.randint(3, 80, (rows, 1), generator=generator)
        self.ids = starts + torch.arange(length)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "attention_mask": torch.ones_like(self.ids[index]),
                "labels": self.ids[index]}


def training_args(output_dir, **overrides) -> TrainingArguments:
    fields = dict(
        output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        save_strategy="steps", save_steps=3, report_to="none", use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.mark.slow
def test_trainer_resume_from_checkpoint_gives_the_same_loss_curve(tmp_path):
    data = TokenDataset()
    full = Trainer(model=gpt("alibi"), args=training_args(tmp_path / "full"), train_dataset=data)
    full.train()
    reference = losses(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    resumed = Trainer(model=gpt("alibi"), args=training_args(tmp_path / "resumed"), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    curve = losses(resumed)
    assert sorted(curve)[-3:] == [4, 5, 6]
    for step in (4, 5, 6):
        assert curve[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_bf16_mixed_precision_through_training_arguments(tmp_path, arch):
    data = TokenDataset(rows=16)
    if arch == "encoder":
        model = bert_classifier("kerple")

        class Labelled(TokenDataset):
            def __getitem__(self, index):
                item = super().__getitem__(index)
                item["labels"] = torch.tensor(int(item["input_ids"][0]) % 3)
                return item

        data = Labelled(rows=16)
    else:
        model = gpt("rope")
    args = training_args(tmp_path, max_steps=3, save_strategy="no", bf16=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert trainer.args.bf16
    curve = losses(trainer)
    assert len(curve) == 3 and all(torch.isfinite(torch.tensor(v)) for v in curve.values()), curve
    assert torch.isfinite(torch.tensor(result.training_loss))
