#!/usr/bin/env python
"""Causal language modelling with `RelPosGPTForCausalLM`, warm-started from a GPT-2-layout checkpoint converted to
another position encoding (texts are concatenated and cut into blocks of `block_size` tokens).

    python examples/run_clm.py --model_name_or_path gpt2 --position_embedding_type rope \
        --train_file train.txt --validation_file valid.txt --output_dir out/clm-rope \
        --do_train --do_eval --block_size 256 --per_device_train_batch_size 8
"""

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain

import datasets
import transformers
from transformers import (
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_relpos import RelPosGPTForCausalLM


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "GPT-2-layout checkpoint (local folder or Hub id)."})
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
    text_column_name: str = field(default="text")
    block_size: int | None = field(default=None, metadata={"help": "Tokens per training block (default 1024)."})
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
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = RelPosGPTForCausalLM.from_pretrained(
        model_args.model_name_or_path, cache_dir=model_args.cache_dir, **config_overrides(model_args)
    )
    logger.info("position_embedding_type = %s", model.config.position_embedding_type)

    split = "train" if "train" in raw else next(iter(raw))
    text_column = data_args.text_column_name
    if text_column not in raw[split].column_names:
        text_column = raw[split].column_names[0]
    block_size = min(data_args.block_size or 1024, tokenizer.model_max_length)

    def tokenize(examples):
        return tokenizer(examples[text_column])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
        result["labels"] = [ids.copy() for ids in result["input_ids"]]
        return result

    with training_args.main_process_first(desc="tokenization"):
        tokenized = raw.map(tokenize, batched=True, num_proc=data_args.preprocessing_num_workers,
                            remove_columns=raw[split].column_names)
        tokenized = tokenized.map(group_texts, batched=True, num_proc=data_args.preprocessing_num_workers)

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

    collator = default_data_collator
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=collator,
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
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


if __name__ == "__main__":
    main()
