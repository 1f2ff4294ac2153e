#!/usr/bin/env python
"""Fine-tune a (relpos) encoder for text classification with `Trainer`, in the style of transformers' examples.

```
python examples/run_classification.py \
    --model_name_or_path path/to/bert-or-minilm --position_embedding_type alibi \
    --train_file train.csv --validation_file dev.csv --max_seq_length 128 \
    --output_dir out --do_train --do_eval --num_train_epochs 3
```

- `--model_name_or_path`: a BERT / RoBERTa / MiniLM checkpoint (converted on the fly to `--position_embedding_type`
  with `hf_relpos.convert.load_converted`, which logs what was dropped and added), or a relpos checkpoint.
  Without `--position_embedding_type` a plain checkpoint is fine-tuned untouched with transformers' own class.
- data: local `--train_file` / `--validation_file` (csv or json lines, a text column and a label column), or a
  Hub `--dataset_name`.
- metrics: accuracy and macro F1 (scikit-learn; no Hub access needed).
- distributed: the same command runs under `torchrun --nproc_per_node N` (gloo on CPU, NCCL on GPU) and
  `accelerate launch`; add `--fsdp "full_shard auto_wrap"` or `--deepspeed ds_config.json` for sharded training.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field


# Let `python examples/run_classification.py` work from a source checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
from datasets import ClassLabel  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_relpos  # noqa: E402, F401  (registers the relpos models with the Auto classes)
from hf_relpos.convert import RELPOS_MODEL_TYPES, load_converted  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # relpos_example_utils, also when imported by path
import relpos_example_utils as shared  # noqa: E402


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local folder or Hub id of a BERT/RoBERTa/MiniLM/relpos model."})
    position_embedding_type: str | None = field(
        default=None,
        metadata={"help": "Convert the checkpoint to this encoding (absolute, alibi, rope, t5, ...). Default: keep."},
    )
    max_relative_positions: int | None = field(default=None, metadata={"help": "relative_key(_query)/deberta."})
    position_buckets: int | None = field(default=None, metadata={"help": "deberta: log buckets per direction."})
    relative_attention_num_buckets: int | None = field(default=None, metadata={"help": "t5: number of buckets."})
    relative_attention_max_distance: int | None = field(default=None, metadata={"help": "t5: max distance."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Default: the model's."})
    cache_dir: str | None = field(default=None)
    model_revision: str = field(default="main")
    token: str | None = field(default=None)
    trust_remote_code: bool = field(default=False)

    def encoding_options(self) -> dict:
        names = ("max_relative_positions", "position_buckets", "relative_attention_num_buckets",
                 "relative_attention_max_distance")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class DataTrainingArguments(shared.DataArguments):
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub (needs network)."})
    train_file: str | None = field(default=None, metadata={"help": "csv or json(l) with text and label columns."})
    validation_file: str | None = field(default=None, metadata={"help": "csv or json(l), same columns."})
    text_column_name: str = field(default="text")
    label_column_name: str = field(default="label")
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Give --dataset_name or --train_file/--validation_file.")
        for path in (self.train_file, self.validation_file):
            if path is not None and path.rsplit(".", 1)[-1] not in ("csv", "json", "jsonl"):
                raise ValueError(f"{path}: expected a .csv, .json or .jsonl file.")


def label_names(raw: datasets.DatasetDict, column: str) -> list[str]:
    first = raw["train"] if "train" in raw else next(iter(raw.values()))
    feature = first.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = set()
    for split in raw.values():
        values.update(split.unique(column))
    return [str(value) for value in sorted(values)]


def load_model(model_args: ModelArguments, num_labels: int, id2label: dict, label2id: dict):
    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    source_config = AutoConfig.from_pretrained(model_args.model_name_or_path,
                                               trust_remote_code=model_args.trust_remote_code, **hub)
    label_kwargs = {"num_labels": num_labels, "id2label": id2label, "label2id": label2id}
    if model_args.position_embedding_type is None and source_config.model_type not in RELPOS_MODEL_TYPES:
        # The untouched model, with transformers' own class.
        return AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **label_kwargs, **hub
        )
    return load_converted("sequence-classification", model_args.model_name_or_path,
                          model_args.position_embedding_type, **model_args.encoding_options(), **label_kwargs, **hub)


def compute_metrics(prediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted = np.argmax(logits, axis=-1)
    labels = prediction.label_ids
    return {"accuracy": float(accuracy_score(labels, predicted)),
            "f1": float(f1_score(labels, predicted, average="macro"))}


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = shared.parse_args(
        (ModelArguments, DataTrainingArguments, TrainingArguments), argv
    )
    shared.setup_logging(training_args, process_logger=logger)
    set_seed(training_args.seed)

    raw = shared.load_raw_datasets(data_args, model_args.cache_dir, token=model_args.token)
    names = label_names(raw, data_args.label_column_name)
    label_to_id = {name: index for index, name in enumerate(names)}
    model = load_model(model_args, len(names), dict(enumerate(names)), label_to_id)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                              cache_dir=model_args.cache_dir, token=model_args.token)

    is_class_label = isinstance(next(iter(raw.values())).features[data_args.label_column_name], ClassLabel)

    def preprocess(batch):
        result = tokenizer(batch[data_args.text_column_name], truncation=True, max_length=data_args.max_seq_length)
        labels = batch[data_args.label_column_name]
        result["labels"] = labels if is_class_label else [label_to_id[str(label)] for label in labels]
        return result

    with training_args.main_process_first(desc="tokenizing"):
        columns = next(iter(raw.values())).column_names
        tokenized = raw.map(preprocess, batched=True, remove_columns=columns,
                            num_proc=data_args.preprocessing_num_workers, desc="Tokenizing")

    train_dataset = eval_dataset = None
    if training_args.do_train:
        if "train" not in tokenized:
            raise ValueError("--do_train needs a train split (--train_file).")
        train_dataset = shared.limit(tokenized["train"], data_args.max_train_samples)
    if training_args.do_eval:
        split = "validation" if "validation" in tokenized else "test"
        if split not in tokenized:
            raise ValueError("--do_eval needs a validation split (--validation_file).")
        eval_dataset = shared.limit(tokenized[split], data_args.max_eval_samples)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )

    all_metrics: dict[str, float] = {}
    if training_args.do_train:
        # save_model: the model (with modelling code + auto_map for relpos models) and the tokenizer
        metrics = shared.train_and_save(trainer, training_args, train_dataset)
        all_metrics.update({f"train_{k}" if not k.startswith("train") else k: v for k, v in metrics.items()})
    if training_args.do_eval:
        all_metrics.update(shared.report_eval(trainer, trainer.evaluate(), len(eval_dataset)))
    return all_metrics


if __name__ == "__main__":
    main()
