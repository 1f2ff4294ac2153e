#!/usr/bin/env python
"""Translation with an `EncoderDecoderModel` of a relpos encoder and a relpos decoder, both warm-started from
pretrained checkpoints: the encoder (`RelPosBertModel`) from a BERT-layout checkpoint converted to
`--encoder_position_embedding_type`, the decoder (`RelPosGPTForCausalLM` with cross-attention) from a GPT-2-layout
checkpoint converted to `--decoder_position_embedding_type`. Data: csv/json(l) with `source` and `target` columns, or
a `translation` dict keyed by `--source_lang` / `--target_lang`. Metric: sacrebleu BLEU on generated text.

    python examples/run_translation.py --encoder_name_or_path bert-base-multilingual-cased \
        --decoder_name_or_path gpt2 --encoder_position_embedding_type t5 --decoder_position_embedding_type rope \
        --train_file train.jsonl --validation_file valid.jsonl --output_dir out/mt \
        --do_train --do_eval --predict_with_generate
"""

import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EncoderDecoderModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    set_seed,
)

from hf_relpos import RelPosBertModel, RelPosGPTConfig, RelPosGPTForCausalLM


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # relpos_example_utils, also when imported by path
import relpos_example_utils as shared  # noqa: E402


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    encoder_name_or_path: str = field(metadata={"help": "BERT-layout checkpoint for the encoder."})
    decoder_name_or_path: str = field(metadata={"help": "GPT-2-layout checkpoint for the decoder."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Source tokenizer (default: the encoder's)."})
    decoder_tokenizer_name: str | None = field(
        default=None, metadata={"help": "Target tokenizer (default: the decoder's)."}
    )
    encoder_position_embedding_type: str | None = field(default=None, metadata={"help": "e.g. t5, alibi, rope."})
    decoder_position_embedding_type: str | None = field(default=None, metadata={"help": "e.g. rope, alibi, xpos."})
    max_relative_positions: int | None = field(default=None, metadata={"help": "relative_key(_query)/deberta."})
    relative_attention_num_buckets: int | None = field(default=None, metadata={"help": "t5: bucket count."})
    relative_attention_max_distance: int | None = field(default=None, metadata={"help": "t5: max distance."})
    rope_theta: float | None = field(default=None, metadata={"help": "rope/xpos: base frequency."})
    cache_dir: str | None = field(default=None)


@dataclass
class DataTrainingArguments(shared.DataArguments):
    train_file: str | None = field(default=None, metadata={"help": "csv or json(l) file."})
    validation_file: str | None = field(default=None, metadata={"help": "csv or json(l) file."})
    source_column: str = field(default="source")
    target_column: str = field(default="target")
    source_lang: str | None = field(default=None, metadata={"help": "Key in a `translation` dict column."})
    target_lang: str | None = field(default=None, metadata={"help": "Key in a `translation` dict column."})
    max_source_length: int = field(default=128)
    max_target_length: int = field(default=128)
    num_beams: int | None = field(default=None)


def build_model(model_args, decoder_tokenizer) -> EncoderDecoderModel:
    """Warm-start both halves from their checkpoints, each converted to its own encoding."""
    encoder = RelPosBertModel.from_pretrained(
        model_args.encoder_name_or_path, cache_dir=model_args.cache_dir, add_pooling_layer=False,
        **shared.config_overrides(model_args, model_args.encoder_position_embedding_type),
    )
    decoder_config = RelPosGPTConfig.from_pretrained(
        model_args.decoder_name_or_path, cache_dir=model_args.cache_dir, add_cross_attention=True,
        **shared.config_overrides(model_args, model_args.decoder_position_embedding_type),
    )
    decoder_config.is_decoder = True
    decoder = RelPosGPTForCausalLM.from_pretrained(
        model_args.decoder_name_or_path, config=decoder_config, cache_dir=model_args.cache_dir
    )
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    tok = decoder_tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    model.config.decoder_start_token_id = bos
    model.config.pad_token_id = pad
    model.config.eos_token_id = eos
    model.generation_config.decoder_start_token_id = bos
    model.generation_config.bos_token_id = bos
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    return model


def main(argv=None):
    model_args, data_args, training_args = shared.parse_args(
        (ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments), argv
    )
    shared.setup_logging(training_args)
    set_seed(training_args.seed)

    raw = shared.load_raw_datasets(data_args, model_args.cache_dir)
    split = "train" if "train" in raw else next(iter(raw))
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.encoder_name_or_path)
    decoder_tokenizer = AutoTokenizer.from_pretrained(
        model_args.decoder_tokenizer_name or model_args.decoder_name_or_path
    )
    if decoder_tokenizer.pad_token is None:
        decoder_tokenizer.pad_token = decoder_tokenizer.eos_token
    model = build_model(model_args, decoder_tokenizer)
    logger.info("encoder: %s, decoder: %s", model.encoder.config.position_embedding_type,
                model.decoder.config.position_embedding_type)
    eos = model.config.eos_token_id

    def pairs(examples):
        if "translation" in examples:
            return ([t[data_args.source_lang] for t in examples["translation"]],
                    [t[data_args.target_lang] for t in examples["translation"]])
        return examples[data_args.source_column], examples[data_args.target_column]

    def preprocess(examples):
        sources, targets = pairs(examples)
        model_inputs = tokenizer(sources, max_length=data_args.max_source_length, truncation=True)
        # Decoder labels: the target's tokens then EOS; the model prepends decoder_start_token_id itself.
        labels = decoder_tokenizer(
            targets, max_length=data_args.max_target_length - 1, truncation=True, add_special_tokens=False
        )["input_ids"]
        model_inputs["labels"] = [ids + [eos] for ids in labels]
        return model_inputs

    with training_args.main_process_first(desc="tokenization"):
        tokenized = raw.map(preprocess, batched=True, num_proc=data_args.preprocessing_num_workers,
                            remove_columns=raw[split].column_names)

    train_dataset, eval_dataset = shared.train_eval_datasets(tokenized, data_args, training_args)

    def compute_metrics(prediction) -> dict:
        import sacrebleu

        preds, labels = prediction.predictions, prediction.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        pad = decoder_tokenizer.pad_token_id
        preds = np.where(preds != -100, preds, pad)
        labels = np.where(labels != -100, labels, pad)
        decoded_preds = [t.strip() for t in decoder_tokenizer.batch_decode(preds, skip_special_tokens=True)]
        decoded_labels = [t.strip() for t in decoder_tokenizer.batch_decode(labels, skip_special_tokens=True)]
        bleu = sacrebleu.corpus_bleu(decoded_preds, [decoded_labels])
        exact = np.mean([p == r for p, r in zip(decoded_preds, decoded_labels, strict=True)])
        return {"bleu": bleu.score, "exact_match": float(exact)}

    trainer = Seq2SeqTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
    )

    results = {}
    if training_args.do_train:
        results.update(shared.train_and_save(trainer, training_args, train_dataset))
    if training_args.do_eval:
        metrics = trainer.evaluate(
            max_length=data_args.max_target_length, num_beams=data_args.num_beams, metric_key_prefix="eval"
        )
        results.update(shared.report_eval(trainer, metrics, len(eval_dataset)))
    return results


if __name__ == "__main__":
    main()
