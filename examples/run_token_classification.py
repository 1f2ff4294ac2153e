#!/usr/bin/env python
"""Token classification (NER, information extraction) with a BERT-layout checkpoint converted to another position
encoding. Data: csv/json(l) with a list of words (`tokens`) and a list of word-level labels (`tags`) per example;
labels are aligned to subwords (the first subword of a word gets its label, the rest get -100 unless
`--label_all_tokens`). Metrics: seqeval precision/recall/F1 and token accuracy.

    python examples/run_token_classification.py --model_name_or_path bert-base-cased --position_embedding_type t5 \
        --train_file train.jsonl --validation_file valid.jsonl --output_dir out/ner-t5 --do_train --do_eval
"""

import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
from transformers import (
    AutoTokenizer,
    DataCollatorForTokenClassification,
    EvalPrediction,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_relpos import RelPosBertForTokenClassification


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # relpos_example_utils, also when imported by path
import relpos_example_utils as shared  # noqa: E402


logger = logging.getLogger(__name__)


@dataclass
class DataTrainingArguments(shared.DataArguments):
    text_column_name: str = field(default="tokens", metadata={"help": "Column with the list of words."})
    label_column_name: str = field(default="tags", metadata={"help": "Column with the list of word labels."})
    max_seq_length: int = field(default=128)
    label_all_tokens: bool = field(
        default=False, metadata={"help": "Label every subword of a word, not only its first."}
    )


def compute_seqeval(predictions: list[list[str]], references: list[list[str]]) -> dict:
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "precision": precision_score(references, predictions, zero_division=0),
        "recall": recall_score(references, predictions, zero_division=0),
        "f1": f1_score(references, predictions, zero_division=0),
        "accuracy": accuracy_score(references, predictions),
    }


def main(argv=None):
    model_args, data_args, training_args = shared.parse_args(
        (shared.ModelArguments, DataTrainingArguments, TrainingArguments), argv
    )
    shared.setup_logging(training_args)
    set_seed(training_args.seed)

    raw = shared.load_raw_datasets(data_args, model_args.cache_dir)
    split = "train" if "train" in raw else next(iter(raw))
    features = raw[split].features
    text_column, label_column = data_args.text_column_name, data_args.label_column_name
    if text_column not in features:
        text_column = "tokens"
    if label_column not in features:
        label_column = "ner_tags" if "ner_tags" in features else label_column

    # Labels: a ClassLabel sequence on the Hub, strings in local files.
    label_feature = getattr(features[label_column], "feature", None)
    if isinstance(label_feature, datasets.ClassLabel):
        label_list = label_feature.names
        to_name = label_feature.int2str
    else:
        label_list = sorted({tag for s in raw.keys() for tags in raw[s][label_column] for tag in tags})
        to_name = None
    label2id = {label: i for i, label in enumerate(label_list)}

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = RelPosBertForTokenClassification.from_pretrained(
        model_args.model_name_or_path, cache_dir=model_args.cache_dir, num_labels=len(label_list),
        id2label=dict(enumerate(label_list)), label2id=label2id, **shared.config_overrides(model_args),
    )
    logger.info("position_embedding_type = %s, labels = %s", model.config.position_embedding_type, label_list)

    def tokenize_and_align(examples):
        encoded = tokenizer(
            examples[text_column], truncation=True, max_length=data_args.max_seq_length, is_split_into_words=True
        )
        all_labels = []
        for i, tags in enumerate(examples[label_column]):
            tag_ids = [label2id[to_name(t)] if to_name else label2id[t] for t in tags]
            labels, previous = [], None
            for word_id in encoded.word_ids(batch_index=i):
                if word_id is None:
                    labels.append(-100)
                elif word_id != previous:
                    labels.append(tag_ids[word_id])
                else:
                    labels.append(tag_ids[word_id] if data_args.label_all_tokens else -100)
                previous = word_id
            all_labels.append(labels)
        encoded["labels"] = all_labels
        return encoded

    with training_args.main_process_first(desc="tokenization"):
        tokenized = raw.map(tokenize_and_align, batched=True, num_proc=data_args.preprocessing_num_workers,
                            remove_columns=raw[split].column_names)

    train_dataset, eval_dataset = shared.train_eval_datasets(tokenized, data_args, training_args)

    def compute_metrics(prediction: EvalPrediction) -> dict:
        predicted = prediction.predictions.argmax(-1)
        predictions, references = [], []
        for pred_row, label_row in zip(predicted, prediction.label_ids, strict=True):
            keep = [(p, label) for p, label in zip(pred_row, label_row, strict=True) if label != -100]
            predictions.append([label_list[p] for p, _ in keep])
            references.append([label_list[label] for _, label in keep])
        return compute_seqeval(predictions, references)

    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=compute_metrics,
    )

    results = {}
    if training_args.do_train:
        results.update(shared.train_and_save(trainer, training_args, train_dataset))
    if training_args.do_eval:
        results.update(shared.report_eval(trainer, trainer.evaluate(), len(eval_dataset)))
    return results


if __name__ == "__main__":
    main()
