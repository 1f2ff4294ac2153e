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
import transformers
from transformers import (
    AutoTokenizer,
    DataCollatorForTokenClassification,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_relpos import RelPosBertForTokenClassification


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "BERT-layout checkpoint (local folder or Hub id)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    position_embedding_type: str | None = field(
        default=None, metadata={"help": "Convert the checkpoint to this encoding (alibi, t5, rope, ...)."}
    )
    max_relative_positions: int | None = field(default=None, metadata={"help": "relative_key(_query)/deberta."})
    relative_attention_num_buckets: int | None = field(default=None, metadata={"help": "t5: bucket count."})
    relative_attention_max_distance: int | None = field(default=None, metadata={"help": "t5: max distance."})
    rope_theta: float | None = field(default=None, metadata={"help": "rope: base frequency."})
    cache_dir: str | None = field(default=None)


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub."})
    dataset_config_name: str | None = field(default=None)
    train_file: str | None = field(default=None, metadata={"help": "txt, csv or json(l) file."})
    validation_file: str | None = field(default=None, metadata={"help": "txt, csv or json(l) file."})
    text_column_name: str = field(default="tokens", metadata={"help": "Column with the list of words."})
    label_column_name: str = field(default="tags", metadata={"help": "Column with the list of word labels."})
    max_seq_length: int = field(default=128)
    label_all_tokens: bool = field(
        default=False, metadata={"help": "Label every subword of a word, not only its first."}
    )
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    preprocessing_num_workers: int | None = field(default=None)


def config_overrides(model_args) -> dict:
    """The `from_pretrained` keyword arguments that convert the checkpoint and override its position fields."""
    overrides = {
        name: getattr(model_args, name)
        for name in (
            "position_embedding_type", "max_relative_positions", "relative_attention_num_buckets",
            "relative_attention_max_distance",
        )
        if getattr(model_args, name) is not None
    }
    if model_args.rope_theta is not None:
        overrides["rope_parameters"] = {"rope_type": "default", "rope_theta": model_args.rope_theta}
    return overrides


def load_raw_datasets(data_args, cache_dir=None) -> datasets.DatasetDict:
    if data_args.dataset_name is not None:
        return datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    data_files = {}
    if data_args.train_file is not None:
        data_files["train"] = data_args.train_file
    if data_args.validation_file is not None:
        data_files["validation"] = data_args.validation_file
    if not data_files:
        raise ValueError("Pass --dataset_name or --train_file / --validation_file.")
    extension = next(iter(data_files.values())).rsplit(".", 1)[-1]
    extension = {"jsonl": "json", "txt": "text"}.get(extension, extension)
    return datasets.load_dataset(extension, data_files=data_files, cache_dir=cache_dir)


def compute_seqeval(predictions: list[list[str]], references: list[list[str]]) -> dict:
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "precision": precision_score(references, predictions, zero_division=0),
        "recall": recall_score(references, predictions, zero_division=0),
        "f1": f1_score(references, predictions, zero_division=0),
        "accuracy": accuracy_score(references, predictions),
    }


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, model_args.cache_dir)
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
        id2label=dict(enumerate(label_list)), label2id=label2id, **config_overrides(model_args),
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

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = tokenized["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if training_args.do_eval:
        if "validation" not in tokenized:
            raise ValueError("--do_eval needs a validation split.")
        eval_dataset = tokenized["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

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
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


if __name__ == "__main__":
    main()
