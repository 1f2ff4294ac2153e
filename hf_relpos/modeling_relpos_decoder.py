"""What every relpos decoder (the GPT-2 and the Llama layouts) does before its layers run.

Positions of the queries and of all keys (the cache offset and left padding included), the causal mask for the
configured kernel, and the encoding's per-forward state: one function, so the two layouts differ only in their
modules.
"""

from typing import NamedTuple

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from .attention import cached_positions, consecutive_offset, position_state
from .encodings import PositionEncoding, PositionState


class DecoderInputs(NamedTuple):
    """`query_positions` `[batch, q_len]`, the causal `mask` built for the configured kernel (or None), and the
    encoding's `state` shared by every layer."""

    query_positions: torch.Tensor
    mask: torch.Tensor | None
    state: PositionState


def decoder_inputs(
    config,
    encoding: PositionEncoding,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: Cache | None,
    checkpointing: bool = False,
) -> DecoderInputs:
    """Positions, causal mask and position state for `inputs_embeds` `[batch, len, hidden]` following the `cache`.

    `attention_mask` `[batch, past + len]` (1 = token, 0 = padding) sets the positions of real tokens, so a
    left-padded batch generates as each prompt alone; a static cache's key length comes from `get_mask_sizes`.
    `checkpointing`: the layers run under gradient checkpointing (see `position_state`).
    """
    query_positions, key_positions = cached_positions(attention_mask, position_ids, inputs_embeds, cache)
    # The cache is passed by position: its keyword is `past_key_values` before 5.24 and `cache` from it on.
    mask = create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids=query_positions)
    state = position_state(config, encoding, query_positions, key_positions, inputs_embeds.dtype, checkpointing,
                           mask, consecutive_offset(attention_mask, position_ids, cache))
    return DecoderInputs(query_positions, mask, state)
