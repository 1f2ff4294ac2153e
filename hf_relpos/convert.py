"""Load checkpoints into relpos models: absolute-position ones (BERT, RoBERTa, MiniLM, GPT-2), rotary Llama-family
ones (Llama, SmolLM, Mistral, Qwen2; folders or a `.gguf` file), and the relative families that use an encoding of
the catalog (RoFormer, DeBERTa-v2/v3, BERT with v4's `relative_key(_query)`).

```python
>>> from hf_relpos import RelPosBertForSequenceClassification
>>> from hf_relpos.convert import load_converted
>>> model = load_converted(RelPosBertForSequenceClassification, "path/to/bert", "alibi", num_labels=2)
>>> print(model.conversion_report)          # what was kept, dropped and added
>>> model.save_pretrained("bert-alibi")     # native relpos names, modelling code, full auto_map
```

The relpos encoder keeps BERT's module names and the decoder GPT-2's, so for BERT and MiniLM checkpoints a plain
`RelPosBertForSequenceClassification.from_pretrained(bert_dir, position_embedding_type="alibi")` loads too.
`load_converted` adds what a plain `from_pretrained` cannot know:

- the source config becomes a `RelPosBertConfig` / `RelPosGPTConfig` (`model_type` `relpos_*`, the family's full
  `auto_map`), with the encoding options you pass;
- RoBERTa-style checkpoints: `roberta.*` -> `bert.*`, `lm_head.*` -> `cls.predictions.*`, and the learned table
  keeps its size (514) with `position_offset = pad_token_id + 1`;
- checkpoints without token type embeddings get `type_vocab_size = 0`;
- relative families load exactly into the encoding they use (and convert to any other, as absolute ones do):
  RoFormer into `rope` (each head's query/key rows permuted from RoFormer's adjacent rotary pairs to the
  rotate-half layout), DeBERTa-v2/v3 into `deberta` (its module names, `share_att_key`, `norm_rel_ebd`,
  `pos_att_type`, buckets), v4's relative BERT into `relative_key(_query)` (each layer's distance table flipped,
  `max_relative_positions = max_position_embeddings - 1`; the absolute table v4 still carries is dropped);
- a single report (`ConversionReport`, logged once as a warning and attached as `model.conversion_report`) lists
  the position weights dropped, the position parameters added (initialised as their paper does), the head weights
  newly initialised, and the checkpoint entries left unused;
- the renaming is not reverted on `save_pretrained`: the converted checkpoint saves under relpos names and reloads
  under its own class with no missing or unexpected keys.

With `position_embedding_type="absolute"` (BERT, GPT-2) or `"rope"` (the Llama family) the converted model is
numerically the original. A `.gguf` file (e.g. SmolLM2's Q4_1) is dequantised by transformers (`gguf_file=`) and
saves as plain safetensors.

This module sits on top of the library: the modelling and configuration files never import it, so checkpoints
loaded with `trust_remote_code=True` do not need it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import torch
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers.utils import logging

from .configuration_relpos import RelPosBertConfig, RelPosGPTConfig, RelPosLlamaConfig


logger = logging.get_logger(__name__)

BERT_MODEL_TYPES = {"bert", "relpos_bert"}
ROBERTA_MODEL_TYPES = {"roberta", "xlm-roberta", "camembert"}
RELATIVE_MODEL_TYPES = {"roformer", "deberta-v2"}
V4_RELATIVE_TYPES = ("relative_key", "relative_key_query")
GPT_MODEL_TYPES = {"gpt2", "relpos_gpt"}
LLAMA_MODEL_TYPES = {"llama", "mistral", "qwen2", "relpos_llama"}
RELPOS_MODEL_TYPES = {"relpos_bert", "relpos_gpt", "relpos_llama"}
# The encoding a family's original checkpoints use: the one under which the converted model is the original.
SOURCE_ENCODING = {"bert": "absolute", "gpt": "absolute", "llama": "rope"}
CONFIG_OF_FAMILY = {"bert": RelPosBertConfig, "gpt": RelPosGPTConfig, "llama": RelPosLlamaConfig}

# RoBERTa's module names -> BERT's (the relpos encoder's). Applied at load time only: never reverted on save.
ROBERTA_KEY_MAPPING = {
    r"^roberta\.": "bert.",
    r"^lm_head\.dense\.": "cls.predictions.transform.dense.",
    r"^lm_head\.layer_norm\.": "cls.predictions.transform.LayerNorm.",
    r"^lm_head\.decoder\.": "cls.predictions.decoder.",
    r"^lm_head\.bias$": "cls.predictions.bias",
}

# RoFormer (BERT's layout under `roformer.`; its classification head is a pooler with `hidden_act`).
ROFORMER_KEY_MAPPING = {
    r"^roformer\.": "bert.",
    r"^classifier\.dense\.": "bert.pooler.dense.",
    r"^classifier\.out_proj\.": "classifier.",
}
# DeBERTa-v2/v3: the position tables and projections move into the encoding, `*_proj` -> BERT's names.
DEBERTA_KEY_MAPPING = {
    r"^deberta\.": "bert.",
    r"^pooler\.": "bert.pooler.",
    r"encoder\.rel_embeddings\.": "embeddings.position_embeddings.rel_embeddings.",
    r"encoder\.LayerNorm\.": "embeddings.position_embeddings.LayerNorm.",
    r"encoder\.layer\.(\d+)\.attention\.self\.pos_key_proj\.": r"embeddings.position_embeddings.pos_key_proj.\1.",
    r"encoder\.layer\.(\d+)\.attention\.self\.pos_query_proj\.":
        r"embeddings.position_embeddings.pos_query_proj.\1.",
    r"\.attention\.self\.(query|key|value)_proj\.": r".attention.self.\1.",
    r"^lm_predictions\.lm_head\.(dense|LayerNorm)\.": r"cls.predictions.transform.\1.",
    r"^lm_predictions\.lm_head\.bias$": "cls.predictions.bias",
}
# BERT v4's relative_key(_query): each layer's distance table moves into the encoding (flipped after loading).
V4_RELATIVE_KEY_MAPPING = {
    r"encoder\.layer\.(\d+)\.attention\.self\.distance_embedding\.":
        r"embeddings.position_embeddings.distance_embedding.\1.",
}

# Where the position encoding lives in each layout (BERT: embeddings.position_embeddings, GPT-2: wpe,
# Llama: position_encoding).
POSITION_KEY = re.compile(r"(^|\.)(embeddings\.position_embeddings|wpe|position_encoding)\.")
# Buffers some checkpoints carry that the relpos models recompute (never weights).
BUFFER_KEY = re.compile(
    r"(^|\.)(position_ids|token_type_ids|attn\.bias|attn\.masked_bias|encoder\.embed_positions\.weight)$"
)

# Config entries that describe the source class rather than the network.
_SOURCE_ONLY_FIELDS = (
    "model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "position_embedding_type",
    # RoFormer's and DeBERTa's fields that `source_encoding` and the key mappings handle, or refuse
    "embedding_size", "rotary_value", "relative_attention", "position_biased_input", "legacy", "pooler_dropout",
    "pooler_hidden_size", "conv_kernel_size", "conv_groups", "conv_act", "attention_head_size", "cls_dropout",
)

# Task name (CLI) -> class name per family; `None`: that family has no such head.
TASKS: dict[str, dict[str, str | None]] = {
    "base": {"bert": "RelPosBertModel", "gpt": "RelPosGPTModel", "llama": "RelPosLlamaModel"},
    "masked-lm": {"bert": "RelPosBertForMaskedLM", "gpt": None, "llama": None},
    "causal-lm": {"bert": "RelPosBertForCausalLM", "gpt": "RelPosGPTForCausalLM", "llama": "RelPosLlamaForCausalLM"},
    "sequence-classification": {
        "bert": "RelPosBertForSequenceClassification", "gpt": "RelPosGPTForSequenceClassification",
        "llama": "RelPosLlamaForSequenceClassification",
    },
    "token-classification": {"bert": "RelPosBertForTokenClassification", "gpt": None, "llama": None},
    "question-answering": {"bert": "RelPosBertForQuestionAnswering", "gpt": None, "llama": None},
    "multiple-choice": {"bert": "RelPosBertForMultipleChoice", "gpt": None, "llama": None},
}
# Not a head of one family: an encoder-decoder warm-started from one BERT-family checkpoint (`load_seq2seq`).
SEQ2SEQ_TASK = "seq2seq"
_ARCHITECTURE_SUFFIX_TO_TASK = {
    "ForMaskedLM": "masked-lm",
    "LMHeadModel": "causal-lm",
    "ForCausalLM": "causal-lm",
    "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForMultipleChoice": "multiple-choice",
}
_MODULE_OF_FAMILY = {"bert": "modeling_relpos_bert", "gpt": "modeling_relpos_gpt", "llama": "modeling_relpos_llama"}


@dataclass
class ConversionReport:
    """What `load_converted` did to a checkpoint. `str(report)` is the text that is logged."""

    source: str
    source_model_type: str
    model_class: str
    position_embedding_type: str
    key_mapping: dict[str, str] = field(default_factory=dict)
    config_changes: dict[str, Any] = field(default_factory=dict)
    dropped_position_weights: list[str] = field(default_factory=list)
    added_position_weights: list[str] = field(default_factory=list)
    newly_initialized: list[str] = field(default_factory=list)
    unused_checkpoint_weights: list[str] = field(default_factory=list)
    ignored_buffers: list[str] = field(default_factory=list)
    mapped_weights: list[str] = field(default_factory=list)

    @property
    def is_lossless(self) -> bool:
        """True when every checkpoint weight was loaded and nothing was initialised anew."""
        return not (self.dropped_position_weights or self.added_position_weights or self.newly_initialized
                    or self.unused_checkpoint_weights)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"Converted {self.source!r} ({self.source_model_type}) into {self.model_class} with "
            f"position_embedding_type={self.position_embedding_type!r}."
        ]
        if self.key_mapping:
            lines.append("  renamed: " + ", ".join(f"{k} -> {v}" for k, v in self.key_mapping.items()))
        if self.config_changes:
            lines.append("  config: " + ", ".join(f"{k}={v!r}" for k, v in self.config_changes.items()))
        for mapping in self.mapped_weights:
            lines.append(f"  mapped: {mapping}")
        sections = (
            ("dropped (absolute position table, unused by the new encoding)", self.dropped_position_weights),
            ("added (new position parameters, initialised as in the encoding's paper)", self.added_position_weights),
            ("newly initialised (not in the checkpoint: train them)", self.newly_initialized),
            ("unused checkpoint weights (the source's head, not part of this class)", self.unused_checkpoint_weights),
        )
        for title, keys in sections:
            if keys:
                lines.append(f"  {title}: " + ", ".join(keys))
        if self.ignored_buffers:
            lines.append(f"  ignored buffers (recomputed by the model): {len(self.ignored_buffers)}")
        if self.is_lossless:
            lines.append("  every checkpoint weight was loaded; nothing was dropped or added.")
        return "\n".join(lines)


def model_family(config_or_model_type: PreTrainedConfig | str) -> str:
    """`"bert"` (BERT, RoBERTa, MiniLM, RoFormer, DeBERTa-v2/v3, relpos_bert), `"gpt"` (GPT-2, relpos_gpt) or
    `"llama"` (Llama, Mistral, Qwen2, relpos_llama); ValueError otherwise."""
    model_type = getattr(config_or_model_type, "model_type", config_or_model_type)
    if model_type in BERT_MODEL_TYPES | ROBERTA_MODEL_TYPES | RELATIVE_MODEL_TYPES:
        return "bert"
    if model_type in GPT_MODEL_TYPES:
        return "gpt"
    if model_type in LLAMA_MODEL_TYPES:
        return "llama"
    supported = BERT_MODEL_TYPES | ROBERTA_MODEL_TYPES | RELATIVE_MODEL_TYPES | GPT_MODEL_TYPES | LLAMA_MODEL_TYPES
    raise ValueError(f"Cannot convert a checkpoint of model_type {model_type!r}: supported are {sorted(supported)}.")


def _refuse(source_config: PreTrainedConfig, field_name: str, value: Any, supported: str) -> NoReturn:
    raise ValueError(
        f"Cannot load this {source_config.model_type!r} checkpoint exactly: {field_name}={value!r} is not supported "
        f"({supported})."
    )


def source_encoding(source_config: PreTrainedConfig) -> tuple[str, dict[str, Any]]:
    """The catalog encoding a (non-relpos) checkpoint uses, and the config fields that make it load exactly.

    Raises `ValueError` for a configuration the relpos encoder cannot reproduce (RoFormer's `rotary_value`, a
    factorised embedding, DeBERTa's convolution layer), never loading it approximately.
    """
    model_type = source_config.model_type
    hidden_size = source_config.hidden_size
    if model_type == "roformer":
        if source_config.rotary_value:
            _refuse(source_config, "rotary_value", True, "values are not rotated in the relpos encoder")
        if source_config.embedding_size != hidden_size:
            _refuse(source_config, "embedding_size", source_config.embedding_size,
                    f"the relpos encoder has no embedding projection: it must equal hidden_size={hidden_size}")
        # RoFormer's sinusoids: theta = 10000, every channel of the head rotated.
        return "rope", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                        "pooler_hidden_act": source_config.hidden_act}
    if model_type == "deberta-v2":
        head_dim = hidden_size // source_config.num_attention_heads
        for name, supported in (("conv_kernel_size", 0), ("embedding_size", hidden_size),
                                ("pooler_hidden_size", hidden_size), ("attention_head_size", head_dim)):
            value = getattr(source_config, name, supported)
            if value != supported:
                _refuse(source_config, name, value, f"the relpos encoder reproduces only {name}={supported}")
        fields = {"pooler_hidden_act": source_config.pooler_hidden_act}
        if getattr(source_config, "cls_dropout", None) is not None:
            fields["classifier_dropout"] = source_config.cls_dropout
        if not source_config.relative_attention:
            return "absolute", fields
        max_relative_positions = source_config.max_relative_positions
        if max_relative_positions < 1:
            max_relative_positions = source_config.max_position_embeddings
        return "deberta", {
            **fields,
            "position_buckets": max(source_config.position_buckets, 0),
            "max_relative_positions": max_relative_positions,
            "pos_att_type": list(source_config.pos_att_type or []),
            "share_att_key": bool(getattr(source_config, "share_att_key", False)),
            "norm_rel_ebd": getattr(source_config, "norm_rel_ebd", "none"),
        }
    if _v4_relative(source_config):
        # v4's table of 2 * max_position_embeddings - 1 distances: ours, flipped, with k = max_position_embeddings - 1.
        return source_config.position_embedding_type, {
            "max_relative_positions": source_config.max_position_embeddings - 1
        }
    family = model_family(model_type)
    position_type = getattr(source_config, "position_embedding_type", None) or SOURCE_ENCODING[family]
    if position_type != SOURCE_ENCODING[family]:
        raise NotImplementedError(
            f"The source checkpoint uses position_embedding_type={position_type!r}; only "
            f"{SOURCE_ENCODING[family]!r} checkpoints of this family (and BERT's {V4_RELATIVE_TYPES}) can be converted."
        )
    return position_type, getattr(CONFIG_OF_FAMILY[family], "implied_fields", {}).get(model_type, {})


def _family_of_class(model_class: type[PreTrainedModel]) -> str:
    config_class = getattr(model_class, "config_class", None)
    for family, family_config in CONFIG_OF_FAMILY.items():
        if config_class is not None and issubclass(config_class, family_config):
            return family
    raise TypeError(f"{model_class!r} is not a relpos model class (RelPosBert*, RelPosGPT* or RelPosLlama*).")


def get_model_class(task: str, family: str) -> type[PreTrainedModel]:
    """The relpos class that serves `task` (a key of `TASKS`) for `family` (`"bert"`, `"gpt"` or `"llama"`)."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {sorted(TASKS)}.")
    class_name = TASKS[task][family]
    if class_name is None:
        served = [name for name, classes in TASKS.items() if classes[family]]
        raise ValueError(f"The {family} family has no {task!r} head; it serves {served}.")
    return getattr(importlib.import_module(f"{__package__}.{_MODULE_OF_FAMILY[family]}"), class_name)


def infer_task(config: PreTrainedConfig) -> str:
    """The task of a checkpoint from its `architectures` (`base` for a bare `BertModel`/`GPT2Model`; `causal-lm`
    for a Llama-family config that names none, as one read from a GGUF file)."""
    if not config.architectures and model_family(config) == "llama":
        return "causal-lm"
    for architecture in config.architectures or ():
        for suffix, task in _ARCHITECTURE_SUFFIX_TO_TASK.items():
            if architecture.endswith(suffix):
                return task
    return "base"


def convert_config(
    source_config: PreTrainedConfig, position_embedding_type: str | None = None, **overrides
) -> RelPosBertConfig | RelPosGPTConfig | RelPosLlamaConfig:
    """A `RelPosBertConfig` / `RelPosGPTConfig` / `RelPosLlamaConfig` for `source_config` (BERT, RoBERTa, MiniLM,
    RoFormer, DeBERTa-v2/v3, GPT-2, or the Llama family).

    Every network field is kept, with the fields of the source's own encoding (`source_encoding`);
    `position_embedding_type` (default: the source's) and `overrides` (encoding options such as
    `max_relative_positions`, or `num_labels`) are applied on top. A RoBERTa-style source gets
    `position_offset = pad_token_id + 1` so that its table of `max_position_embeddings` (514) rows is read where
    RoBERTa reads it.
    """
    model_type = source_config.model_type
    family = model_family(model_type)
    if model_type in RELPOS_MODEL_TYPES:
        values = source_config.to_dict()
        for name in ("model_type", "transformers_version", "auto_map", "architectures"):
            values.pop(name, None)
    else:
        source_position_type, fields = source_encoding(source_config)
        values = {key: value for key, value in source_config.to_dict().items() if key not in _SOURCE_ONLY_FIELDS}
        values.update(fields, position_embedding_type=source_position_type)
        if model_type in ROBERTA_MODEL_TYPES:
            pad_token_id = source_config.pad_token_id if source_config.pad_token_id is not None else 1
            values["position_offset"] = pad_token_id + 1
    if "num_labels" in overrides and "id2label" not in overrides:
        values.pop("id2label", None)
        values.pop("label2id", None)
    if position_embedding_type is not None:
        values["position_embedding_type"] = position_embedding_type
    values.update(overrides)
    return CONFIG_OF_FAMILY[family](**values)


def _checkpoint_keys(source: str, **hub_kwargs) -> set[str] | None:
    """The tensor names in a checkpoint (local folder or Hub id), read from the file headers only."""
    from transformers.utils import cached_file

    def resolve(filename):
        if os.path.isdir(source):
            path = os.path.join(source, filename)
            return path if os.path.isfile(path) else None
        with contextlib.suppress(Exception):
            return cached_file(source, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        return None

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = resolve(index_name)
        if index:
            with open(index) as handle:
                return set(json.load(handle)["weight_map"])
    path = resolve("model.safetensors")
    if path:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return set(handle.keys())
    path = resolve("pytorch_model.bin")
    if path:
        return set(torch.load(path, map_location="meta", weights_only=True, mmap=True))
    return None


def _split_gguf(source: str) -> tuple[str, dict[str, str]]:
    """A `.gguf` file is read from its folder with transformers' `gguf_file=`; other sources pass as they are."""
    if source.endswith(".gguf"):
        return os.path.dirname(source) or ".", {"gguf_file": os.path.basename(source)}
    return source, {}


def _save_gguf_as_safetensors(gguf_path: str, save_directory: str) -> None:
    """Load a `.gguf` file into its own transformers class (`gguf_file=`, dequantised to fp32) and save it as a plain
    safetensors checkpoint. transformers maps GGUF tensor names by the loading class's `model_type`, so the file is
    read by the class it was written for, not by a relpos class."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, gguf_kwargs = _split_gguf(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, **gguf_kwargs, dtype=torch.float32)
    if not all(parameter.is_floating_point() for parameter in model.parameters()):
        raise ValueError(
            f"transformers kept the GGUF weights of {gguf_path!r} packed (the `kernels` package is installed); "
            "uninstall it, or convert a dequantised safetensors copy of the model."
        )
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(save_directory)


class _DropLoadReport:
    """A logging filter that drops transformers' own key table (`... LOAD REPORT from: ...`)."""

    def filter(self, record) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_transformers_load_report():
    """`from_pretrained` logs its own key table; `load_converted` replaces it with one `ConversionReport`."""
    transformers_logger = logging.get_logger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    transformers_logger.addFilter(report_filter)
    try:
        yield
    finally:
        transformers_logger.removeFilter(report_filter)


def load_converted(
    model_class: type[PreTrainedModel] | str,
    source: str | os.PathLike,
    position_embedding_type: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    dtype: Any = "auto",
    attn_implementation: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **config_overrides,
) -> PreTrainedModel:
    """Load the checkpoint `source` (local folder or Hub id) into `model_class` with another position encoding.

    Args:
        model_class: a relpos class (`RelPosBertForSequenceClassification`, `RelPosGPTForCausalLM`, ...) or a task
            name from `TASKS` (`"sequence-classification"`, `"causal-lm"`, ...; the family follows the source).
        source: a BERT / RoBERTa / MiniLM (BERT layout) / RoFormer / DeBERTa-v2/v3 / GPT-2 checkpoint, with or
            without its base-model prefix (a bare `BertModel` or `GPT2Model` loads into any head), a Llama / SmolLM /
            Mistral / Qwen2 checkpoint (a folder, or the path of a `.gguf` file), or a relpos checkpoint.
        position_embedding_type: the new encoding (default: keep the source's).
        model_kwargs: arguments of the model's `__init__` (e.g. `{"add_pooling_layer": False}`).
        config_overrides: encoding options (`max_relative_positions`, `rope_parameters`, ...) and any other config
            field (`num_labels`, `id2label`, `classifier_dropout`, ...).

    Returns:
        The model, in eval mode, with `model.conversion_report` (a `ConversionReport`, also logged once).
    """
    source = os.fspath(source)
    if source.endswith(".gguf"):
        with tempfile.TemporaryDirectory() as folder, _held_back(logger):
            _save_gguf_as_safetensors(source, folder)
            model = load_converted(model_class, folder, position_embedding_type, dtype=dtype,
                                   attn_implementation=attn_implementation, **config_overrides)
        model.conversion_report.source = source
        _log_report(model.conversion_report)
        return model
    hub_kwargs = {"revision": revision, "cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
    source_config = AutoConfig.from_pretrained(source, **hub_kwargs)
    family = model_family(source_config)
    if isinstance(model_class, str):
        model_class = get_model_class(model_class, family)
    if _family_of_class(model_class) != family:
        raise ValueError(
            f"{model_class.__name__} cannot load a {source_config.model_type!r} checkpoint: use a "
            f"{CONFIG_OF_FAMILY[family].__name__.removesuffix('Config')}* class."
        )

    config = convert_config(source_config, position_embedding_type, **config_overrides)
    checkpoint_keys = _checkpoint_keys(source, **hub_kwargs)
    key_mapping = _key_mapping(source_config)
    if (
        family == "bert"
        and checkpoint_keys is not None
        and getattr(config, "type_vocab_size", 0) > 0
        and not any(key.endswith("embeddings.token_type_embeddings.weight") for key in checkpoint_keys)
    ):
        # A checkpoint without token types: adding a random table would change every output.
        config.type_vocab_size = 0

    load_kwargs = {"config": config, "dtype": dtype, "output_loading_info": True, **hub_kwargs}
    if key_mapping:
        load_kwargs["key_mapping"] = key_mapping
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    with _quiet_transformers_load_report():
        model, loading_info = model_class.from_pretrained(source, **load_kwargs, **(model_kwargs or {}))
    # Save under the relpos names: do not let save_pretrained revert the renaming.
    model._weight_conversions = []

    report = _build_report(source, source_config, model, config, key_mapping, loading_info)
    report.mapped_weights = _map_position_weights(model, source_config, loading_info)
    model.conversion_report = report
    _log_report(report)
    return model


def _log_report(report: ConversionReport) -> None:
    if report.is_lossless:
        logger.info(str(report))
    else:
        logger.warning(str(report))


@contextlib.contextmanager
def _held_back(held_logger):
    """Drop what `held_logger` logs meanwhile (the report of a GGUF's temporary folder, logged again under the file's
    own path)."""
    def drop_all(record) -> bool:
        return False

    held_logger.addFilter(drop_all)
    try:
        yield
    finally:
        held_logger.removeFilter(drop_all)


def _v4_relative(source_config: PreTrainedConfig) -> bool:
    """A BERT checkpoint of transformers v4 with `relative_key` / `relative_key_query` (removed in v5)."""
    return source_config.model_type == "bert" and (
        getattr(source_config, "position_embedding_type", None) in V4_RELATIVE_TYPES
    )


def _key_mapping(source_config: PreTrainedConfig) -> dict[str, str]:
    """Checkpoint names -> relpos names for the source's family (applied at load time, never reverted on save)."""
    model_type = source_config.model_type
    if model_type in ROBERTA_MODEL_TYPES:
        return dict(ROBERTA_KEY_MAPPING)
    if model_type == "roformer":
        return dict(ROFORMER_KEY_MAPPING)
    if model_type == "deberta-v2":
        return dict(DEBERTA_KEY_MAPPING)
    if _v4_relative(source_config):
        return dict(V4_RELATIVE_KEY_MAPPING)
    return {}


def rotate_half_permutation(num_heads: int, head_dim: int) -> torch.Tensor:
    """Output rows `[0, 2, 4, ..., 1, 3, 5, ...]` of every head: RoFormer rotates adjacent channel pairs
    `(2m, 2m + 1)`, the relpos `rope` (Llama's layout) pairs `(m, m + head_dim / 2)`, both at frequency `m`."""
    within = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return (torch.arange(num_heads)[:, None] * head_dim + within).flatten()


@torch.no_grad()
def _map_position_weights(model: PreTrainedModel, source_config: PreTrainedConfig, loading_info: dict) -> list[str]:
    """Rewrite the loaded weights whose layout differs from the relpos one (a renaming cannot): RoFormer's query/key
    rows, v4's distance tables. Returns what was done, for the report."""
    base = model.base_model
    if source_config.model_type == "roformer":
        attentions = [layer.attention.self for layer in base.encoder.layer]
        order = rotate_half_permutation(attentions[0].num_heads, attentions[0].head_dim)
        for attention in attentions:
            for projection in (attention.query, attention.key):
                projection.weight.copy_(projection.weight[order])
                projection.bias.copy_(projection.bias[order])
        return ["query/key rows of every head permuted to [0, 2, 4, ..., 1, 3, 5, ...] (RoFormer's adjacent rotary "
                "pairs -> rotate-half)"]
    tables = getattr(base.position_encoding, "distance_embedding", None) if _v4_relative(source_config) else None
    if tables is not None:
        not_loaded = {str(key) for key in (*loading_info["missing_keys"], *(loading_info.get("mismatched_keys") or ()))}
        flipped = []
        for layer, table in enumerate(tables):
            if not any(f"distance_embedding.{layer}.weight" in key for key in not_loaded):
                # v4 reads row (i - j) + k, the relpos encoding row (j - i) + k.
                table.weight.copy_(table.weight.flip(0))
                flipped.append(layer)
        if flipped:
            return [f"distance tables of layers {flipped} flipped (v4 row (i - j) + k -> relpos row (j - i) + k)"]
    return []


def _build_report(source, source_config, model, config, key_mapping, loading_info) -> ConversionReport:
    changes = {}
    if source_config.model_type not in RELPOS_MODEL_TYPES:
        changes["model_type"] = f"{source_config.model_type} -> {config.model_type}"
    for name in ("position_embedding_type", "position_offset", "type_vocab_size"):
        before = getattr(source_config, name, None) if name != "position_offset" else 0
        if name == "position_embedding_type" and source_config.model_type not in RELPOS_MODEL_TYPES:
            before = source_encoding(source_config)[0]
        after = getattr(config, name, None)
        if name == "position_offset" and after == 0:
            continue
        if before != after and after is not None:
            changes[name] = f"{before} -> {after}"
    report = ConversionReport(
        source=source,
        source_model_type=source_config.model_type,
        model_class=type(model).__name__,
        position_embedding_type=config.position_embedding_type,
        key_mapping=key_mapping,
        config_changes=changes,
    )
    for key in sorted(loading_info["unexpected_keys"]):
        if BUFFER_KEY.search(key):
            report.ignored_buffers.append(key)
        elif POSITION_KEY.search(key):
            report.dropped_position_weights.append(key)
        else:
            report.unused_checkpoint_weights.append(key)
    for key in sorted(loading_info["missing_keys"]):
        if POSITION_KEY.search(key) and config.position_embedding_type != "absolute":
            report.added_position_weights.append(key)
        else:
            report.newly_initialized.append(key)
    for key in loading_info.get("mismatched_keys") or ():
        report.newly_initialized.append(str(key))
    return report


@dataclass
class Seq2SeqConversionReport:
    """What `load_seq2seq` did: one `ConversionReport` per half, and how the new cross-attention started."""

    encoder: ConversionReport
    decoder: ConversionReport
    cross_attention_init: str = "random"

    @property
    def is_lossless(self) -> bool:
        return self.encoder.is_lossless and self.decoder.is_lossless

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder.to_dict(), "decoder": self.decoder.to_dict(),
                "cross_attention_init": self.cross_attention_init}

    def __str__(self) -> str:
        return (f"encoder: {self.encoder}\ndecoder: {self.decoder}\n"
                f"cross-attention initialised: {self.cross_attention_init}")


# How `load_seq2seq` starts the decoder's new cross-attention.
CROSS_ATTENTION_INITS = ("random", "self_attention")


def copy_self_attention_to_cross_attention(decoder: PreTrainedModel) -> int:
    """Start each BERT-layout decoder layer's cross-attention (query, key, value, output and its LayerNorm) as a copy
    of the same layer's pretrained self-attention, instead of at random: a query then begins by attending to source
    tokens whose states resemble its own, which a task that copies much of its source can use from the first step.
    Works on `RelPosBertForCausalLM` and transformers' `BertLMHeadModel` alike. Returns the number of tensors copied.
    """
    state = decoder.state_dict()
    copies = {name: state[name.replace(".crossattention.", ".attention.")] for name in state
              if ".crossattention." in name}
    if not copies:
        raise ValueError(f"cross_attention_init='self_attention' needs a BERT-layout decoder with `crossattention` "
                         f"modules; {type(decoder).__name__} has none.")
    decoder.load_state_dict(copies, strict=False)
    return len(copies)


def load_seq2seq(
    source: str | os.PathLike,
    encoder_position_embedding_type: str | None = None,
    decoder_position_embedding_type: str | None = None,
    *,
    decoder_start_token_id: int | None = None,
    eos_token_id: int | None = None,
    cross_attention_init: str = "random",
    **kwargs,
) -> PreTrainedModel:
    """BERT2BERT (Rothe et al. 2020): an encoder-decoder whose two halves are warm-started from ONE BERT-family
    checkpoint, each converted to its own position encoding (e.g. MiniLM -> alibi encoder + alibi decoder).

    The encoder is `RelPosBertModel` without BERT's pooler (a decoder reads every state); the decoder is
    `RelPosBertForCausalLM` with `is_decoder=True` and `add_cross_attention=True`, so its cross-attention (and any head
    the checkpoint lacks) is newly initialised and listed as such in `model.conversion_report` (a
    `Seq2SeqConversionReport`). `cross_attention_init="self_attention"` starts the cross-attention as a copy of each
    layer's self-attention (`copy_self_attention_to_cross_attention`) instead of at random as the paper does.
    `decoder_start_token_id` and `eos_token_id` default to the source tokenizer's `[CLS]`
    and `[SEP]` (BERT2BERT's choice), `pad_token_id` to the source's. `kwargs` go to `load_converted` for both
    halves (encoding options, `attn_implementation`, ...).

    Returns a `RelPosEncoderDecoderModel`: `save_pretrained` writes the code of both halves, and the folder loads with
    `AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True)`.
    """
    from .modeling_relpos_encoder_decoder import RelPosEncoderDecoderModel

    if cross_attention_init not in CROSS_ATTENTION_INITS:
        raise ValueError(f"cross_attention_init must be one of {list(CROSS_ATTENTION_INITS)}, "
                         f"got {cross_attention_init!r}.")
    source = os.fspath(source)
    encoder = load_converted(
        "base", source, encoder_position_embedding_type, model_kwargs={"add_pooling_layer": False}, **kwargs
    )
    decoder = load_converted(
        "causal-lm", source, decoder_position_embedding_type, is_decoder=True, add_cross_attention=True, **kwargs
    )
    if decoder_start_token_id is None or eos_token_id is None:
        from transformers import AutoTokenizer

        hub_keys = ("revision", "cache_dir", "token", "local_files_only")
        tokenizer = AutoTokenizer.from_pretrained(source, **{key: kwargs[key] for key in hub_keys if key in kwargs})
        start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        decoder_start_token_id = start if decoder_start_token_id is None else decoder_start_token_id
        eos_token_id = end if eos_token_id is None else eos_token_id
    if cross_attention_init == "self_attention":
        copy_self_attention_to_cross_attention(decoder)
    model = RelPosEncoderDecoderModel(encoder=encoder, decoder=decoder)
    special = {
        "decoder_start_token_id": decoder_start_token_id, "bos_token_id": decoder_start_token_id,
        "eos_token_id": eos_token_id, "pad_token_id": decoder.config.pad_token_id,
    }
    for config in (model.config, model.generation_config):
        for name, value in special.items():
            setattr(config, name, value)
    model.conversion_report = Seq2SeqConversionReport(
        encoder.conversion_report, decoder.conversion_report, cross_attention_init
    )
    return model.eval()


def convert_checkpoint(
    source: str | os.PathLike,
    save_directory: str | os.PathLike,
    position_embedding_type: str | None = None,
    task: str | None = None,
    *,
    copy_tokenizer: bool = True,
    overwrite: bool = False,
    **kwargs,
) -> tuple[PreTrainedModel, ConversionReport]:
    """Convert `source` and save it to `save_directory` with its modelling code, full `auto_map`, tokenizer and
    `conversion_report.json`. `task` picks the head (default: the source's, from its `architectures`), or
    `"seq2seq"`: BERT2BERT warm-started from `source` (`load_seq2seq`; `position_embedding_type` is the encoder's
    and `decoder_position_embedding_type`, default the same, the decoder's). `kwargs` go to `load_converted`.
    Returns the model and its report.

    The source is never written to. A non-empty `save_directory` is refused unless `overwrite`; the result is built
    in a folder beside it and renamed into place (`_replace_directory`), so a crash leaves the old folder or the
    complete new one, never a mix.
    """
    source = os.fspath(source)
    save_directory = os.fspath(save_directory)
    _check_destination(source, save_directory, overwrite)
    hub_keys = ("revision", "cache_dir", "token", "local_files_only")
    hub_kwargs = {key: kwargs[key] for key in hub_keys if key in kwargs}
    if task is None:
        folder, gguf_kwargs = _split_gguf(source)
        task = infer_task(AutoConfig.from_pretrained(folder, **gguf_kwargs, **hub_kwargs))
    if task == SEQ2SEQ_TASK:
        decoder_position_embedding_type = kwargs.pop("decoder_position_embedding_type", None) or position_embedding_type
        model = load_seq2seq(source, position_embedding_type, decoder_position_embedding_type, **kwargs)
    elif "cross_attention_init" in kwargs:
        raise ValueError(f"cross_attention_init applies to task={SEQ2SEQ_TASK!r} only, not {task!r}.")
    else:
        model = load_converted(task, source, position_embedding_type, **kwargs)
    report = model.conversion_report
    with _replace_directory(save_directory, overwrite) as staging:
        model.save_pretrained(staging)
        with open(os.path.join(staging, "conversion_report.json"), "w") as handle:
            json.dump(report.to_dict(), handle, indent=2)
        if copy_tokenizer:
            _copy_tokenizer(source, staging, hub_kwargs)
    return model, report


# Folders `_replace_directory` leaves beside DST only when killed: `.DST.hf-relpos-new-PID-*` (a result being
# built) and `.DST.hf-relpos-old-PID-*` (the old DST, moved aside for the instant of the swap).
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.hf-relpos-(?P<kind>new|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _check_destination(source: str, save_directory: str, overwrite: bool) -> None:
    """Refuse a destination that is, contains or lies inside a local source, and a non-empty one without
    `overwrite`. Leftovers of a killed conversion to the same destination are cleaned up first."""
    _clean_leftovers(save_directory)
    if os.path.exists(source):
        src, dst = os.path.realpath(source), os.path.realpath(save_directory)
        if os.path.commonpath([src, dst]) in (src, dst):
            raise ValueError(
                f"The destination {save_directory} and the source {source} overlap (the same folder, or one inside "
                "the other): convert never writes into its source. Choose another destination."
            )
    if os.path.lexists(save_directory) and not os.path.isdir(save_directory):
        raise FileExistsError(f"The destination {save_directory} exists and is not a folder.")
    if os.path.isdir(save_directory) and os.listdir(save_directory) and not overwrite:
        raise FileExistsError(
            f"The destination {save_directory} is not empty. Choose an empty or new folder, or pass --overwrite "
            "(overwrite=True) to replace it."
        )


def _clean_leftovers(save_directory: str) -> None:
    """Remove what killed conversions to `save_directory` left beside it; an old folder whose swap was cut short is
    put back in place."""
    parent, name = os.path.split(os.path.abspath(save_directory))
    if not os.path.isdir(parent):
        return
    for entry in sorted(os.listdir(parent)):
        match = _LEFTOVER.match(entry)
        if not match or match["name"] != name or _process_alive(int(match["pid"])):
            continue
        path = os.path.join(parent, entry)
        if match["kind"] == "old" and not os.path.lexists(save_directory):
            os.rename(path, save_directory)
            logger.warning(f"Restored {save_directory} from {path}, left by a conversion that was killed.")
        else:
            shutil.rmtree(path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


@contextlib.contextmanager
def _replace_directory(save_directory: str, overwrite: bool):
    """Yield an empty folder beside `save_directory` (same filesystem); on success it becomes `save_directory`.

    The new folder is written and synced, then renamed into place: over a missing or empty destination in one
    `rename`; with `overwrite`, over a non-empty one by moving the old folder aside, renaming the new one in, and
    removing the old. A process killed at any point leaves the old folder or the new complete one at
    `save_directory` (or, between the two renames, the old one beside it, put back by the next conversion to it).
    On an exception the new folder is removed and `save_directory` is untouched.
    """
    save_directory = os.path.abspath(save_directory)
    os.makedirs(os.path.dirname(save_directory), exist_ok=True)
    staging = _sibling(save_directory, "new")
    os.mkdir(staging)
    try:
        yield staging
        _sync_tree(staging)
        if overwrite and os.path.isdir(save_directory) and os.listdir(save_directory):
            aside = _sibling(save_directory, "old")
            os.rename(save_directory, aside)
            try:
                os.rename(staging, save_directory)
            except BaseException:
                os.rename(aside, save_directory)
                raise
            shutil.rmtree(aside, ignore_errors=True)  # what stays is removed by the next conversion to it
        else:
            os.replace(staging, save_directory)  # fails, rather than replace a folder filled since the check
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _sibling(save_directory: str, kind: str) -> str:
    """A new path beside `save_directory`, named as `_LEFTOVER` recognises: `.NAME.hf-relpos-KIND-PID-RANDOM`."""
    parent, name = os.path.split(save_directory)
    return os.path.join(parent, f".{name}.hf-relpos-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _sync_tree(folder: str) -> None:
    """fsync every file and the folder itself, so that the rename publishes complete files even after a power loss."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "added_tokens.json", "sentencepiece.bpe.model", "spiece.model",
)


def _copy_tokenizer(source: str, save_directory: str, hub_kwargs: dict) -> None:
    source, gguf_kwargs = _split_gguf(source)
    hub_kwargs = {**hub_kwargs, **gguf_kwargs}
    if os.path.isdir(source) and not gguf_kwargs:
        for name in _TOKENIZER_FILES:
            path = os.path.join(source, name)
            if os.path.isfile(path):
                shutil.copy2(path, os.path.join(save_directory, name))
        return
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source, **hub_kwargs).save_pretrained(save_directory)
    except Exception as error:  # a checkpoint without a tokenizer is still a checkpoint
        logger.warning(f"No tokenizer copied from {source!r}: {error}")


__all__ = [
    "CROSS_ATTENTION_INITS",
    "ConversionReport",
    "SEQ2SEQ_TASK",
    "Seq2SeqConversionReport",
    "TASKS",
    "convert_checkpoint",
    "convert_config",
    "copy_self_attention_to_cross_attention",
    "get_model_class",
    "infer_task",
    "load_converted",
    "load_seq2seq",
    "model_family",
]
