"""What the example scripts share: argument dataclasses, argument parsing, logging, data loading, the train loop.

The scripts import it as `import relpos_example_utils as shared`: `python examples/run_X.py` puts `examples/` first on
`sys.path`, and each script also inserts its own folder there so that it can be imported in-process (tests, demo).
"""

import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import transformers
from transformers import HfArgumentParser


@dataclass
class ModelArguments:
    """The checkpoint and the position encoding it is converted to; scripts subclass it to change a help text."""

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
class DataArguments:
    """The data fields of every task script; each script's `DataTrainingArguments` extends it with its own."""

    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub."})
    dataset_config_name: str | None = field(default=None)
    train_file: str | None = field(default=None, metadata={"help": "txt, csv or json(l) file."})
    validation_file: str | None = field(default=None, metadata={"help": "txt, csv or json(l) file."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    preprocessing_num_workers: int | None = field(default=None)


def parse_args(dataclass_types, argv: list[str] | None = None) -> tuple:
    """One instance per dataclass, from `argv` (default: the command line) or from a single `.json` file argument."""
    parser = HfArgumentParser(dataclass_types)
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses(args=argv)


LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"


def setup_logging(training_args, process_logger: logging.Logger | None = None) -> None:
    """Without `process_logger`: INFO for the script's own messages, only warnings from transformers.

    With it: transformers' examples' setup on stdout, where `--log_level` / `--log_level_replica` set the level of
    `process_logger`, datasets and transformers in each process, and the training arguments are logged.
    """
    if process_logger is None:
        logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
        transformers.utils.logging.set_verbosity_warning()
        return
    logging.basicConfig(format=LOG_FORMAT, datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    process_logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    process_logger.info(f"Training/evaluation parameters {training_args}")


def config_overrides(model_args, position_embedding_type: str | None = None) -> dict:
    """The `from_pretrained` keyword arguments that convert the checkpoint and override its position fields.

    `position_embedding_type` defaults to `model_args.position_embedding_type` (if it has one)."""
    if position_embedding_type is None:
        position_embedding_type = getattr(model_args, "position_embedding_type", None)
    overrides = {} if position_embedding_type is None else {"position_embedding_type": position_embedding_type}
    overrides.update({
        name: getattr(model_args, name)
        for name in ("max_relative_positions", "relative_attention_num_buckets", "relative_attention_max_distance")
        if getattr(model_args, name) is not None
    })
    if model_args.rope_theta is not None:
        overrides["rope_parameters"] = {"rope_type": "default", "rope_theta": model_args.rope_theta}
    return overrides


def load_raw_datasets(data_args, cache_dir: str | None = None, token: str | None = None) -> datasets.DatasetDict:
    """`--dataset_name` from the Hub, or the local `--train_file` / `--validation_file` (txt, csv, json or jsonl)."""
    if data_args.dataset_name is not None:
        return datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir,
                                     token=token)
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


def limit(dataset: datasets.Dataset, max_samples: int | None) -> datasets.Dataset:
    """The first `max_samples` rows (all of them when it is None)."""
    return dataset if max_samples is None else dataset.select(range(min(len(dataset), max_samples)))


def train_eval_datasets(tokenized: datasets.DatasetDict, data_args, training_args) -> tuple:
    """`(train, eval)` datasets for `--do_train` / `--do_eval` (None when not asked), cut to `--max_*_samples`."""
    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = limit(tokenized["train"], data_args.max_train_samples)
    if training_args.do_eval:
        if "validation" not in tokenized:
            raise ValueError("--do_eval needs a validation split.")
        eval_dataset = limit(tokenized["validation"], data_args.max_eval_samples)
    return train_dataset, eval_dataset


def train_and_save(trainer: transformers.Trainer, training_args, train_dataset) -> dict:
    """Train (resuming from `--resume_from_checkpoint`), save model, metrics and state; return the train metrics."""
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    metrics = train_result.metrics
    metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def report_eval(trainer: transformers.Trainer, metrics: dict, num_samples: int) -> dict:
    """Add `eval_samples`, log the evaluation metrics and save them to `eval_results.json`; return them."""
    metrics["eval_samples"] = num_samples
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics
