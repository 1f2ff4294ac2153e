#!/usr/bin/env python
"""Continued masked-LM pretraining of a BERT/RoBERTa/MiniLM checkpoint converted to another position encoding.

The absolute position table of the checkpoint is dropped and the new encoding's parameters start from their paper's
initialisation; a short run of masked-LM training adapts the rest of the network to them.

    python examples/run_mlm.py --model_name_or_path bert-base-uncased --position_embedding_type alibi \
        --train_file train.txt --validation_file valid.txt --output_dir out/mlm-alibi \
        --do_train --do_eval --max_seq_length 128 --per_device_train_batch_size 16
"""

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain

from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

from hf_relpos import RelPosBertForMaskedLM


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # relpos_example_utils, also when imported by path
import relpos_example_utils as shared  # noqa: E402


logger = logging.getLogger(__name__)


@dataclass
class DataTrainingArguments(shared.DataArguments):
    text_column_name: str = field(default="text")
    max_seq_length: int = field(default=128)
    line_by_line: bool = field(default=False, metadata={"help": "One example per line instead of grouped blocks."})
    mlm_probability: float = field(default=0.15)


def main(argv=None):
    model_args, data_args, training_args = shared.parse_args(
        (shared.ModelArguments, DataTrainingArguments, TrainingArguments), argv
    )
    shared.setup_logging(training_args)
    set_seed(training_args.seed)

    raw = shared.load_raw_datasets(data_args, model_args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = RelPosBertForMaskedLM.from_pretrained(
        model_args.model_name_or_path, cache_dir=model_args.cache_dir, **shared.config_overrides(model_args)
    )
    logger.info("position_embedding_type = %s", model.config.position_embedding_type)

    split = "train" if "train" in raw else next(iter(raw))
    text_column = data_args.text_column_name
    if text_column not in raw[split].column_names:
        text_column = raw[split].column_names[0]
    max_len = min(data_args.max_seq_length, tokenizer.model_max_length)

    if data_args.line_by_line:
        def tokenize(examples):
            lines = [line for line in examples[text_column] if line and not line.isspace()]
            return tokenizer(lines, truncation=True, max_length=max_len, return_special_tokens_mask=True)
    else:
        def tokenize(examples):
            return tokenizer(examples[text_column], return_special_tokens_mask=True)

    with training_args.main_process_first(desc="tokenization"):
        tokenized = raw.map(tokenize, batched=True, num_proc=data_args.preprocessing_num_workers,
                            remove_columns=raw[split].column_names)

        if not data_args.line_by_line:
            def group_texts(examples):
                concatenated = {k: list(chain(*examples[k])) for k in examples}
                total = (len(concatenated["input_ids"]) // max_len) * max_len
                return {k: [t[i: i + max_len] for i in range(0, total, max_len)] for k, t in concatenated.items()}

            tokenized = tokenized.map(group_texts, batched=True, num_proc=data_args.preprocessing_num_workers)

    train_dataset, eval_dataset = shared.train_eval_datasets(tokenized, data_args, training_args)

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=data_args.mlm_probability)
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
