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

from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator, set_seed

from hf_relpos import RelPosGPTForCausalLM


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # relpos_example_utils, also when imported by path
import relpos_example_utils as shared  # noqa: E402


logger = logging.getLogger(__name__)


@dataclass
class GPTModelArguments(shared.ModelArguments):
    model_name_or_path: str = field(metadata={"help": "GPT-2-layout checkpoint (local folder or Hub id)."})


@dataclass
class DataTrainingArguments(shared.DataArguments):
    text_column_name: str = field(default="text")
    block_size: int | None = field(default=None, metadata={"help": "Tokens per training block (default 1024)."})


def main(argv=None):
    model_args, data_args, training_args = shared.parse_args(
        (GPTModelArguments, DataTrainingArguments, TrainingArguments), argv
    )
    shared.setup_logging(training_args)
    set_seed(training_args.seed)

    raw = shared.load_raw_datasets(data_args, model_args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = RelPosGPTForCausalLM.from_pretrained(
        model_args.model_name_or_path, cache_dir=model_args.cache_dir, **shared.config_overrides(model_args)
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

    train_dataset, eval_dataset = shared.train_eval_datasets(tokenized, data_args, training_args)

    collator = default_data_collator
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=collator,
    )

    results = {}
    if training_args.do_train:
        results.update(shared.train_and_save(trainer, training_args, train_dataset))
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        results.update(shared.report_eval(trainer, metrics, len(eval_dataset)))
    return results


if __name__ == "__main__":
    main()
