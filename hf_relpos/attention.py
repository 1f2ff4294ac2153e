"""Attention with a position encoding: the encoding's hooks and the kernel dispatch, shared by encoder and decoder.

The models own their projections (BERT's `query/key/value`, GPT-2's `c_attn`) and call `attention_forward`,
which rotates, updates the cache, asks the encoding for its bias and runs the kernel named by
`config._attn_implementation`: `eager` (the reference, below), `sdpa` (transformers' `sdpa_attention_forward`,
which folds `position_bias` into its float mask; on CPU, torch's kernel reading a bias of `j - i` alone from its
diagonals when it needs no gradient, and `kernels.QueryBlockedAttention` when it needs one),
`flex_attention` (the encoding's `score_mod`, no dense bias) or any other registered kernel that can serve the
encoding.
"""

import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .encodings import PositionEncoding, PositionState, get_encoding_class
from .kernels import (
    QueryBlockedAttention,
    flushed_attention,
    flushed_dropout_attention,
    later_keys,
    toeplitz_attention,
    toeplitz_mask,
)


logger = logging.get_logger(__name__)

# transformers 5.24 renamed the KV cache argument and output field `past_key_values` to `cache` (the old name is a
# deprecated alias until 5.40): the models take either and return the cache under the installed release's name.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(cache: Cache | None, kwargs: dict) -> Cache | None:
    """The KV cache passed as `cache` or as `past_key_values` (transformers < 5.24), removed from `kwargs`."""
    legacy = kwargs.pop("past_key_values", None)
    if cache is not None and legacy is not None:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else legacy


def token_positions(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    batch_size: int,
    query_length: int,
    past_length: int | torch.Tensor,
    key_length: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the queries `[batch, q_len]` and of all keys `[batch, k_len]` (cached ones included).

    With a 2D `attention_mask`, positions count real tokens only (`cumsum(mask != 0) - 1`: any non-zero entry is a
    token, as in transformers' `BertModel`), so left or right padding leaves the positions, and every distance, of
    real tokens as in the unpadded sequence. `position_ids`, when given, are the positions of the queries and of
    the new keys (the same tokens); the cached keys are counted back from the first query by the mask's real
    tokens (contiguously without a mask), so the count agrees with `position_ids = cumsum(mask) - 1`, as
    `generate` passes them. Keys past the mask (a static cache's empty slots) continue the count; they are masked
    anyway. Without a 2D mask `past_length` may be a tensor (a static cache's under `torch.compile`): nothing is
    sliced by it.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return contiguous_positions(position_ids, batch_size, query_length, past_length, key_length, device)
    # The mask covers `past + len` tokens (see `check_attention_mask`): its length is the past as a host int.
    past_length = attention_mask.shape[-1] - query_length
    counted = (attention_mask.to(device) != 0).long().cumsum(-1) - 1
    key_positions = counted.clamp(min=0)[:, :key_length].expand(batch_size, -1)
    if position_ids is None:
        query_positions = key_positions[:, past_length : past_length + query_length]
    else:
        query_positions = position_ids.to(device).expand(batch_size, -1)
        cached = key_positions[:, :past_length]
        if past_length:
            cached = cached - cached[:, -1:] + query_positions[:, :1] - 1
        key_positions = torch.cat((cached, query_positions), dim=-1)[:, :key_length]
    if key_positions.shape[-1] < key_length:
        # A static cache attends over all its slots: the empty ones continue the count (they are masked anyway).
        extra = torch.arange(1, key_length - key_positions.shape[-1] + 1, device=device)
        key_positions = torch.cat((key_positions, key_positions[:, -1:] + extra), dim=-1)
    return query_positions, key_positions


def contiguous_positions(
    position_ids: torch.Tensor | None,
    batch_size: int,
    query_length: int,
    past_length: int | torch.Tensor,
    key_length: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_positions` without a 2D mask: key slot `j` sits `j - past_length` tokens after the first query.

    Cached keys count back from the first query, the new keys are the queries, and the slots after them (a static
    cache's empty ones) continue the count. Computed for every slot by `where`, never sliced by `past_length`, so a
    tensor `past_length` leaves no data-dependent shape in a compiled graph.
    """
    slots = torch.arange(key_length, device=device)
    if position_ids is None:
        query_positions = torch.arange(query_length, device=device) + past_length
        return query_positions.expand(batch_size, -1), slots.expand(batch_size, -1)
    query_positions = position_ids.to(device).expand(batch_size, -1)
    offsets = slots - past_length
    new_keys = query_positions[:, offsets.clamp(0, query_length - 1)]
    before = query_positions[:, :1] + offsets
    after = query_positions[:, -1:] + offsets - (query_length - 1)
    key_positions = torch.where(offsets < 0, before, torch.where(offsets < query_length, new_keys, after))
    return query_positions, key_positions


def cross_attention_keys_values(
    cache: Cache | None, layer_idx: int, project: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the encoder's states `[batch, heads, src_len, head_dim]` for cross-attention: `project()`
    computes them at the first step of a generation (and without a cache); an `EncoderDecoderCache` keeps them in
    its cross-attention half and gives them back at every later step."""
    if not isinstance(cache, EncoderDecoderCache):
        return project()
    if cache.is_updated.get(layer_idx):
        layer = cache.cross_attention_cache.layers[layer_idx]
        return layer.keys, layer.values
    key, value = cache.cross_attention_cache.update(*project(), layer_idx)
    cache.is_updated[layer_idx] = True
    return key, value


def self_attention_cache(cache: Cache | None) -> Cache | None:
    """The cache of a decoder's self-attention: the self-attention half of an `EncoderDecoderCache`."""
    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


def check_attention_mask(
    attention_mask: torch.Tensor | None, batch_size: int, query_length: int, past_length: int, key_length: int
) -> None:
    """Raise `ValueError` unless `attention_mask` is `[batch, past + len]` (1 = token, 0 = padding), a prepared 4D
    mask `[batch, 1, q_len, k_len]` or a flex `BlockMask` (which `generate` builds for a static cache)."""
    if attention_mask is None or isinstance(attention_mask, BlockMask):
        return
    shape = tuple(attention_mask.shape)
    expected = (batch_size, past_length + query_length)
    if attention_mask.dim() == 2 and shape == expected:
        return
    if attention_mask.dim() == 4 and shape[0] in (1, batch_size) and shape[2:] == (query_length, key_length):
        return
    raise ValueError(
        f"attention_mask has shape {shape}; expected [batch, len] = {expected}: attention_mask covers "
        f"{shape[-1]} tokens but the cache holds {past_length} and the input adds {query_length} (or pass a "
        f"prepared 4D mask [batch, 1, {query_length}, {key_length}])."
    )


def cached_positions(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor,
    cache: Cache | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_positions` for `inputs_embeds` `[batch, len, hidden]` following what `cache` holds (None: no cache),
    after checking `attention_mask` against it; a static cache's key length comes from `get_mask_sizes`."""
    batch_size, length = inputs_embeds.shape[:2]
    past_length, key_length = 0, length
    if cache is not None:
        past_length = cache.get_seq_length()
        key_length, _ = cache.get_mask_sizes(length, 0)
    if not torch.compiler.is_compiling():
        # A static cache's length is a tensor in a compiled graph: checking it would read it on the host.
        check_attention_mask(attention_mask, batch_size, length, past_length, key_length)
    return token_positions(
        attention_mask, position_ids, batch_size, length, past_length, key_length, inputs_embeds.device
    )


def consecutive_offset(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, cache: Cache | None
) -> int | None:
    """The `uniform_offset` of the positions `cached_positions` builds, when it is known without reading them: no
    2D mask and no `position_ids` leave them consecutive, the first query `past` tokens after the first key, so
    `j - i = (key index) - (query index) - past`. `past` is the cache's length when that is a host int (a static
    cache's is a tensor in a compiled graph). None otherwise."""
    if position_ids is not None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        return None
    past_length = cache.get_seq_length() if cache is not None else 0
    return -past_length if type(past_length) is int else None


def check_inputs(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    hidden_size: int,
) -> None:
    """Raise `ValueError` naming the expected shape unless exactly one of `input_ids` `[batch, len]` and
    `inputs_embeds` `[batch, len, hidden_size]` is given, with `batch, len > 0`, and `position_ids` (if given) is
    `[batch, len]` or `[1, len]`."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)}; expected [batch, len] (a single sequence is "
            "input_ids[None])."
        )
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size):
        raise ValueError(
            f"inputs_embeds has shape {tuple(inputs_embeds.shape)}; expected [batch, len, hidden_size] with "
            f"hidden_size = {hidden_size}."
        )
    batch_size, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    if batch_size == 0 or length == 0:
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(f"{name} is empty (batch {batch_size}, length {length}); expected at least one token.")
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch_size)
                                     or position_ids.shape[1] != length):
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)}; expected [batch, len] = {(batch_size, length)} "
            f"or [1, len] = {(1, length)}."
        )


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax(q k^T * scaling + position_bias + mask) v`, softmax in fp32 (or the scores' dtype when wider).

    `query` `[batch, heads, q_len, d]`, `key`/`value` `[batch, kv_heads, k_len, d]` (grouped-query attention when
    `kv_heads < heads`: each key head serves `heads / kv_heads` query heads), `attention_mask` an additive
    float or a boolean (True = attend) mask broadcastable to `[batch, heads, q_len, k_len]`. Returns the output
    `[batch, q_len, heads, d]` and the weights `[batch, heads, q_len, k_len]`.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if position_bias is None:
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    else:
        # The bias is the GEMM's accumulator: one pass fewer over the scores, and a compiled graph materialises a
        # gathered bias once instead of recomputing its gathers in each of the softmax's passes.
        batch, heads, length, dim = query.shape
        bias = position_bias.to(query.dtype).expand(batch, heads, length, key.shape[2])
        scores = torch.baddbmm(
            bias.reshape(batch * heads, length, -1), query.reshape(batch * heads, length, dim),
            key.reshape(batch * heads, -1, dim).transpose(1, 2), alpha=scaling,
        ).view(batch, heads, length, -1)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    # fp64 scores keep fp64: in fp32 their mask value finfo(float64).min becomes -inf, a fully masked row NaN.
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    weights = weights.to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


@functools.cache
def compiled_flex_attention():
    # Static shapes: torch 2.13's dynamic compile of flex attention breaks on CPU.
    return torch.compile(flex_attention, dynamic=False)


# Tiles of flex attention's Triton kernels (`kernel_options`), tried in turn where a GPU's shared memory cannot hold
# the previous ones: a score_mod whose tables need a gradient makes the kernels larger (inductor's own choice, None,
# does not fit an H200 at head_dim 64 in bf16 for t5, relative_key_query or deberta). Backward tiles keep BLOCK_N1 a
# multiple of BLOCK_M1 and BLOCK_M2 of BLOCK_N2, as flex requires.
FLEX_TILES = (
    None,
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
    {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1, "BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16},
)
# The first tiles that compiled, per (device, dtype, head_dim, training, score_mod's code).
flex_tiles: dict[tuple, int] = {}


def compiled_flex_with_tiles(query, key, value, score_mod, **kwargs) -> torch.Tensor:
    """The compiled flex kernel, on smaller tiles (`FLEX_TILES`) when compiling it runs out of shared memory."""
    signature = (query.device, query.dtype, query.shape[-1], query.requires_grad and torch.is_grad_enabled(),
                 getattr(score_mod, "__code__", None))
    for index in range(flex_tiles.get(signature, 0), len(FLEX_TILES)):
        try:
            output = compiled_flex_attention()(query, key, value, score_mod=score_mod,
                                               kernel_options=FLEX_TILES[index], **kwargs)
        except Exception as error:  # inductor's error names the resource, whatever its type in this release
            if "out of resource" not in str(error) or index + 1 == len(FLEX_TILES):
                raise
            logger.warning_once(f"flex_attention: the default tiles do not fit this GPU's shared memory; using "
                                f"{FLEX_TILES[index + 1]}.")
            continue
        flex_tiles[signature] = index
        return output


def flex_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: BlockMask | None,
    scaling: float,
    dropout: float = 0.0,
    score_mod=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Flex attention with the encoding's `score_mod` and the padding/causal `BlockMask`: no `[q_len, k_len]`
    tensor is built. A single query (a decode step) runs the uncompiled kernel, whose `[batch, heads, 1, k_len]`
    scores are linear in length and need no recompilation as the cache grows."""
    if dropout > 0.0:
        raise ValueError(
            "attn_implementation='flex_attention' has no attention dropout: set the attention dropout "
            "(attention_probs_dropout_prob / attn_pdrop) to 0, call model.eval(), or use 'sdpa'."
        )
    if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
        raise ValueError(
            "attn_implementation='flex_attention' has no backward pass on CPU in this torch version: train with "
            "'sdpa' or 'eager', and use 'flex_attention' for inference and generation (torch.no_grad())."
        )
    block_mask = attention_mask if isinstance(attention_mask, BlockMask) else None
    enable_gqa = key.shape[1] != query.shape[1]
    if torch.compiler.is_compiling():
        # Traced into the caller's graph (a compiled static-cache decode step), where flex compiles with it.
        output = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                                enable_gqa=enable_gqa)
    elif query.shape[2] == 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            output = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                                    enable_gqa=enable_gqa)
    else:
        # Contiguous inputs keep one compiled graph per shape (cached keys arrive with other strides).
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        output = compiled_flex_with_tiles(query, key, value, score_mod, block_mask=block_mask, scale=scaling,
                                          enable_gqa=enable_gqa)
    return output.transpose(1, 2).contiguous(), None


# Scores per block of queries (8 MiB in fp32): big enough for BLAS, small enough for cache and memory.
BLOCK_SCORES = 2**21
# Kernels that apply a position bias: a dense `position_bias` (eager, sdpa) or a `score_mod` (flex).
BIAS_KERNELS = ("eager", "sdpa", "flex_attention")


def sdpa_bias_needs_grad(config, encoding: PositionEncoding, device: torch.device) -> bool:
    """Whether sdpa on CPU meets a bias that needs a gradient, which torch's sdpa gives only on its `[q_len, k_len]`
    math path. A bias without one stays on torch's fused kernel as a float mask."""
    return (config._attn_implementation == "sdpa" and encoding.has_bias and device.type == "cpu"
            and encoding.bias_needs_grad())


def blocked_training(config, encoding: PositionEncoding, device: torch.device) -> bool:
    """Whether sdpa runs `QueryBlockedAttention`: a bias that needs a gradient on CPU, uncompiled. Under
    `torch.compile` the dense bias is traced into the graph and `eager_attention_forward` takes it instead (see
    `attention_forward`): inductor fuses the bias, scale, mask and softmax passes forward and backward."""
    return sdpa_bias_needs_grad(config, encoding, device) and not torch.compiler.is_compiling()


def causal_bias(bias: torch.Tensor, key_length: int) -> torch.Tensor:
    """`bias` `[..., q_len, k_len]` with the keys after each query (`kernels.later_keys`) set to the dtype's
    minimum: sdpa's `is_causal` for a kernel that reads the bias alone."""
    query_length = bias.shape[-2]
    later = later_keys(slice(0, query_length), query_length, key_length, bias.device)
    return bias.masked_fill(later, torch.finfo(bias.dtype).min)


def causal_without_mask(
    module: nn.Module, query_length: int, attention_mask: torch.Tensor | None, is_causal: bool | None
) -> bool:
    """Whether sdpa would apply `is_causal` itself: no mask given, several queries, and a causal module (the
    `is_causal` the layer passes, else the module's attribute, as transformers' sdpa wrapper reads it)."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return query_length > 1 and attention_mask is None and is_causal


def dense_bias(
    config, encoding: PositionEncoding, query_positions: torch.Tensor, key_positions: torch.Tensor
) -> bool:
    """Whether the configured kernel reads the encoding's bias as a dense `[q_len, k_len]` tensor, so `prepare`
    builds one: not flex attention (a `score_mod`), and not the query-blocked kernel unless every query fits in one
    block (then the dense bias is small, and position-only schemes share it across layers)."""
    if config._attn_implementation == "flex_attention":
        return False
    if blocked_training(config, encoding, query_positions.device):
        batch, query_length = query_positions.shape
        return batch * config.num_attention_heads * query_length * key_positions.shape[1] <= BLOCK_SCORES
    return True


def toeplitz_kernel(
    config, encoding: PositionEncoding, attention_mask: torch.Tensor | BlockMask | None, device: torch.device,
    checkpointing: bool = False,
) -> bool:
    """Whether sdpa reads the bias from its diagonals (`toeplitz_attention_forward`): a bias of `j - i` alone
    (`encoding.toeplitz`) on CPU, whose fused kernel reads a strided float mask, and no padding mask to add to it
    (the layers' `attention_mask` is None; a causal mask goes into the diagonals). A bias that trains, too, unless
    the layers are checkpointed: each then builds its own (see `position_state`) and takes the blocked kernel."""
    return (config._attn_implementation == "sdpa" and encoding.toeplitz and device.type == "cpu"
            and attention_mask is None and not (checkpointing and encoding.bias_needs_grad()))


def toeplitz_diagonals(encoding: PositionEncoding, state: PositionState) -> torch.Tensor:
    """`encoding.toeplitz_bias` `[heads, q_len + k_len - 1]` in the kernel's dtype, with a causal encoding's
    mask folded in: keys after the query (`j - i > 0`) get the dtype's minimum, as transformers' masks do."""
    diagonals = encoding.toeplitz_bias(state).to(state.dtype)
    if encoding.causal:
        query_length = state.query_positions.shape[1]
        distance = torch.arange(diagonals.shape[-1], device=diagonals.device) - (query_length - 1)
        diagonals = diagonals.masked_fill(distance + state.uniform_offset > 0, torch.finfo(state.dtype).min)
    return diagonals.contiguous()


def masked_bias(bias: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`bias` `[batch or 1, heads, q_len, k_len]` with a prepared 4D `attention_mask` folded in: an additive float
    mask added, a boolean one (True = attend) as the dtype's minimum where it is False."""
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, bias, torch.finfo(bias.dtype).min)
    return bias + attention_mask


def position_state(
    config, encoding: PositionEncoding, query_positions: torch.Tensor, key_positions: torch.Tensor,
    dtype: torch.dtype, checkpointing: bool = False, attention_mask: torch.Tensor | BlockMask | None = None,
    known_offset: int | None = None,
) -> PositionState:
    """What `encoding` prepares once per forward for every layer (`prepare`, dense or not for the kernel), given the
    `attention_mask` the layers get (None: no padding mask) and the positions' `known_offset` (`consecutive_offset`).

    With `checkpointing` (layers under gradient checkpointing), tables that carry autograd history (a learned bias)
    are left for each layer to build inside its checkpointed region: a reentrant replay runs backward through what
    the layer read, and a graph shared by all layers can be run backward only once.
    """
    def prepared(dense: bool) -> PositionState:
        state = encoding.prepare(query_positions, key_positions, dtype, dense=dense)
        state.known_offset = known_offset
        return state

    if toeplitz_kernel(config, encoding, attention_mask, query_positions.device, checkpointing):
        state = prepared(dense=False)
        if state.uniform_offset is not None:
            state.tables["toeplitz"] = toeplitz_diagonals(encoding, state)
            return state
    state = prepared(dense=dense_bias(config, encoding, query_positions, key_positions))
    bias = state.tables.get("bias")
    if (bias is not None and not bias.requires_grad and isinstance(attention_mask, torch.Tensor)
            and config._attn_implementation in ("eager", "sdpa")):
        # A position-only bias without a gradient and the layers' padding mask, added once for every layer (the
        # kernels would each add them again: a `[batch, heads, q_len, k_len]` pass per layer).
        state.tables["masked_bias"] = masked_bias(state.tables.pop("bias"), attention_mask)
    if checkpointing:
        state.tables = {name: table for name, table in state.tables.items() if not table.requires_grad}
    return state


def query_blocked_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    encoding: PositionEncoding,
    state: PositionState,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa's contract (`[batch, q_len, heads, d]`, no weights, causal when no mask is given) computed by
    `QueryBlockedAttention` with the bias rows of `encoding` (or of its dense bias, when `prepare` built one)."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if state.dense:
        tables, row_tables = (encoding.bias(query, key, state, module.layer_idx),), 1

        def bias_rows(tables, rows):
            return tables[0]
    else:
        tables, row_tables = encoding.bias_tables(query, key, state, module.layer_idx), encoding.row_tables

        def bias_rows(tables, rows):
            return encoding.bias_rows(tables, state, rows)

    causal = causal_without_mask(module, query.shape[2], attention_mask, is_causal)
    output = QueryBlockedAttention.apply(
        query, key, value, attention_mask, bias_rows, row_tables, scaling, dropout, causal,
        query_block_size(query, key), *tables,
    )
    return output.transpose(1, 2).contiguous(), None


def query_block_size(query: torch.Tensor, key: torch.Tensor) -> int:
    """Queries per block of the blocked kernels: `BLOCK_SCORES` scores, at least 16 queries."""
    return max(16, BLOCK_SCORES // (query.shape[0] * query.shape[1] * key.shape[2]))


def warn_without_weights(kwargs: dict) -> None:
    """Say once that the fused kernels return no attention weights, when `output_attentions` asks for them."""
    if kwargs.get("output_attentions", False):
        logger.warning_once("attn_implementation='sdpa' returns no attention weights: set it to 'eager' for "
                            "output_attentions=True.")


def toeplitz_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    diagonals: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa's contract (`[batch, q_len, heads, d]`, no weights) for a bias of `j - i` alone, read by torch's fused
    kernel from its `diagonals` `[heads, q_len + k_len - 1]` (`toeplitz_diagonals`).

    With the queries in reverse order the bias of (query `i`, key `j`) is entry `(q_len - 1 - i) + j`: constant
    along anti-diagonals, a view of the diagonals with strides (1, 1). No `[q_len, k_len]` mask is built or read
    from memory; reversing the queries and the output costs two copies of `[batch, heads, q_len, d]`. Diagonals
    that need a gradient (a learned bias) go through `kernels.toeplitz_attention`, whose backward gives them one.
    """
    warn_without_weights(kwargs)
    if diagonals.requires_grad and torch.is_grad_enabled():
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        seed = torch.randint(2**62, (), device=query.device) if dropout > 0.0 else None
        output = toeplitz_attention(query, key, value, diagonals, scaling, query_block_size(query, key), dropout, seed)
        return output.transpose(1, 2).contiguous(), None
    if flushes(query):
        output = flushed_fixed_bias_attention(query.flip(2), key, value, diagonals, scaling, dropout)
        return output.transpose(1, 2).flip(1).contiguous(), None
    mask = toeplitz_mask(diagonals, query.shape[2], key.shape[2])
    output = nn.functional.scaled_dot_product_attention(
        query.flip(2), key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return output.transpose(1, 2).flip(1).contiguous(), None


def flushes(query: torch.Tensor) -> bool:
    """Whether `flushed_fixed_bias_attention` serves a fixed bias: on CPU, in fp32 or bf16 (what torch's fused CPU
    kernel takes)."""
    return query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16)


def flushed_fixed_bias_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float, dropout: float
) -> torch.Tensor:
    """Attention `[batch, heads, q_len, d]` with a fixed float `mask` (`kernels.fused_mask`: Toeplitz diagonals over
    reversed queries, or dense), denormal floats flushed forward and backward (ALiBi's distant keys): torch's fused
    CPU kernel (`flushed_attention`), or with dropout, which that kernel lacks, the math sdpa would fall back to
    (`flushed_dropout_attention`)."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if dropout == 0.0:
        return flushed_attention(query, key, value, mask, scaling)[0]
    return flushed_dropout_attention(query, key, value, mask, scaling, dropout)[0]


def resolve_kernel(implementation: str | None, encoding: type[PositionEncoding] | PositionEncoding | None) -> str:
    """The kernel that serves `encoding`: the requested one, or `sdpa` with a one-time warning naming both."""
    implementation = implementation or "eager"
    if encoding is not None and encoding.has_bias and implementation not in BIAS_KERNELS:
        logger.warning_once(
            f"attn_implementation={implementation!r} cannot apply the score bias of position_embedding_type="
            f"{encoding.name!r}; falling back to 'sdpa'."
        )
        return "sdpa"
    return implementation


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    encoding: PositionEncoding | None = None,
    state: PositionState | None = None,
    cache: Cache | None = None,
    dropout: float = 0.0,
    scale: float = 1.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of `query` `[batch, heads, q_len, d]` over the new `key`/`value` `[batch, heads, new, d]` (and the
    cached ones), with the position terms of `encoding` (None: cross-attention, no position terms).

    `scale` multiplies the encoding's softmax scale (GPT-2's `scale_attn_by_inverse_layer_idx`). Keys and values
    may have fewer heads than the queries (grouped-query attention): the cache keeps them so, each kernel serves them
    (transformers' sdpa reads `module.num_key_value_groups`), and content-bias encodings see the keys repeated to
    the query heads. Returns `[batch, q_len, heads, d]` and the attention weights when the kernel produces them.
    """
    scaling = scale * query.shape[-1] ** -0.5
    if encoding is not None:
        query, key = encoding.rotate(query, key, state)
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx)
    implementation = resolve_kernel(module.config._attn_implementation, encoding)
    if encoding is not None:
        scaling = scale * encoding.scaling(query.shape[-1])
        bias_key = repeat_kv(key, query.shape[1] // key.shape[1]) if encoding.content_bias else key
        if implementation == "flex_attention":
            kwargs["score_mod"] = encoding.score_mod(query, bias_key, state, module.layer_idx)
        elif implementation == "sdpa" and "toeplitz" in state.tables:
            return toeplitz_attention_forward(
                module, query, key, value, state.tables["toeplitz"], scaling, dropout, **kwargs
            )
        elif "masked_bias" in state.tables:
            attention_mask = state.tables["masked_bias"]
            if implementation == "sdpa" and flushes(query):
                warn_without_weights(kwargs)
                output = flushed_fixed_bias_attention(query, key, value, attention_mask.to(query.dtype), scaling,
                                                      dropout)
                return output.transpose(1, 2).contiguous(), None
        elif implementation == "sdpa" and (not state.dense or blocked_training(module.config, encoding, query.device)):
            return query_blocked_attention_forward(
                module, query, key, value, attention_mask, encoding, state, scaling, dropout, **kwargs
            )
        elif (bias := encoding.bias(query, bias_key, state, module.layer_idx)) is not None:
            if implementation == "sdpa" and sdpa_bias_needs_grad(module.config, encoding, query.device):
                # Compiled (uncompiled, `blocked_training` took it above): inductor decomposes sdpa with a bias that
                # needs a gradient into this math anyway, and eager's GEMM accumulates onto the bias, which inductor
                # then materialises once instead of recomputing its gathers in each softmax pass. sdpa's masks leave
                # causality to `is_causal` when there is no padding: the bias takes it here.
                if causal_without_mask(module, query.shape[2], attention_mask, kwargs.pop("is_causal", None)):
                    bias = causal_bias(bias, key.shape[2])
                implementation = "eager"
            kwargs["position_bias"] = bias
    if implementation == "flex_attention":  # the one kernel that takes a `score_mod`: see `dense_bias`
        interface = flex_attention_forward
    else:
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    return interface(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


class RelPosPreTrainedModel(PreTrainedModel):
    """What the encoder and decoder families share: the kernels they serve, kernel resolution before masks are
    built, config validation at construction, and the encodings' own initialisation."""

    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Kernels are looked up through `ALL_ATTENTION_FUNCTIONS` above, so switching them at run time is safe.
    _can_set_attn_implementation_cached_value = True
    # Every encoding traces into one graph, a static cache's decode step included (tests/test_static_compile.py):
    # `generate(cache_implementation="static")` compiles that step with fullgraph.
    _can_compile_fullgraph = True

    def __init__(self, config, *args, **kwargs):
        # Fields may have been set after the config was built (e.g. `from_pretrained(..., position_embedding_type=)`).
        config.validate_position_encoding()
        super().__init__(config, *args, **kwargs)

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs) -> str:
        # Masks are built for the kernel that will run: a kernel the encoding cannot use is replaced up front.
        implementation = super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, **kwargs)
        return resolve_kernel(implementation, get_encoding_class(self.config.position_embedding_type))

    def checkpointing_layers(self) -> bool:
        """Whether this forward runs its layers under gradient checkpointing (training, with autograd)."""
        return self.training and torch.is_grad_enabled() and any(
            isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing
            for module in self.modules()
        )

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PositionEncoding):
            module.init_weights(self.config)
