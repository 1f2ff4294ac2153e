"""Shared fixtures: a tiny encoder config and a fixed seed."""

import pytest
import torch

from hf_relpos import POSITION_ENCODINGS, RelPosBertConfig


ENCODER_ENCODINGS = [name for name, cls in POSITION_ENCODINGS.items() if not cls.decoder_only]
BIAS_ENCODINGS = [name for name, cls in POSITION_ENCODINGS.items() if cls.has_bias]


def tiny_bert_config(**overrides) -> RelPosBertConfig:
    """A two-layer, four-head encoder small enough for CPU tests; `overrides` replace any field."""
    fields = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    fields.update(overrides)
    return RelPosBertConfig(**fields)


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    return 0
