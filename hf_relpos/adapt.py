"""Teach a converted checkpoint the original's word order: distil the absolute original into it on unlabeled text.

```python
>>> import hf_relpos
>>> student, report = hf_relpos.adapt("path/to/bert", "path/to/bert-alibi", texts, max_steps=600)
>>> report.after["distance"] < report.before["distance"]
True
```

Converting keeps every weight but the absolute position table, so the converted model (the student) has to learn
word order again. The original (the teacher) still knows it. `adapt` minimises, on unlabeled text, the distance
between the student's and the teacher's hidden states after every layer (Sun et al. 2019, "Patient Knowledge
Distillation"; Jiao et al. 2020, "TinyBERT"):

    loss = mean over layers l = 1..L of  sum_tokens |h_student[l] - h_teacher[l]|^2 / sum_tokens |h_teacher[l] - mean|^2

(the embedding output, l = 0, is left out: the teacher's holds the position table that the student no longer has).
Normalising by the teacher's variance makes the loss 1 for a student that outputs the teacher's mean, 0 for the
teacher itself, and comparable across layers and models. It is also the held-out `distance` in the report.

Where the teacher keeps its word order is where it attends, so a second term (`attention_weight`, default 1)
distils its attention maps, `KL(teacher || student)` per layer, head and query token (Wang et al. 2020, "MiniLM").
On the demo's MiniLM converted to rope (150 steps) it raised the held-out last-layer cosine from 0.908 to 0.937
and the fine-tuned accuracy from 0.748 to 0.768 (one run each: inside the noise; docs/RESULTS.md).

Two phases: the new encoding's own parameters (T5's bucket biases, KERPLE's, FIRE's MLP) are fitted first with
everything else frozen, so that the pretrained weights are not bent around a randomly initialised encoding; then
the whole base model trains. ALiBi and RoPE have no parameters: they go straight to the second phase.

Works for any pair of models whose base models return `hidden_states` and `attentions` of the same shapes:
encoders (BERT, RoBERTa, MiniLM) and decoders (GPT-2, Llama). The head of the student (classification, LM) is kept
untouched. This module sits on top of the library, like `convert`: remote code never imports it.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)
from transformers.trainer_pt_utils import get_length_grouped_indices
from transformers.utils import logging


logger = logging.get_logger(__name__)

ADAPTATION_REPORT = "adaptation_report.json"


@dataclass
class AdaptationReport:
    """What `adapt` did. `before` / `after`: student-teacher agreement on the held-out texts (`distance`: the
    normalised hidden-state MSE above, mean over layers; `per_layer`; `cosine`: mean cosine similarity of the last
    hidden states per token). `loss_curve`: `{"step", "phase", "loss"}` every `log_every` steps."""

    teacher: str
    student: str
    position_embedding_type: str
    train_texts: int
    held_out_texts: int
    max_steps: int
    encoding_steps: int
    max_length: int
    batch_size: int
    learning_rate: float
    encoding_learning_rate: float
    seed: int
    attention_weight: float = 0.0
    group_by_length: bool = False
    dropout: bool = False
    text_file: str | None = None
    seconds: float = 0.0
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    loss_curve: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"Adapted {self.student!r} ({self.position_embedding_type}) to {self.teacher!r} in {self.max_steps} "
                f"steps ({self.encoding_steps} on the encoding alone), {self.seconds:.0f} s: held-out distance "
                f"{self.before['distance']:.4f} -> {self.after['distance']:.4f}, last-layer cosine "
                f"{self.before['cosine']:.4f} -> {self.after['cosine']:.4f}")


def _base(model: PreTrainedModel) -> PreTrainedModel:
    return model.base_model if isinstance(model, PreTrainedModel) else model


def _name(model_or_path: Any) -> str:
    if isinstance(model_or_path, (str, os.PathLike)):
        return os.fspath(model_or_path)
    return getattr(getattr(model_or_path, "config", None), "_name_or_path", "") or type(model_or_path).__name__


def tokenize_texts(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[list[int]]:
    """Token ids of every text with the tokenizer's special tokens; a text longer than `max_length` is split into
    consecutive windows of `max_length` tokens (special tokens included), so no text is cut off."""
    if max_length <= tokenizer.num_special_tokens_to_add(pair=False):
        raise ValueError(f"max_length={max_length} leaves no room for tokens beside the special tokens.")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, return_overflowing_tokens=True)
    return [list(ids) for ids in encoded["input_ids"]]


def _collate(examples: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask`, `[batch, longest]`."""
    length = max(len(ids) for ids in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, ids in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _states(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], attentions: bool = False
) -> tuple[tuple, tuple | None]:
    """The base model's hidden states after every layer, each `[batch, seq, hidden]`, and, with `attentions`, its
    attention probabilities of every layer, each `[batch, heads, seq, seq]`."""
    outputs = _base(model)(**batch, output_hidden_states=True, output_attentions=attentions)
    return outputs.hidden_states[1:], outputs.attentions if attentions else None


def attention_divergence(
    student_attentions: Sequence[torch.Tensor], teacher_attentions: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Per layer, `KL(teacher || student)` of the attention distributions of every head and real query token
    (`attention_mask` `[batch, seq]`), averaged over them (Wang et al. 2020, "MiniLM"); returns `[layers]`."""
    weights = attention_mask[:, None, :].to(teacher_attentions[0].dtype)
    divergences = []
    for student, teacher in zip(student_attentions, teacher_attentions, strict=True):
        per_row = (torch.xlogy(teacher, teacher) - teacher * student.clamp_min(1e-12).log()).sum(-1)
        divergences.append((per_row * weights).sum() / (weights.sum() * teacher.shape[1]))
    return torch.stack(divergences)


def layer_distances(
    student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor], attention_mask: torch.Tensor
) -> torch.Tensor:
    """Per layer, `sum |s - t|^2 / sum |t - mean(t)|^2` over the real tokens (`attention_mask` `[batch, seq]`);
    returns `[layers]`."""
    if len(student_states) != len(teacher_states):
        raise ValueError(f"The student has {len(student_states)} layers and the teacher {len(teacher_states)}: "
                         "adapt needs the same architecture on both sides.")
    mask = attention_mask.unsqueeze(-1).to(teacher_states[0].dtype)
    distances = []
    for student, teacher in zip(student_states, teacher_states, strict=True):
        mean = (teacher * mask).sum((0, 1)) / mask.sum()
        distances.append((((student - teacher) ** 2) * mask).sum() / (((teacher - mean) ** 2) * mask).sum())
    return torch.stack(distances)


@contextmanager
def _attention_kernel(models: Sequence[PreTrainedModel], kernel: str | None) -> Iterator[None]:
    """Run `models` on the attention `kernel` (None: as they are), each restored to its own afterwards."""
    if kernel is None:
        yield
        return
    own = [model.config._attn_implementation for model in models]
    try:
        for model in models:
            model.set_attn_implementation(kernel)
        yield
    finally:
        for model, implementation in zip(models, own, strict=True):
            model.set_attn_implementation(implementation)


@torch.no_grad()
def agreement(
    student: PreTrainedModel, teacher: PreTrainedModel, examples: list[list[int]], pad_token_id: int,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Student-teacher agreement on `examples` (token ids): `distance` (mean over layers of `layer_distances`,
    0 when the student is the teacher), `per_layer` and `cosine` (mean cosine similarity of the last hidden
    states over real tokens)."""
    was_training = student.training
    student.eval()
    per_layer, cosine, tokens = 0.0, 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = _collate(examples[start:start + batch_size], pad_token_id)
        student_states, teacher_states = _states(student, batch)[0], _states(teacher, batch)[0]
        count = int(batch["attention_mask"].sum())
        per_layer = per_layer + layer_distances(student_states, teacher_states, batch["attention_mask"]) * count
        similarity = torch.nn.functional.cosine_similarity(student_states[-1], teacher_states[-1], dim=-1)
        cosine += float((similarity * batch["attention_mask"]).sum())
        tokens += count
    student.train(was_training)
    per_layer = (per_layer / tokens).tolist()
    return {"distance": sum(per_layer) / len(per_layer), "per_layer": per_layer, "cosine": cosine / tokens}


def load_student(path: str | os.PathLike) -> PreTrainedModel:
    """A converted checkpoint with the head it was saved with (its `architectures`)."""
    from .convert import get_model_class, infer_task, model_family

    config = AutoConfig.from_pretrained(path)
    return get_model_class(infer_task(config), model_family(config)).from_pretrained(path)


def _encoding_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    encoding = getattr(_base(model), "position_encoding", None)
    return list(encoding.parameters()) if encoding is not None else []


def adapt(
    original: str | os.PathLike | PreTrainedModel,
    converted: str | os.PathLike | PreTrainedModel,
    texts: Sequence[str],
    *,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    held_out: Sequence[str] | float = 0.05,
    max_steps: int = 600,
    encoding_steps: int | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    learning_rate: float = 3e-4,
    encoding_learning_rate: float = 1e-2,
    warmup_ratio: float = 0.06,
    seed: int = 0,
    log_every: int = 10,
    attention_weight: float = 1.0,
    group_by_length: bool = True,
    dropout: bool = True,
    progress: bool = True,
) -> tuple[PreTrainedModel, AdaptationReport]:
    """Distil `original` (the absolute teacher) into `converted` (the student) on the unlabeled `texts`.

    Args:
        original: the absolute checkpoint (folder, Hub id or model); its base model is the teacher, kept frozen.
        converted: the converted checkpoint (folder or model, any head); trained in place and returned.
        texts: real text, one document per entry; longer than `max_length` tokens is split into windows.
        tokenizer: the tokenizer both models share (default: the original's).
        held_out: texts to measure agreement on, or the fraction of `texts` set aside for it.
        max_steps: optimiser steps in all; `encoding_steps` of them (default 10%, 0 when the encoding has no
            parameters) train only the new encoding's parameters. Those start from their initialisation, so they
            train at `encoding_learning_rate` in both phases (on the demo's t5, keeping that rate after the first
            phase left about 40% less held-out distance: 0.084 -> 0.051 and 0.109 -> 0.063, docs/RESULTS.md).
        learning_rate: AdamW's peak rate for the rest of the base model, linear warm-up over `warmup_ratio` and
            decay. On the demo's MiniLM converted to rope, 300 steps reached a held-out distance of 0.129 at 1e-4,
            0.092 at 3e-4, 0.086 at 6e-4 and 0.093 at 1e-3 (docs/RESULTS.md).
        attention_weight: weight of a second term, the teacher's attention maps distilled into the student's
            (`attention_divergence`); both models run the `eager` kernel while it is on.
        group_by_length: batch texts of similar length together (about half the time per step on short texts of
            mixed length, where random batches are mostly padding).
        dropout: run the student with its dropout on, as fine-tuning will (TinyBERT and DistilBERT distil this
            way); `seed` fixes its masks. On the demo's MiniLM (seeds 42-46) it left held-out distances about 0.025
            larger and fine-tuned accuracies higher by 0.5 (alibi), 0.7 (rope) and 1.1 (t5) points on average
            (docs/RESULTS.md).

    Returns:
        The student (same object when a model was passed) in eval mode and an `AdaptationReport` with the loss
        curve and the held-out agreement before and after.
    """
    from tqdm.auto import tqdm

    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}.")
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer or _name(original))
    teacher = AutoModel.from_pretrained(original) if isinstance(original, (str, os.PathLike)) else original
    student = load_student(converted) if isinstance(converted, (str, os.PathLike)) else converted
    teacher.eval().requires_grad_(False)

    texts = list(texts)
    if isinstance(held_out, float):
        if not 0.0 < held_out < 1.0:
            raise ValueError(f"held_out must be a fraction in (0, 1) or a list of texts, got {held_out}.")
        random.Random(seed).shuffle(texts)
        cut = max(1, round(len(texts) * held_out))
        texts, held_out = texts[cut:], texts[:cut]
    if not texts or not held_out:
        raise ValueError("adapt needs texts to train on and held-out texts to measure on; got "
                         f"{len(texts)} and {len(held_out)}.")
    train_examples = tokenize_texts(texts, tokenizer, max_length)
    eval_examples = tokenize_texts(list(held_out), tokenizer, max_length)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    encoding_parameters = _encoding_parameters(student)
    if encoding_steps is None:
        encoding_steps = max_steps // 10 if encoding_parameters else 0
    if encoding_steps and not encoding_parameters:
        logger.warning("The student's encoding has no parameters: skipping the encoding-only phase.")
        encoding_steps = 0
    encoding_steps = min(encoding_steps, max_steps)
    report = AdaptationReport(
        teacher=_name(original), student=_name(converted),
        position_embedding_type=getattr(student.config, "position_embedding_type", "absolute"),
        train_texts=len(texts), held_out_texts=len(held_out), max_steps=max_steps, encoding_steps=encoding_steps,
        max_length=max_length, batch_size=batch_size, learning_rate=learning_rate,
        encoding_learning_rate=encoding_learning_rate, seed=seed, attention_weight=attention_weight,
        group_by_length=group_by_length, dropout=dropout,
    )
    report.before = agreement(student, teacher, eval_examples, pad_token_id)

    attentions = attention_weight > 0  # the attention probabilities come from the eager kernel
    # `seed` alone fixes the batches and the dropout masks; the caller's random state is left as it was.
    with _attention_kernel((student, teacher), "eager" if attentions else None), torch.random.fork_rng():
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        batches = _batches(train_examples, batch_size, pad_token_id, generator, group_by_length)
        start = time.time()
        student.train(dropout)  # the teacher runs without dropout: its hidden states are the exact targets
        bar = tqdm(total=max_steps, desc="adapt", disable=not progress)
        # The encoding's parameters start from their initialisation, the rest from pretrained values: they keep
        # their own, higher rate (and no weight decay) in both phases.
        own = {id(parameter) for parameter in encoding_parameters}
        pretrained = [parameter for parameter in _base(student).parameters() if id(parameter) not in own]
        groups = [(encoding_parameters, encoding_learning_rate, 0.0), (pretrained, learning_rate, 0.01)]
        phases = [("encoding", encoding_steps, groups[:1]), ("all", max_steps - encoding_steps, groups)]
        step, running = 0, []
        for phase, steps, phase_groups in phases:
            if steps == 0:
                continue
            parameters = [parameter for group, _, _ in phase_groups for parameter in group]
            student.requires_grad_(False)
            for parameter in parameters:
                parameter.requires_grad_(True)
            optimizer = torch.optim.AdamW([{"params": group, "lr": lr, "weight_decay": decay}
                                           for group, lr, decay in phase_groups if group])
            schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(steps * warmup_ratio), steps)
            for _ in range(steps):
                batch = next(batches)
                with torch.no_grad():
                    teacher_states, teacher_attentions = _states(teacher, batch, attentions)
                student_states, student_attentions = _states(student, batch, attentions)
                loss = layer_distances(student_states, teacher_states, batch["attention_mask"]).mean()
                if attentions:
                    divergence = attention_divergence(student_attentions, teacher_attentions, batch["attention_mask"])
                    loss = loss + attention_weight * divergence.mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                running.append(loss.detach().item())
                bar.set_postfix(phase=phase, loss=f"{running[-1]:.4f}")
                if step % log_every == 0 or step == max_steps:
                    report.loss_curve.append({"step": step, "phase": phase, "loss": sum(running) / len(running)})
                    running = []
                bar.update()
        bar.close()
    student.requires_grad_(True)
    report.seconds = time.time() - start
    report.after = agreement(student, teacher, eval_examples, pad_token_id)
    if math.isnan(report.after["distance"]):
        raise FloatingPointError("Adaptation diverged (NaN distance): lower learning_rate.")
    logger.info(str(report))
    return student.eval(), report


def read_texts(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file, one document each."""
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def adapt_checkpoint(
    original: str | os.PathLike,
    converted: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    text_file: str | os.PathLike,
    overwrite: bool = False,
    **kwargs,
) -> AdaptationReport:
    """`adapt` the checkpoint `converted` to `original` on the lines of `text_file`, and save the result to
    `output_dir` like `convert_checkpoint` does: weights and modelling code, the tokenizer, `conversion_report.json`
    (copied), `adaptation_report.json` and a model card that states the adaptation. As for `convert_checkpoint`, a
    non-empty `output_dir` is replaced only with `overwrite=True`, never one that overlaps a source, and the folder
    is built beside it and renamed into place, so a failed run leaves it as it was. `kwargs` go to `adapt`."""
    from .convert import _check_destination, _replace_directory
    from .hub import write_model_card

    output_dir = os.fspath(output_dir)
    converted = os.fspath(converted)
    for source in (os.fspath(original), converted):
        _check_destination(source, output_dir, overwrite)
    texts = read_texts(text_file)
    tokenizer_source = converted if os.path.isfile(os.path.join(converted, "tokenizer_config.json")) else original
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    student, report = adapt(original, converted, texts, tokenizer=tokenizer, **kwargs)
    report.text_file = os.fspath(text_file)
    with _replace_directory(output_dir, overwrite) as staging:
        student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        conversion_report = os.path.join(converted, "conversion_report.json")
        if os.path.isfile(conversion_report):
            shutil.copy2(conversion_report, staging)
        with open(os.path.join(staging, ADAPTATION_REPORT), "w") as handle:
            json.dump(report.to_dict(), handle, indent=2)
        write_model_card(staging, base_model=report.teacher)
    return report


def _batches(
    examples: list[list[int]], batch_size: int, pad_token_id: int, generator: torch.Generator, group_by_length: bool
):
    """Endless shuffled batches: every example once per pass, a new order every pass. With `group_by_length`, each
    batch holds examples of similar length (transformers' `Trainer(group_by_length=True)` order), so a step does not
    spend most of its time on padding."""
    lengths = [len(ids) for ids in examples]
    while True:
        if group_by_length:
            order = get_length_grouped_indices(lengths, batch_size, generator=generator)
        else:
            order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield _collate([examples[i] for i in order[start:start + batch_size]], pad_token_id)


__all__ = [
    "AdaptationReport", "adapt", "adapt_checkpoint", "agreement", "attention_divergence", "layer_distances",
    "load_student", "read_texts", "tokenize_texts",
]
