"""Extractive question answering (SQuAD-style) with a BERT-layout checkpoint converted to another position
encoding. Data: csv/json(l) with `question`, `context` and `answers` ({"text": [...], "answer_start": [...]}).
Contexts longer than `max_seq_length` are split into overlapping windows (`doc_stride`); answers are mapped to token
positions through offset mappings, and predictions back to text spans (the best start <= end within
`max_answer_length` over all windows). Metrics: SQuAD exact match and token F1.

    python examples/run_qa.py --model_name_or_path bert-base-uncased --position_embedding_type alibi \
        --train_file train.jsonl --validation_file valid.jsonl --output_dir out/qa-alibi --do_train --do_eval
"""

import collections
import logging
import os
import re
import string
import sys
from dataclasses import dataclass, field

import numpy as np
from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator, set_seed

from hf_relpos import RelPosBertForQuestionAnswering


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # relpos_example_utils, also when imported by path
import relpos_example_utils as shared  # noqa: E402


logger = logging.getLogger(__name__)


@dataclass
class DataTrainingArguments(shared.DataArguments):
    max_seq_length: int = field(default=384)
    doc_stride: int = field(default=128, metadata={"help": "Overlap between windows of a long context."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer, in tokens."})


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, truth: str) -> float:
    pred_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(truth_tokens)
    same = sum(common.values())
    if not pred_tokens or not truth_tokens:
        return float(pred_tokens == truth_tokens)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict, references: dict) -> dict:
    """`predictions`: id -> text; `references`: id -> list of gold texts. Returns percentages, as SQuAD does."""
    exact = f1 = 0.0
    for qid, golds in references.items():
        prediction = predictions.get(qid, "")
        golds = golds or [""]
        exact += max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
        f1 += max(f1_score(prediction, g) for g in golds)
    n = max(len(references), 1)
    return {"exact_match": 100.0 * exact / n, "f1": 100.0 * f1 / n}


def postprocess(examples, features, start_logits, end_logits, max_answer_length: int) -> dict:
    """The best span (start <= end, at most `max_answer_length` tokens, inside the context) over all windows."""
    by_example = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        by_example[example_id].append(i)
    predictions = {}
    for example in examples:
        best_score, best_text = -np.inf, ""
        for i in by_example[example["id"]]:
            offsets = features[i]["offset_mapping"]
            starts, ends = start_logits[i], end_logits[i]
            for s in np.argsort(starts)[::-1][:20]:
                for e in np.argsort(ends)[::-1][:20]:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = starts[s] + ends[e]
                    if score > best_score:
                        best_score, best_text = score, example["context"][offsets[s][0]: offsets[e][1]]
        predictions[example["id"]] = best_text
    return predictions


def main(argv=None):
    model_args, data_args, training_args = shared.parse_args(
        (shared.ModelArguments, DataTrainingArguments, TrainingArguments), argv
    )
    shared.setup_logging(training_args)
    set_seed(training_args.seed)

    raw = shared.load_raw_datasets(data_args, model_args.cache_dir)
    for split in raw:
        if "id" not in raw[split].column_names:
            raw[split] = raw[split].add_column("id", [f"{split}-{i}" for i in range(len(raw[split]))])
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = RelPosBertForQuestionAnswering.from_pretrained(
        model_args.model_name_or_path, cache_dir=model_args.cache_dir, **shared.config_overrides(model_args)
    )
    logger.info("position_embedding_type = %s", model.config.position_embedding_type)
    max_len = min(data_args.max_seq_length, tokenizer.model_max_length)
    pad_right = tokenizer.padding_side == "right"

    def tokenize(examples, stride):
        questions = [q.lstrip() for q in examples["question"]]
        return tokenizer(
            questions if pad_right else examples["context"], examples["context"] if pad_right else questions,
            truncation="only_second" if pad_right else "only_first", max_length=max_len, stride=stride,
            return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length",
        )

    def prepare_train(examples):
        encoded = tokenize(examples, data_args.doc_stride)
        sample_map = encoded.pop("overflow_to_sample_mapping")
        offsets_all = encoded.pop("offset_mapping")
        context_index = 1 if pad_right else 0
        starts, ends = [], []
        for i, offsets in enumerate(offsets_all):
            cls_index = encoded["input_ids"][i].index(tokenizer.cls_token_id) if tokenizer.cls_token_id in (
                encoded["input_ids"][i]) else 0
            answers = examples["answers"][sample_map[i]]
            sequence_ids = encoded.sequence_ids(i)
            if len(answers["answer_start"]) == 0:
                starts.append(cls_index)
                ends.append(cls_index)
                continue
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            token_start = sequence_ids.index(context_index)
            token_end = len(sequence_ids) - 1 - sequence_ids[::-1].index(context_index)
            if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
                starts.append(cls_index)
                ends.append(cls_index)
                continue
            while token_start < len(offsets) and sequence_ids[token_start] == context_index and (
                    offsets[token_start][0] <= start_char):
                token_start += 1
            starts.append(token_start - 1)
            while sequence_ids[token_end] == context_index and offsets[token_end][1] >= end_char:
                token_end -= 1
            ends.append(token_end + 1)
        encoded["start_positions"] = starts
        encoded["end_positions"] = ends
        return encoded

    def prepare_eval(examples):
        encoded = tokenize(examples, data_args.doc_stride)
        sample_map = encoded.pop("overflow_to_sample_mapping")
        context_index = 1 if pad_right else 0
        encoded["example_id"] = []
        for i in range(len(encoded["input_ids"])):
            sequence_ids = encoded.sequence_ids(i)
            encoded["example_id"].append(examples["id"][sample_map[i]])
            encoded["offset_mapping"][i] = [
                o if sequence_ids[k] == context_index else None for k, o in enumerate(encoded["offset_mapping"][i])
            ]
        return encoded

    train_dataset = eval_examples = eval_features = None
    with training_args.main_process_first(desc="tokenization"):
        if training_args.do_train:
            train_examples = shared.limit(raw["train"], data_args.max_train_samples)
            train_dataset = train_examples.map(prepare_train, batched=True, remove_columns=train_examples.column_names,
                                               num_proc=data_args.preprocessing_num_workers)
        if training_args.do_eval:
            if "validation" not in raw:
                raise ValueError("--do_eval needs a validation split.")
            eval_examples = shared.limit(raw["validation"], data_args.max_eval_samples)
            eval_features = eval_examples.map(prepare_eval, batched=True, remove_columns=eval_examples.column_names,
                                              num_proc=data_args.preprocessing_num_workers)

    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_dataset, processing_class=tokenizer,
        data_collator=default_data_collator,
    )

    results = {}
    if training_args.do_train:
        results.update(shared.train_and_save(trainer, training_args, train_dataset))
    if training_args.do_eval:
        model_inputs = eval_features.remove_columns(["example_id", "offset_mapping"])
        output = trainer.predict(model_inputs, metric_key_prefix="eval")
        start_logits, end_logits = output.predictions[:2]
        predictions = postprocess(eval_examples, eval_features, start_logits, end_logits, data_args.max_answer_length)
        references = {ex["id"]: list(ex["answers"]["text"]) for ex in eval_examples}
        metrics = {k: v for k, v in output.metrics.items()}
        metrics.update({f"eval_{k}": v for k, v in squad_metrics(predictions, references).items()})
        results.update(shared.report_eval(trainer, metrics, len(eval_examples)))
    return results


if __name__ == "__main__":
    main()
