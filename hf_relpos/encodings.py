"""The catalog of position encodings.

One class per scheme, registered in `POSITION_ENCODINGS` under its `position_embedding_type`. A model owns one
encoding (where BERT keeps `embeddings.position_embeddings`, where GPT-2 keeps `wpe`) and calls its hooks:

- `embed(inputs_embeds, position_ids)`: absolute schemes add to the token embeddings.
- `prepare(query_positions, key_positions, dtype, dense)`: once per forward, the tables every layer shares
  (cos/sin, a bias); `[q_len, k_len]` tables only when `dense` (eager/sdpa kernels), never for flex. Under
  gradient checkpointing the model drops the tables that carry autograd history, and the hooks rebuild them.
- `rotate(query, key, state)`: rotary schemes rotate queries and the *new* keys (before they are cached).
- `bias(query, key, state, layer_idx)`: a dense additive score bias broadcastable to `[batch, heads, q_len, k_len]`.
- `score_mod(query, key, state, layer_idx)`: the same bias as a flex-attention `score_mod`, which never builds
  the `[q_len, k_len]` tensor.
- `scaling(head_dim)`: the softmax scale of the content term.

Positions are absolute token indices (`[batch, len]`) that already account for the KV cache and for padding, so
every distance `j - i` is the distance between real tokens. This file knows nothing about models.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import logging

from .kernels import (
    ClippedRows,
    DiagonalRows,
    DistanceRows,
    RunGather,
    SkewedRows,
    cpu_kernels,
    pair_dot,
    pair_dot_applies,
    piecewise_linear,
)


logger = logging.get_logger(__name__)

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PositionState:
    """What an encoding computed once per forward for every layer to use.

    `query_positions` is `[batch, q_len]`, `key_positions` is `[batch, k_len]` (cached keys included);
    `tables` holds scheme-specific tensors (rotary cos/sin, a shared bias, gather indices); `dtype` is the model's
    compute dtype; `dense` says whether `[q_len, k_len]` tables were built (a kernel that reads a dense bias) or not
    (one that reads `score_mod` or `bias_rows`).
    """

    query_positions: torch.Tensor
    key_positions: torch.Tensor
    tables: dict[str, torch.Tensor] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    dense: bool = True
    # `DistanceRows`' columns and end runs per table, built by `diagonal_columns` once per forward.
    diagonals: dict[tuple, tuple[torch.Tensor, tuple[int, int]]] = field(default_factory=dict)
    # `uniform_offset` when the model built the positions consecutive (`attention.consecutive_offset`), or once read.
    known_offset: int | None = None
    offset_read: bool = False

    @property
    def uniform_offset(self) -> int | None:
        """`c` such that `j - i = (key index) - (query index) + c` for every pair in the batch (consecutive
        positions, the same start in every row), or None: `known_offset` when given, else read on the host once per
        forward (None in a compiled graph, which reads no positions on the host). Not a `functools.cached_property`,
        whose lock (Python 3.11) breaks a compiled graph wherever a layer asks."""
        if self.known_offset is None and not self.offset_read and not torch.compiler.is_compiling():
            self.known_offset, self.offset_read = self.read_uniform_offset(), True
        return self.known_offset

    def read_uniform_offset(self) -> int | None:
        query_positions, key_positions = self.query_positions, self.key_positions
        offset = key_positions[:, :1] - query_positions[:, :1]
        arange = functools.partial(torch.arange, device=offset.device)
        steps = (key_positions - key_positions[:, :1] == arange(key_positions.shape[1])).all()
        steps &= (query_positions - query_positions[:, :1] == arange(query_positions.shape[1])).all()
        return int(offset[0]) if bool(steps & (offset == offset[0]).all()) else None

    @functools.cached_property
    def reach(self) -> int:
        """The largest `|j - i|` of the batch's pairs. Read on the host once per forward."""
        query_positions, key_positions = self.query_positions, self.key_positions
        return max(int(key_positions.max() - query_positions.min()), int(query_positions.max() - key_positions.min()))

    @functools.cached_property
    def ordered(self) -> bool:
        """Whether positions never fall along a row (as padding leaves them; packed sequences that restart do not).
        Read on the host once per forward."""
        return bool((self.query_positions.diff(dim=-1) >= 0).all() & (self.key_positions.diff(dim=-1) >= 0).all())

    @functools.cached_property
    def same_rows(self) -> bool:
        """Whether every row of the batch has the same query and key positions (no padding). Read on the host."""
        return bool((self.query_positions == self.query_positions[:1]).all()
                    & (self.key_positions == self.key_positions[:1]).all())


def relative_distance(state: PositionState, rows: slice = slice(None)) -> torch.Tensor:
    """`j - i` for the queries `i` in `rows` and every key `j`: `[batch, len(rows), k_len]`."""
    return state.key_positions[:, None, :] - state.query_positions[:, rows, None]


def dense_reader(state: PositionState, tables: tuple[torch.Tensor, ...]) -> str | None:
    """How a dense content bias reads its distance tables when they need a gradient: `"diagonals"` (consecutive
    positions: `diagonal_bias`), `"runs"` (ordered positions, as padding leaves them: `RunGather`), or None (a plain
    gather: no gradient, positions that fall along a row, or a compiled graph, which reads no positions on the host).
    A gather's backward scatter-adds every pair into its entry, which a GPU serialises where thousands of pairs
    share one."""
    if not (state.dense and any(table.requires_grad for table in tables)) or torch.compiler.is_compiling():
        return None
    if state.uniform_offset is not None:
        return "diagonals"
    return "runs" if state.ordered else None


def reads_clipped(state: PositionState) -> bool:
    """Whether a content bias reads its distance tables by `clipped_bias`: consecutive positions in a compiled graph
    (`known_offset`), where a gather by an index would scatter-add every pair in backward (inductor's atomic adds)."""
    return torch.compiler.is_compiling() and state.uniform_offset is not None


def diagonal_bias(
    state: PositionState, name: str, entry: Callable[[torch.Tensor], torch.Tensor],
    query_table: torch.Tensor | None, key_table: torch.Tensor | None,
) -> torch.Tensor:
    """`query_table[b, h, i, entry(j - i)] + key_table[b, h, j, entry(j - i)]` `[batch, heads, q_len, k_len]` for
    consecutive positions, by `DistanceRows` (a None table adds nothing): `query_table` `[batch, heads, q_len, n]`,
    `key_table` `[batch, heads, k_len, n]`, `entry` a monotone map from distances to table entries."""
    query_length, key_length = state.query_positions.shape[1], state.key_positions.shape[1]
    bias = 0
    if query_table is not None:
        bias = DistanceRows.apply(query_table, *diagonal_columns(state, entry, name), key_length)
    if key_table is not None:
        keys = diagonal_columns(state, entry, name, transposed=True)
        bias = bias + DistanceRows.apply(key_table, *keys, query_length).transpose(-1, -2)
    return bias


def diagonal_columns(
    state: PositionState, entry: Callable[[torch.Tensor], torch.Tensor], name: str, transposed: bool = False
) -> tuple[torch.Tensor, tuple[int, int]]:
    """`DistanceRows`' columns for consecutive positions (`uniform_offset`): `entry(j - i)`, a monotone map from
    distances to table entries, along the diagonals of the `[q_len, k_len]` matrix (`[k_len, q_len]`, keys as rows,
    with `transposed`), bottom-left first; and the lengths of their constant runs at both ends. Built once per
    forward under `name` (one read on the host) and shared by the layers."""
    if (name, transposed) not in state.diagonals:
        rows, cols = state.query_positions.shape[1], state.key_positions.shape[1]
        if transposed:
            rows, cols = cols, rows
        diagonals = torch.arange(1 - rows, cols, device=state.query_positions.device)
        columns = entry((-diagonals if transposed else diagonals) + state.uniform_offset)
        host = columns.cpu()
        head = int((host == host[0]).sum())
        state.diagonals[name, transposed] = columns, (head, min(int((host == host[-1]).sum()), len(host) - head))
    return state.diagonals[name, transposed]


class PositionEncoding(nn.Module):
    """Base class: every hook is a no-op; a scheme overrides the hooks it needs.

    Class attributes tell the kernels what to expect: `has_bias` (a score bias comes from `bias`/`score_mod`),
    `content_bias` (that bias depends on the queries/keys of each layer), `toeplitz` (it depends on `j - i` alone:
    `toeplitz_bias`), `decoder_only`, `row_tables` (how many of the `bias_tables` are indexed by query).
    """

    name: str = ""
    has_bias: bool = False
    content_bias: bool = False
    toeplitz: bool = False
    decoder_only: bool = False
    row_tables: int = 0

    def __init__(self, config, causal: bool):
        super().__init__()
        self.causal = causal
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_layers = config.num_hidden_layers

    @classmethod
    def validate(cls, config, causal: bool) -> None:
        """Raise `ValueError` naming the config field when the config cannot carry this encoding."""
        if cls.decoder_only and not causal:
            raise ValueError(
                f"position_embedding_type={cls.name!r} is causal by design and only available in decoders "
                "(RelPosGPTConfig, or RelPosBertConfig with is_decoder=True); choose another position_embedding_type "
                "for an encoder."
            )

    def bias_needs_grad(self) -> bool:
        """Whether this step differentiates the encoding's bias: under autograd, when the bias reads each layer's
        queries and keys (`content_bias`) or a parameter that requires a gradient. ALiBi, frozen tables and inference
        do not."""
        return torch.is_grad_enabled() and (
            self.content_bias or any(parameter.requires_grad for parameter in self.parameters())
        )

    def embed(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Add absolute position information to `inputs_embeds` `[batch, len, hidden]`."""
        return inputs_embeds

    def prepare(
        self, query_positions: torch.Tensor, key_positions: torch.Tensor, dtype: torch.dtype, dense: bool = True
    ) -> PositionState:
        """Compute what all layers share for one forward; `[q_len, k_len]` tables only if `dense` (the kernel takes
        a dense bias rather than a `score_mod`)."""
        return PositionState(query_positions, key_positions, dtype=dtype, dense=dense)

    def rotate(
        self, query: torch.Tensor, key: torch.Tensor, state: PositionState
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate `query` `[batch, heads, q_len, head_dim]` and the new `key` of the same positions."""
        return query, key

    def bias(
        self, query: torch.Tensor, key: torch.Tensor, state: PositionState, layer_idx: int
    ) -> torch.Tensor | None:
        """Dense additive score bias broadcastable to `[batch, heads, q_len, k_len]`, or None."""
        return None

    def bias_tables(
        self, query: torch.Tensor, key: torch.Tensor, state: PositionState, layer_idx: int
    ) -> tuple[torch.Tensor, ...]:
        """The small tensors the bias is read from (per-distance scores, parameters), with their autograd history:
        `[heads, n]`, `[batch, heads, len, n]` or parameters, never `[q_len, k_len]`. The first `row_tables` are
        indexed by query on dim -2."""
        return ()

    def bias_rows(
        self, tables: tuple[torch.Tensor, ...], state: PositionState, rows: slice = slice(None)
    ) -> torch.Tensor:
        """The dense bias of the queries in `rows`, `[batch or 1, heads, len(rows), k_len]`, from `bias_tables`, whose
        first `row_tables` arrive already sliced to `rows`.

        A query-blocked kernel calls it once per block, differentiating it with respect to `tables`."""
        raise NotImplementedError

    def score_mod(
        self, query: torch.Tensor, key: torch.Tensor, state: PositionState, layer_idx: int
    ) -> ScoreMod | None:
        """The bias as a flex-attention `score_mod(score, b, h, q_idx, kv_idx)`, or None."""
        return None

    def toeplitz_bias(self, state: PositionState) -> torch.Tensor:
        """For a `toeplitz` scheme and consecutive positions (`uniform_offset` `c`): the bias at every distance of the
        forward, `[heads, q_len + k_len - 1]`, entry `m` at `j - i = m - (q_len - 1) + c`; so the bias of query `i`
        and key `j` is entry `(q_len - 1 - i) + j`."""
        raise NotImplementedError

    def bind_projections(self, projections: list[tuple[nn.Module, nn.Module]]) -> None:
        """Receive each layer's `(query, key)` projection modules, for schemes that project their position
        embeddings with them (DeBERTa's `share_att_key`). Called once by the model after its layers are built."""

    def scaling(self, head_dim: int) -> float:
        """Softmax scale of the content score `q.k`."""
        return head_dim**-0.5

    def init_weights(self, config) -> None:
        """Initialise parameters as the scheme's paper does and rebuild buffers that are not saved."""


# --------------------------------------------------------------------------------------------------------------
# Absolute schemes: embed
# --------------------------------------------------------------------------------------------------------------


class AbsolutePositionEncoding(PositionEncoding):
    """Learned absolute table (Devlin et al. 2019; Radford et al. 2019): `h_i = x_i + P[i + offset]`.

    `weight` is `[max_position_embeddings, hidden]`, named as BERT's `position_embeddings.weight` and GPT-2's
    `wpe.weight`. `position_offset` is RoBERTa's `padding_idx + 1`.
    """

    name = "absolute"

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.weight = nn.Parameter(torch.empty(config.max_position_embeddings, config.hidden_size))
        self.offset = config.position_offset

    def embed(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Eager mode checks that every position is in the table (a clear error instead of an index error); a
        compiled or exported graph skips the check, which reads the positions on the host."""
        positions = position_ids + self.offset
        if torch.compiler.is_compiling():
            return inputs_embeds + nn.functional.embedding(positions, self.weight)
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError(
                f"position_ids must be >= 0 for position_embedding_type='absolute', got {int(position_ids.min())}."
            )
        last = int(positions.max()) if positions.numel() else 0
        if last >= self.weight.shape[0]:
            raise ValueError(
                f"Position {last - self.offset} is beyond the learned table of position_embedding_type='absolute' "
                f"(max_position_embeddings={self.weight.shape[0]}, position_offset={self.offset}). Truncate the "
                "input, or convert the model to a relative encoding (e.g. 'alibi', 'rope', 't5') to go longer."
            )
        return inputs_embeds + nn.functional.embedding(positions, self.weight)

    def init_weights(self, config) -> None:
        init.normal_(self.weight, mean=0.0, std=config.initializer_range)


class SinusoidalPositionEncoding(PositionEncoding):
    """Fixed sinusoids (Vaswani et al. 2017): `h_i = x_i + P[i] / sqrt(d)`, `P[i, 2m] = sin(i / 10000^(2m/d))`,
    `P[i, 2m+1] = cos(...)`. The paper's `sqrt(d) x_i + P[i]` up to a global factor: the table meets the token
    embeddings at their scale, so a pretrained (or freshly initialised) embedding table is not drowned out."""

    name = "sinusoidal"

    @classmethod
    def validate(cls, config, causal: bool) -> None:
        super().validate(config, causal)
        if config.hidden_size % 2:
            raise ValueError(
                f"position_embedding_type='sinusoidal' needs an even hidden_size, got {config.hidden_size}."
            )

    def embed(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        dim = inputs_embeds.shape[-1]
        inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=inputs_embeds.device, dtype=torch.float32) / dim)
        angles = position_ids[..., None].float() * inv_freq
        table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2) * dim**-0.5
        return inputs_embeds + table.to(inputs_embeds.dtype)


class NoPositionEncoding(PositionEncoding):
    """NoPE (Kazemnejad et al. 2023): no position information; a causal mask alone orders a decoder."""

    name = "nope"

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        if not causal:
            logger.warning_once(
                "position_embedding_type='nope' in a bidirectional encoder: the model is blind to word order "
                "(permuting the tokens permutes the outputs)."
            )


# --------------------------------------------------------------------------------------------------------------
# Rotary schemes: rotate
# --------------------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` over the last dimension (the GPT-NeoX / Llama layout of rotary pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` channels of `x` `[batch, heads, len, head_dim]`; `cos`, `sin` are
    `[batch, len, rotary_dim]`. The remaining channels pass unrotated (`partial_rotary_factor`)."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


class RotaryPositionEncoding(PositionEncoding):
    """RoPE (Su et al. 2021): `q_i <- R(i theta) q_i`, `k_j <- R(j theta) k_j`, so `q_i.k_j` depends on `j - i`.

    Frequencies come from transformers' `ROPE_INIT_FUNCTIONS` for every `rope_parameters["rope_type"]`
    (default, linear, dynamic, yarn, longrope, llama3, ...). `dynamic` and `longrope` rescale them past the original
    length as transformers' `dynamic_rope_update` does, but per call, without writing to the module: threads may
    share a model. The frequency buffers stay fp32 under `model.half()` / `.to(dtype)`, and cos/sin are computed
    in fp32 before the cast, so angles at long positions keep fp32 accuracy.
    """

    name = "rope"

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        # Beyond this length `dynamic` and `longrope` use the frequencies of the actual length (as transformers).
        self.original_max_seq_len = config.max_position_embeddings
        if self.rope_type == "longrope":
            self.original_max_seq_len = config.rope_parameters.get("original_max_position_embeddings",
                                                                   config.max_position_embeddings)
        inv_freq, self.attention_scaling = self.rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    @classmethod
    def validate(cls, config, causal: bool) -> None:
        super().validate(config, causal)
        rope_parameters = config.rope_parameters or {}
        rope_type = rope_parameters.get("rope_type", "default")
        allowed = ["default", *ROPE_INIT_FUNCTIONS]
        if rope_type not in allowed:
            raise ValueError(f"rope_parameters['rope_type']={rope_type!r} is not one of {allowed}.")
        for key in ("rope_theta", "factor"):
            value = rope_parameters.get(key)
            if value is not None and (not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"rope_parameters[{key!r}] must be > 0, got {value!r}.")
        try:
            config.validate_rope()
        except KeyError as error:
            raise ValueError(f"rope_parameters for rope_type={rope_type!r}: {error.args[0]}") from None
        head_dim = config.hidden_size // config.num_attention_heads
        factor = rope_parameters.get("partial_rotary_factor", 1.0)
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {factor}.")
        if int(head_dim * factor) % 2:
            raise ValueError(
                f"position_embedding_type={cls.name!r} rotates pairs of channels: the rotary dimension "
                f"head_dim * partial_rotary_factor = {head_dim} * {factor} must be even (hidden_size / "
                "num_attention_heads sets head_dim)."
            )

    def rope_init_fn(self, config) -> tuple[torch.Tensor, float]:
        if self.rope_type != "default":
            return ROPE_INIT_FUNCTIONS[self.rope_type](config)
        parameters = config.rope_parameters
        dim = int(self.head_dim * parameters.get("partial_rotary_factor", 1.0))
        base = parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    def _apply(self, fn, recurse=True):
        # `half()` / `to(dtype)` would round the frequencies to 16 bits (2.6 rad off at position 16384): buffers
        # follow the device only.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buffer in before.items():
            after = self._buffers.get(name)
            if buffer is not None and after is not None and after.dtype != buffer.dtype:
                self._buffers[name] = after.to(buffer.dtype) if buffer.is_meta else buffer.to(after.device)
        return self

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        """`inv_freq` `[rotary_dim / 2]` (fp32) for a call at `position_ids`: `dynamic` / `longrope` past the
        original length recompute them for the length `max(position_ids) + 1`, as `dynamic_rope_update` does,
        without storing them."""
        if "dynamic" in self.rope_type or self.rope_type == "longrope":
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.original_max_seq_len:
                return ROPE_INIT_FUNCTIONS[self.rope_type](self.config, position_ids.device, seq_len=seq_len)[0]
        return self.inv_freq

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[batch, len, rotary_dim]` at `position_ids` `[batch, len]`, computed in fp32 and cast to
        `x.dtype`."""
        inv_freq = self.frequencies(position_ids).to(device=position_ids.device, dtype=torch.float32)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    def prepare(self, query_positions, key_positions, dtype, dense=True) -> PositionState:
        cos, sin = self(torch.empty(0, dtype=dtype, device=query_positions.device), query_positions)
        return PositionState(query_positions, key_positions, {"cos": cos, "sin": sin}, dtype, dense)

    def rotate(
        self, query: torch.Tensor, key: torch.Tensor, state: PositionState
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = state.tables["cos"], state.tables["sin"]
        return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)

    def init_weights(self, config) -> None:
        inv_freq, _ = self.rope_init_fn(config)
        init.copy_(self.inv_freq, inv_freq)


class XPosEncoding(RotaryPositionEncoding):
    """xPos (Sun et al. 2022): RoPE with a decay, `q_i <- zeta^(i/B) R(i) q_i`, `k_j <- zeta^(-j/B) R(j) k_j`,
    `zeta_m = (2m/d + gamma) / (1 + gamma)`, `gamma = 0.4`, `B = xpos_scale_base`; `q.k` decays as `zeta^((i-j)/B)`.

    Causal by design. The scales are absolute (keys are scaled before they are cached, so a scale relative to a
    moving centre would not match the cached keys): computed in fp32 (fp64 for fp64 models), they grow as
    `zeta_0^(-j/B)` for keys and shrink as `zeta_0^(i/B)` for queries, so a dtype holds them to `safe_length`
    (about 4.4 B positions in fp16, 66 B in bf16 / fp32); a position beyond it raises a `ValueError`.
    """

    name = "xpos"
    decoder_only = True
    gamma = 0.4
    # Headroom for the query/key values themselves: the scales stay within [2^8 / max, max / 2^8] of the dtype.
    headroom = 2.0**8

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.scale_base = config.xpos_scale_base

    def safe_length(self, dtype: torch.dtype) -> int:
        """The largest `|position|` whose scales `zeta_0^(+-p/B)` stay within `[headroom / max, max / headroom]` of
        `dtype`."""
        room = math.log(torch.finfo(dtype).max / self.headroom)
        return int(self.scale_base * room / math.log((1 + self.gamma) / self.gamma))

    def prepare(self, query_positions, key_positions, dtype, dense=True) -> PositionState:
        safe = self.safe_length(dtype)
        if not torch.compiler.is_compiling() and query_positions.numel():
            farthest = int(query_positions.abs().max())
            if farthest > safe:
                raise ValueError(
                    f"position_embedding_type='xpos' with xpos_scale_base={self.scale_base} holds positions up to "
                    f"{safe} in {dtype} (the key scales grow as zeta^(-j/B)), got position {farthest}: use a larger "
                    f"xpos_scale_base, float32 (up to {self.safe_length(torch.float32)}), or a shorter input."
                )
        state = super().prepare(query_positions, key_positions, dtype, dense)
        compute = torch.promote_types(dtype, torch.float32)
        rotary_dim = state.tables["cos"].shape[-1]
        zeta = (torch.arange(0, rotary_dim, 2, device=query_positions.device, dtype=compute) / rotary_dim
                + self.gamma) / (1 + self.gamma)
        scale = zeta ** (query_positions[..., None].to(compute) / self.scale_base)
        state.tables["scale"] = torch.cat((scale, scale), dim=-1)
        return state

    def rotate(
        self, query: torch.Tensor, key: torch.Tensor, state: PositionState
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = state.tables["scale"]
        cos, sin = state.tables["cos"].to(scale.dtype), state.tables["sin"].to(scale.dtype)
        query = apply_rotary(query.to(scale.dtype), cos * scale, sin * scale).to(query.dtype)
        key = apply_rotary(key.to(scale.dtype), cos / scale, sin / scale).to(key.dtype)
        return query, key


# --------------------------------------------------------------------------------------------------------------
# Bias schemes that depend on positions only: one bias per forward, shared by all layers
# --------------------------------------------------------------------------------------------------------------


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's buckets of `relative_position = j - i` (Raffel et al. 2020): half the buckets exact, half logarithmic
    up to `max_distance`; a causal model buckets only `i - j >= 0`."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # The clamp keeps log() finite for distances that `is_small` selects anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + log_ratio * (num_buckets - max_exact)).long().clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class StaticBiasEncoding(PositionEncoding):
    """A bias that depends on positions only: computed once per forward and shared by every layer.

    A scheme defines `distance_bias`, its bias at each distance `j - i`; the `[q_len, k_len]` bias is a gather from
    that `[heads, 2D + 1]` table, so the scheme's own work (buckets, logs, an MLP) is linear in length.
    """

    has_bias = True
    toeplitz = True

    def distance_bias(self, distance: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The bias `[heads, n]` at the distances `j - i` in `distance` `[n]` (fp32), from `tables`."""
        raise NotImplementedError

    def prepare(self, query_positions, key_positions, dtype, dense=True) -> PositionState:
        state = PositionState(query_positions, key_positions, dtype=dtype, dense=dense)
        if dense:
            state.tables["bias"] = self.dense_bias(state)
        return state

    def bias(
        self, query: torch.Tensor, key: torch.Tensor, state: PositionState, layer_idx: int
    ) -> torch.Tensor | None:
        if "bias" in state.tables:
            return state.tables["bias"]
        # A learned bias under gradient checkpointing: each layer builds its own (see `position_state`).
        return self.dense_bias(state)

    def dense_bias(self, state: PositionState) -> torch.Tensor:
        """The bias `[batch or 1, heads, q_len, k_len]`, built in fp32 (distances of thousands of tokens) and cast
        once for the kernel. Eager mode reads a `[heads, 2D + 1]` table of the distances present, whose size `D`
        is read from the positions on the host; a compiled or exported graph evaluates every pair instead
        (`pair_bias`), so its shapes do not depend on the data."""
        if torch.compiler.is_compiling():
            return self.pair_bias(state, self.parameter_tables()).to(state.dtype)
        return self.bias_rows(self.bias_tables(None, None, state, 0), state).to(state.dtype)

    def pair_bias(self, state: PositionState, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`distance_bias` at the distance of every pair: `[batch, heads, q_len, k_len]`."""
        distance = relative_distance(state).float()
        return self.distance_bias(distance.flatten(), tables).unflatten(-1, distance.shape).transpose(0, 1)

    def parameter_tables(self) -> tuple[torch.Tensor, ...]:
        """The parameters `distance_bias` reads (passed explicitly so a blocked kernel can differentiate them)."""
        return tuple(self.parameters())

    def bias_tables(self, query, key, state, layer_idx) -> tuple[torch.Tensor, ...]:
        # Distances span [-D, D]: the table's row `D + j - i` serves the pair (i, j).
        reach = state.reach
        distance = torch.arange(-reach, reach + 1, device=state.query_positions.device, dtype=torch.float32)
        parameters = self.parameter_tables()
        return (self.distance_bias(distance, parameters), *parameters)

    def bias_rows(self, tables, state, rows=slice(None)) -> torch.Tensor:
        distance_table = tables[0]
        reach = (distance_table.shape[-1] - 1) // 2
        offset = state.uniform_offset
        if offset is None:
            return distance_table[:, relative_distance(state, rows) + reach].transpose(0, 1)
        # Consecutive positions: the bias is Toeplitz, its rows are slices of the table (no index tensor).
        first, stop, _ = rows.indices(state.query_positions.shape[1])
        key_length = state.key_positions.shape[1]
        return DiagonalRows.apply(distance_table, offset + reach - first, stop - first, key_length)[None]

    def toeplitz_bias(self, state: PositionState) -> torch.Tensor:
        query_length, offset = state.query_positions.shape[1], state.uniform_offset
        distance = torch.arange(offset - query_length + 1, offset + state.key_positions.shape[1],
                                device=state.query_positions.device, dtype=torch.float32)
        return self.distance_bias(distance, self.parameter_tables())

    def score_mod(
        self, query: torch.Tensor, key: torch.Tensor, state: PositionState, layer_idx: int
    ) -> ScoreMod | None:
        query_positions, key_positions = state.query_positions, state.key_positions
        if self.bias_needs_grad() and not torch.compiler.is_compiling():  # eager: the table's reach is read on the host
            # Flex's backward atomically adds every pair's gradient into the entry its score_mod read. Read from a
            # table per distance `[heads, 2D + 1]`, a diagonal's worth of pairs share an entry; read from the
            # parameters, every pair of a head shares a few (a GPU serialises those adds: 60x slower at 2048).
            distance_table = self.bias_tables(None, None, state, layer_idx)[0]
            reach = (distance_table.shape[-1] - 1) // 2

            def score_mod(score, b, h, q_idx, kv_idx):
                distance = key_positions[b, kv_idx] - query_positions[b, q_idx]
                return score + distance_table[h, distance + reach].to(score.dtype)

            return score_mod
        tables = self.score_tables(query.device)

        def score_mod(score, b, h, q_idx, kv_idx):
            bias = self.head_bias(query_positions[b, q_idx], key_positions[b, kv_idx], h, tables)
            return score + bias.to(score.dtype)

        return score_mod

    def score_tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Small per-head tables that `head_bias` reads inside a `score_mod`."""
        return {}

    def head_bias(
        self, query_position: torch.Tensor, key_position: torch.Tensor, head: torch.Tensor, tables: dict
    ) -> torch.Tensor:
        """The bias of one head at one (query, key) pair, elementwise over broadcastable index tensors."""
        raise NotImplementedError


class T5RelativeBias(StaticBiasEncoding):
    """T5 (Raffel et al. 2020): a learned scalar per head and bucket of `j - i`,
    `b_h(i, j) = B[bucket(j - i), h]`; bidirectional buckets in an encoder, causal buckets in a decoder."""

    name = "t5"

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.relative_attention_bias = nn.Parameter(torch.empty(self.num_buckets, self.num_heads))

    def buckets(self, query_position: torch.Tensor, key_position: torch.Tensor) -> torch.Tensor:
        return relative_position_bucket(
            key_position - query_position, not self.causal, self.num_buckets, self.max_distance
        )

    def distance_bias(self, distance, tables):
        (weight,) = tables
        return weight[relative_position_bucket(distance.long(), not self.causal, self.num_buckets,
                                               self.max_distance)].T

    def head_bias(self, query_position, key_position, head, tables):
        return self.relative_attention_bias[self.buckets(query_position, key_position), head]

    def init_weights(self, config) -> None:
        # T5 initialises the bias table with std d_model^-0.5 (its scores carry no 1/sqrt(d) factor).
        init.normal_(self.relative_attention_bias, mean=0.0, std=config.hidden_size**-0.5)


def alibi_slopes(num_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """ALiBi's head slopes (Press et al. 2022): the geometric sequence `2^(-8/n), 2^(-16/n), ...` for the largest
    power of two `n <= num_heads`, then every other slope of the sequence for `2n` heads."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = base ** torch.arange(1, closest + 1, device=device, dtype=torch.float32)
    if closest < num_heads:
        extra_base = 2.0 ** (-4.0 / closest)
        extra = extra_base ** torch.arange(1, 2 * (num_heads - closest), 2, device=device, dtype=torch.float32)
        slopes = torch.cat((slopes, extra))
    return slopes


class ALiBiEncoding(StaticBiasEncoding):
    """ALiBi (Press et al. 2022): `b_h(i, j) = -m_h |j - i|` with fixed slopes `m_h`; in a decoder only `j <= i`
    is attended, which is the paper's causal form."""

    name = "alibi"

    def distance_bias(self, distance, tables):
        return -alibi_slopes(self.num_heads, distance.device)[:, None] * distance.abs()

    def score_tables(self, device):
        return {"slopes": alibi_slopes(self.num_heads, device)}

    def head_bias(self, query_position, key_position, head, tables):
        return -tables["slopes"][head] * (key_position - query_position).abs().float()


class KerpleEncoding(StaticBiasEncoding):
    """KERPLE, logarithmic variant (Chi et al. 2022): `b_h(i, j) = -r1_h log(1 + r2_h |j - i|)`, `r1, r2 > 0`
    learned per head (kept positive by clamping at 1e-2, as the paper's code does)."""

    name = "kerple"
    eps = 1e-2

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.bias_p = nn.Parameter(torch.empty(self.num_heads))
        self.bias_a = nn.Parameter(torch.empty(self.num_heads))

    def parameter_tables(self):
        return self.bias_p, self.bias_a

    def distance_bias(self, distance, tables):
        r1, r2 = (parameter.clamp(min=self.eps)[:, None] for parameter in tables)
        return -r1 * torch.log1p(r2 * distance.abs())

    def score_tables(self, device):
        # Clamped outside the score_mod: a compiled model trains through it (the per-distance table is eager only),
        # and flex differentiates a captured tensor that the score_mod reads once; the clamp's backward would read it
        # again.
        return {"r1": self.bias_p.clamp(min=self.eps), "r2": self.bias_a.clamp(min=self.eps)}

    def head_bias(self, query_position, key_position, head, tables):
        return -tables["r1"][head] * torch.log1p(tables["r2"][head] * (key_position - query_position).abs().float())

    def init_weights(self, config) -> None:
        # The paper's code draws r1 ~ U(0, 2) and r2 ~ U(0, 1).
        init.uniform_(self.bias_p, 0.0, 2.0)
        init.uniform_(self.bias_a, 0.0, 1.0)


class FireEncoding(StaticBiasEncoding):
    """FIRE (Li et al. 2023): `b(i, j) = f(psi(|i - j|) / psi(max(L, i)))`, `psi(x) = log(c x + 1)`, `f` an MLP
    `1 -> fire_mlp_width -> heads` (ReLU); `c` and the threshold `L` are learned (init 0.1 and 512). In an
    encoder the distance is `|i - j|`."""

    name = "fire"
    toeplitz = False  # past the threshold the normaliser psi(i) depends on the query
    init_c = 0.1
    init_threshold = 512.0

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        width = config.fire_mlp_width
        self.mlp = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, self.num_heads))
        self.c = nn.Parameter(torch.empty(()))
        self.threshold = nn.Parameter(torch.empty(()))
        # Built here, not where a compiled graph is traced: whether the CPU kernel of the pieces is there.
        self.cpu_kernel = cpu_kernels() is not None

    def normalized_distance(self, query_position: torch.Tensor, key_position: torch.Tensor, c: torch.Tensor,
                            threshold: torch.Tensor) -> torch.Tensor:
        """`psi(|j - i|) / psi(max(L, i))`, elementwise; `c` and `threshold` (`L`) as learned (signs dropped)."""
        c = c.abs()
        distance = (key_position - query_position).abs().float()
        reference = torch.maximum(query_position.float(), threshold.abs())
        return torch.log1p(c * distance) / torch.log1p(c * reference)

    def parameter_tables(self):
        first, last = self.mlp[0], self.mlp[2]
        return self.c, self.threshold, first.weight, first.bias, last.weight, last.bias

    def f(self, x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The MLP `[..., 1] -> [..., heads]`, in fp32 whatever the model's dtype (its input is a ratio of logs)."""
        weight1, bias1, weight2, bias2 = (t.float() for t in tables[2:])
        return nn.functional.linear(torch.relu(nn.functional.linear(x, weight1, bias1)), weight2, bias2)

    def f_pieces(self, tables: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`f` as the piecewise-linear function it is (a ReLU MLP of a scalar): the sorted breakpoints `-b1/w1`
        `[width]`, and per piece the slope and intercept `[2 width + 1, heads]`, so that `f(x) = slope[k] x +
        intercept[k]` with `k = piece(x, breakpoints)`. The pieces are the `width + 1` open intervals between the
        breakpoints, then the breakpoints themselves, where the units that break there are off (ReLU's gradient at
        0 is 0, as autograd has it; zero-initialised biases put every breakpoint at `x = 0`, a query's own key).
        Exact in value and gradient, differentiable in the MLP's parameters (each piece's ReLU pattern is fixed),
        and one gather per pair instead of a hidden layer per pair."""
        weight1, bias1, weight2, bias2 = (t.float() for t in tables[2:])
        slope, offset = weight1[:, 0], bias1
        with torch.no_grad():
            breakpoints = torch.where(slope != 0, -offset / slope, torch.inf).sort().values
            # Sorted, the finite breakpoints come first. Past the last one the ReLU pattern no longer changes: any
            # point there represents it. (No boolean indexing: nothing is read on the host.)
            finite = breakpoints.isfinite()
            last = torch.where(finite.any(), torch.where(finite, breakpoints, -torch.inf).max() + 1, 1.0)
            first = torch.where(finite.any(), breakpoints[0] - 1, 0.0)
            edges = torch.cat((first[None], torch.where(finite, breakpoints, last), last[None] + 1))
            active = (slope * ((edges[:-1] + edges[1:]) / 2)[:, None] + offset) > 0
            # On a breakpoint, the units active on both sides of it: a unit that breaks there is off on one.
            active = torch.cat((active, active[:-1] & active[1:]))
        slopes = (active * slope) @ weight2.T
        intercepts = (active * offset) @ weight2.T + bias2
        return breakpoints, slopes, intercepts

    @staticmethod
    def piece(x: torch.Tensor, breakpoints: torch.Tensor) -> torch.Tensor:
        """The piece of `f_pieces` that holds each `x`: the interval below the first breakpoint `>= x`, or that
        breakpoint's own piece when `x` is on it."""
        below = torch.searchsorted(breakpoints, x)
        on_breakpoint = breakpoints[below.clamp(max=breakpoints.shape[0] - 1)] == x
        return torch.where(on_breakpoint, below + breakpoints.shape[0] + 1, below)

    @staticmethod
    def piece_by_comparisons(x: torch.Tensor, breakpoints: torch.Tensor) -> torch.Tensor:
        """`piece`, unrolled over the breakpoints: the number below `x`, and whether `x` is on one. Elementwise, so a
        compiled graph fuses it into its pass over the pairs (`searchsorted` stays an ATen call of its own) and a
        `score_mod` can run it."""
        width = breakpoints.shape[0]
        below, on_breakpoint = (breakpoints[0] < x).int(), breakpoints[0] == x
        for unit in range(1, width):
            below, on_breakpoint = below + (breakpoints[unit] < x).int(), on_breakpoint | (breakpoints[unit] == x)
        return torch.where(on_breakpoint, below + width + 1, below)

    def distance_bias(self, distance, tables):
        # Queries before the threshold share the normaliser psi(L): their bias is a function of the distance alone.
        c, threshold = tables[0].abs(), tables[1].abs()
        return self.f((torch.log1p(c * distance.abs()) / torch.log1p(c * threshold))[:, None], tables).T

    def f_by_pieces(self, x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`f` at `x` `[batch, q_len, k_len]` by its pieces: `[batch, heads, q_len, k_len]`."""
        breakpoints, slopes, intercepts = self.f_pieces(tables)
        if x.device.type == "cpu" and self.cpu_kernel:
            # The C kernel, eager or compiled (an opaque operator): 76 ms forward and backward at 2048 tokens, against
            # 171 ms for the compiled form below (`benchmarks/compiled_bias.py`) and 420 ms for the eager gathers.
            return piecewise_linear(x.float(), breakpoints.float(), slopes.float(), intercepts.float())
        if torch.compiler.is_compiling():
            # Read straight into `[batch, heads]` order: the backward of a transposed result would first copy its
            # incoming gradient into that layout (36 ms of FIRE's 280 at 2048 tokens).
            piece = self.piece_by_comparisons(x.detach(), breakpoints)[:, None]
            heads = torch.arange(slopes.shape[1], device=x.device)[:, None, None]
            return slopes[piece, heads] * x[:, None] + intercepts[piece, heads]
        # Eager: `gather`, whose backward (a scatter-add) is faster than that of indexing (an `index_put`), and one
        # `addcmul` pass: 420 ms against 663 forward and backward at 2048 tokens (774 indexing in the graph's order).
        index = self.piece(x.detach(), breakpoints).reshape(1, -1).expand(slopes.shape[1], -1)
        bias = torch.addcmul(intercepts.T.gather(1, index), slopes.T.gather(1, index), x.reshape(1, -1))
        return bias.view(-1, *x.shape).transpose(0, 1)

    def pair_bias(self, state, tables):
        # Each query's own normaliser psi(max(L, i)), without the eager table's split at the threshold.
        x = self.normalized_distance(state.query_positions[:, :, None], state.key_positions[:, None, :], *tables[:2])
        if x.is_cuda:
            # The MLP's hidden layer per pair: its backward is matmuls, where the gradient of a gather from the
            # pieces' table would be atomic adds of every pair into a few entries, serialised on a GPU.
            return self.f(x[..., None], tables).permute(0, 3, 1, 2)
        # On a CPU the pieces: `[batch, q_len, k_len, width]` hidden units made a compiled step about 3x slower.
        return self.f_by_pieces(x, tables)

    def bias_rows(self, tables, state, rows=slice(None)):
        parameters = tables[1:]
        query_positions = state.query_positions[:, rows]
        if not (query_positions.float() >= parameters[1].abs()).any():
            return super().bias_rows(tables[:1], state, rows)
        # Past the threshold each query has its own normaliser psi(i): f at every pair of these rows (exact for the
        # rows before it too, whose max(L, i) is L).
        key_positions = state.key_positions
        if state.same_rows:
            query_positions, key_positions = query_positions[:1], key_positions[:1]
        x = self.normalized_distance(query_positions[:, :, None], key_positions[:, None, :], *parameters[:2])
        if x.is_cuda and state.dense and any(parameter.requires_grad for parameter in parameters):
            # Per pair on a GPU, as in `pair_bias`.
            return self.f(x[..., None], parameters).permute(0, 3, 1, 2)
        return self.f_by_pieces(x, parameters)

    def score_mod(self, query, key, state, layer_idx):
        if torch.compiler.is_compiling():
            # Traced into a compiled graph, which reads nothing on the host: `f` unrolled over its hidden units.
            return super().score_mod(query, key, state, layer_idx)
        query_positions, key_positions = state.query_positions, state.key_positions
        if query.is_cuda and self.bias_needs_grad():
            # Past the threshold the bias depends on the query as well as the distance, so no per-distance table
            # spreads flex's atomic gradient adds (a dense bias read per pair measured slower still: 398x).
            logger.warning_once(
                "position_embedding_type='fire' trains slowly on attn_implementation='flex_attention' on a GPU "
                "(169x BertModel at 2048 tokens on an H200, against 2.6x on 'sdpa'): flex's backward adds every "
                "pair's gradient into FIRE's few MLP pieces. Train FIRE with 'sdpa'."
            )
        # `f` by its pieces, and each table that needs a gradient read once per pair (what flex differentiates).
        c = self.c.abs().reshape(1)
        normaliser = torch.log1p(c * torch.maximum(query_positions.float(), self.threshold.abs()))
        breakpoints, slopes, intercepts = self.f_pieces(self.parameter_tables())

        def score_mod(score, b, h, q_idx, kv_idx):
            distance = (key_positions[b, kv_idx] - query_positions[b, q_idx]).abs().float()
            x = torch.log1p(c[0] * distance) / normaliser[b, q_idx]
            piece = self.piece_by_comparisons(x, breakpoints)
            return score + (slopes[piece, h] * x + intercepts[piece, h]).to(score.dtype)

        return score_mod

    def head_bias(self, query_position, key_position, head, tables):
        # `f` unrolled over its hidden units: a score_mod sees one (query, key, head) at a time.
        x = self.normalized_distance(query_position, key_position, self.c, self.threshold)
        first, last = self.mlp[0], self.mlp[2]
        out = last.bias.float()[head]
        for unit in range(first.out_features):
            hidden = torch.relu(x * first.weight[unit, 0].float() + first.bias[unit].float())
            out = out + hidden * last.weight.float()[head, unit]
        return out

    def init_weights(self, config) -> None:
        init.constant_(self.c, self.init_c)
        init.constant_(self.threshold, self.init_threshold)


# --------------------------------------------------------------------------------------------------------------
# Bias schemes that interact with content: per layer, from queries/keys and a small table of distances
# --------------------------------------------------------------------------------------------------------------


def clipped_bias(
    state: PositionState, rows: slice, reach: int, query_table: torch.Tensor | None,
    reversed_key_table: torch.Tensor | None,
) -> torch.Tensor:
    """`query_table[b, h, i, clip(j - i, reach) + reach] + key_table[b, h, j, clip(j - i, reach) + reach]` for the
    queries in `rows` and consecutive positions in a compiled graph (`known_offset`: no host read), by `ClippedRows`:
    both terms read along clipped diagonals, keys as rows for the key term, and their backward sums without a
    scatter-add. Tables `[batch, heads, len, 2 reach + 1]`, the key table with its entries reversed (it then rises
    along a key's row); a None table adds nothing."""
    first, stop, _ = rows.indices(state.query_positions.shape[1])
    offset, bias = state.uniform_offset, 0
    if query_table is not None:
        bias = ClippedRows.apply(query_table, offset + reach - first, state.key_positions.shape[1])
    if reversed_key_table is not None:
        keys = ClippedRows.apply(reversed_key_table, reach - offset + first, stop - first)
        bias = bias + keys.transpose(-1, -2)
    return bias


def gather_relative(scores: torch.Tensor, index: torch.Tensor, falls: bool | None = None) -> torch.Tensor:
    """`out[b, h, i, j] = scores[b, h, i, index[b, i, j]]`: `scores` `[batch, heads, q_len, table]`,
    `index` `[batch, q_len, k_len]`. With `falls` (whether `index` falls along a row; it must be monotone), by
    `RunGather`."""
    if falls is not None:
        return RunGather.apply(scores, index, falls)
    batch, heads = scores.shape[:2]
    index = index[:, None].expand(max(batch, index.shape[0]), heads, *index.shape[1:])
    return scores.expand(index.shape[0], -1, -1, -1).gather(-1, index)


def gather_relative_keys(scores: torch.Tensor, index: torch.Tensor, falls: bool | None = None) -> torch.Tensor:
    """`out[b, h, i, j] = scores[b, h, j, index[b, i, j]]`: `scores` `[batch, heads, k_len, table]`,
    `index` `[batch, q_len, k_len]`. With `falls` (whether `index` falls down a column; it must be monotone), by
    `RunGather`."""
    if falls is not None:
        return RunGather.apply(scores, index.transpose(-1, -2), falls).transpose(-1, -2)
    batch, heads = scores.shape[:2]
    index = index[:, None].expand(max(batch, index.shape[0]), heads, *index.shape[1:])
    return scores.transpose(-1, -2).expand(index.shape[0], -1, -1, -1).gather(-2, index)


class RelativeKeyEncoding(PositionEncoding):
    """Shaw et al. 2018 / Huang et al. 2020 (method 3): `b(i, j) = q_i . r_clip(j - i, k) / sqrt(d)` with a learned
    `r` of `2k + 1` rows of `head_dim` per layer, `k = max_relative_positions`."""

    name = "relative_key"
    has_bias = True
    content_bias = True
    row_tables = 1
    uses_keys = False

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.max_distance = config.max_relative_positions
        self.distance_embedding = nn.ModuleList(
            nn.Embedding(2 * self.max_distance + 1, self.head_dim) for _ in range(self.num_layers)
        )

    def prepare(self, query_positions, key_positions, dtype, dense=True) -> PositionState:
        state = PositionState(query_positions, key_positions, dtype=dtype, dense=dense)
        if dense:
            state.tables["index"] = self.relative_index(state)
        return state

    def distance_scores(self, query: torch.Tensor, key: torch.Tensor, layer_idx: int):
        """`q . r` `[batch, heads, q_len, 2k+1]` and (method 4) `k . r` `[batch, heads, k_len, 2k+1]`, scaled."""
        table = self.distance_embedding[layer_idx].weight.to(query.dtype)
        scale = self.scaling(query.shape[-1])
        query_scores = torch.matmul(query, table.T) * scale
        key_scores = torch.matmul(key, table.T) * scale if self.uses_keys else None
        return query_scores, key_scores

    def relative_index(self, state: PositionState, rows: slice = slice(None)) -> torch.Tensor:
        """Rows of the table, `clip(j - i, k) + k`, for the queries in `rows`: `[batch, len(rows), k_len]`."""
        if "index" in state.tables:
            return state.tables["index"][:, rows]
        k = self.max_distance
        return relative_distance(state, rows).clamp(-k, k) + k

    def bias_tables(self, query, key, state, layer_idx):
        query_scores, key_scores = self.distance_scores(query, key, layer_idx)
        return (query_scores,) if key_scores is None else (query_scores, key_scores)

    def bias_rows(self, tables, state, rows=slice(None)):
        reader = dense_reader(state, tables)
        k = self.max_distance
        if reader == "diagonals":
            return diagonal_bias(state, self.name, lambda distance: distance.clamp(-k, k) + k, tables[0],
                                 tables[1] if self.uses_keys else None)
        if reads_clipped(state):
            return clipped_bias(state, rows, k, tables[0], tables[1].flip(-1) if self.uses_keys else None)
        # A dense bias gathers by the index `prepare` built once; a block of consecutive positions reads its
        # `q . r` rows along clipped diagonals (no index tensor; its padded copy is only a block's worth).
        offset = None if state.dense else state.uniform_offset
        index = self.relative_index(state, rows) if offset is None or self.uses_keys else None
        # `clip(j - i)` rises along a row (keys) and falls down a column (queries).
        runs = reader == "runs"
        if offset is None:
            bias = gather_relative(tables[0], index, False if runs else None)
        else:
            first, _, _ = rows.indices(state.query_positions.shape[1])
            bias = SkewedRows.apply(tables[0], offset + k - first, state.key_positions.shape[1])
        if self.uses_keys:
            bias = bias + gather_relative_keys(tables[1], index, True if runs else None)
        return bias

    def bias(self, query, key, state, layer_idx):
        table = self.distance_embedding[layer_idx].weight
        if self.uses_keys and query.shape[2] * query.shape[-1] <= table.shape[0]:
            # Few queries (a decode step): the rows of the pairs present, O(q_len k_len d), not every cached key
            # against every row, O(k_len (2k + 1) d). `q_i . r + k_j . r = (q_i + k_j) . r`: one in-place product of
            # the rows with the keys shifted by each query, no gather of a `q . r` table, no per-key matmul.
            index = self.relative_index(state)
            if pair_dot_applies(query, key, table):
                # Generation on a CPU: each pair's key and row read once, in C.
                return pair_dot(query, key, table[None], table[None], index, self.scaling(query.shape[-1]))
            rows = table.to(query.dtype).index_select(0, index.reshape(-1)).view(*index.shape, -1)
            rows = rows.mul_(self.scaling(query.shape[-1]))[:, None]
            return (key[:, :, None] + query[:, :, :, None]).mul_(rows).sum(-1)
        return self.bias_rows(self.bias_tables(query, key, state, layer_idx), state)

    def score_mod(self, query, key, state, layer_idx):
        query_scores, key_scores = self.distance_scores(query, key, layer_idx)
        query_positions, key_positions, k = state.query_positions, state.key_positions, self.max_distance

        def score_mod(score, b, h, q_idx, kv_idx):
            index = (key_positions[b, kv_idx] - query_positions[b, q_idx]).clamp(-k, k) + k
            out = score + query_scores[b, h, q_idx, index]
            if key_scores is not None:
                out = out + key_scores[b, h, kv_idx, index]
            return out

        return score_mod


class RelativeKeyQueryEncoding(RelativeKeyEncoding):
    """Huang et al. 2020 (method 4): `b(i, j) = (q_i . r_clip(j-i) + k_j . r_clip(j-i)) / sqrt(d)`."""

    name = "relative_key_query"
    uses_keys = True


def log_bucket_ratio(bucket_size: int, max_position: int) -> float:
    """`log((max_position - 1) / (bucket_size // 2))` as `DebertaV2Model` computes it: the fp32 log of a CPU scalar.
    An fp64 log rounds differently where the ratio of logs is an integer, and reads another bucket there."""
    return float(torch.tensor((max_position - 1) / (bucket_size // 2), device="cpu").log())


def make_log_bucket_position(
    relative_pos: torch.Tensor, bucket_size: int, max_position: int, log_ratio: float | None = None
) -> torch.Tensor:
    """DeBERTa's log buckets (He et al. 2021): distances below `bucket_size / 2` exact, then logarithmic up to
    `max_position`; odd in `relative_pos`. `log_ratio` is `log_bucket_ratio(bucket_size, max_position)`, computed
    once by callers that run under torch.compile (a flex `score_mod`)."""
    if log_ratio is None:
        log_ratio = log_bucket_ratio(bucket_size, max_position)
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = torch.where((relative_pos < mid) & (relative_pos > -mid), torch.full_like(relative_pos, mid - 1),
                          relative_pos.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / log_ratio * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_pos, (log_pos * sign).long())


def attention_terms(pos_att_type: str | list[str]) -> list[str]:
    """DeBERTa's `pos_att_type` (`"p2c|c2p"` or `["p2c", "c2p"]`) as a list of lower-case terms."""
    if isinstance(pos_att_type, str):
        pos_att_type = pos_att_type.split("|")
    return [term.strip().lower() for term in pos_att_type]


def layer_norms_relative_embeddings(norm_rel_ebd: str) -> bool:
    """Whether DeBERTa's `norm_rel_ebd` (`"layer_norm"`, `"none"`, or both joined by `|`) layer-norms `r`."""
    return "layer_norm" in [part.strip() for part in norm_rel_ebd.lower().split("|")]


class DisentangledEncoding(PositionEncoding):
    """DeBERTa's disentangled attention (He et al. 2021): `A_ij = (q_i.k_j + q_i.Kr_d + k_j.Qr_d) / sqrt(3 d)`,
    `d = bucket(i - j)` (log buckets), with shared relative embeddings `r` and per-layer position projections
    `Kr = W_k,l r`, `Qr = W_q,l r`.

    DeBERTa's options, named as `DebertaV2Config` names them: `pos_att_type` picks the terms (`c2p`: `q_i.Kr_d`,
    `p2c`: `k_j.Qr_d`; the scale is `1 / sqrt((1 + terms) d)`); `share_att_key` projects `r` with the layer's own
    query and key projections (DeBERTa-v3) instead of `pos_query_proj` / `pos_key_proj`; `norm_rel_ebd="layer_norm"`
    layer-norms `r` first (the default here, `"none"` in DeBERTa-v2).
    """

    name = "deberta"
    has_bias = True
    content_bias = True
    row_tables = 1

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.position_buckets = config.position_buckets
        self.max_relative_positions = config.max_relative_positions
        self.span = self.position_buckets if self.position_buckets > 0 else self.max_relative_positions
        # A causal model reads only the rows of keys `j <= i`, `span + bucket(i - j)`: the upper half of the table
        # (later keys are masked, and read its first row).
        self.first_row = self.span if causal else 0
        self.log_ratio = (
            log_bucket_ratio(self.position_buckets, self.max_relative_positions) if self.position_buckets > 0 else None
        )
        self.terms = attention_terms(config.pos_att_type)
        self.row_tables = int("c2p" in self.terms)
        # The window of distances that a compiled step reads (`clipped_bias`), where it is at most about twice the
        # table: not for few buckets over a long `max_relative_positions`, whose log buckets saturate far out.
        reach = self.saturating_distance()
        self.reach = reach if reach <= 2 * self.span else None
        self.share_att_key = config.share_att_key
        hidden = config.hidden_size
        self.rel_embeddings = nn.Embedding(2 * self.span, hidden)
        self.LayerNorm = (
            nn.LayerNorm(hidden, eps=config.layer_norm_eps) if layer_norms_relative_embeddings(config.norm_rel_ebd)
            else None
        )
        if not self.share_att_key:
            if "c2p" in self.terms:
                self.pos_key_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(self.num_layers))
            if "p2c" in self.terms:
                self.pos_query_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(self.num_layers))
        # share_att_key: each layer's (query, key) projections, bound by the model; a plain tuple, so the modules stay
        # registered (and saved) where the model keeps them.
        self.shared_projections: tuple[tuple[nn.Module, nn.Module], ...] = ()
        self._projections: dict[int, tuple] = {}
        self._window_rows: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def validate(cls, config, causal: bool) -> None:
        super().validate(config, causal)
        if config.position_buckets > 0 and config.max_relative_positions - 1 <= config.position_buckets // 2:
            raise ValueError(
                f"position_embedding_type='deberta' needs max_relative_positions - 1 > position_buckets / 2 for its "
                f"log buckets, got max_relative_positions={config.max_relative_positions}, "
                f"position_buckets={config.position_buckets}."
            )
        if not isinstance(config.pos_att_type, (str, list, tuple)) or not isinstance(config.norm_rel_ebd, str):
            raise ValueError(
                f"pos_att_type must be a string or a list and norm_rel_ebd a string, got pos_att_type="
                f"{config.pos_att_type!r}, norm_rel_ebd={config.norm_rel_ebd!r}."
            )
        if not isinstance(config.share_att_key, bool):
            raise ValueError(f"share_att_key must be True or False, got {config.share_att_key!r}.")
        terms = attention_terms(config.pos_att_type)
        if not terms or not set(terms) <= {"c2p", "p2c"} or len(set(terms)) != len(terms):
            raise ValueError(
                f"pos_att_type must name 'c2p', 'p2c' or both (a list, or joined by '|'), got {config.pos_att_type!r}."
            )
        parts = {part.strip() for part in config.norm_rel_ebd.lower().split("|")}
        if not parts <= {"layer_norm", "none"}:
            raise ValueError(f"norm_rel_ebd must be 'layer_norm' or 'none', got {config.norm_rel_ebd!r}.")
        if config.share_att_key and causal:
            raise ValueError(
                "share_att_key=True projects DeBERTa's relative embeddings with the layer's separate query and key "
                "projections, which only the encoder (RelPosBertConfig) has; set share_att_key=False."
            )

    def bind_projections(self, projections: list[tuple[nn.Module, nn.Module]]) -> None:
        if self.share_att_key:
            self.shared_projections = tuple(projections)

    def scaling(self, head_dim: int) -> float:
        return ((1 + len(self.terms)) * head_dim) ** -0.5

    def prepare(self, query_positions, key_positions, dtype, dense=True) -> PositionState:
        state = PositionState(query_positions, key_positions, dtype=dtype, dense=dense)
        if dense:
            state.tables["index"] = self.relative_index(state)
        return state

    def distance_index(self, query_position: torch.Tensor, key_position: torch.Tensor) -> torch.Tensor:
        """Rows of the projected tables, `bucket(i - j) + span` clamped to the relative table, counted from its
        `first_row`, elementwise."""
        relative = query_position - key_position
        if self.position_buckets > 0:
            relative = make_log_bucket_position(relative, self.position_buckets, self.max_relative_positions,
                                                self.log_ratio)
        return (relative + self.span).clamp(self.first_row, 2 * self.span - 1) - self.first_row

    def saturating_distance(self) -> int:
        """The least `reach` past which the row of a distance no longer changes: `distance_index(0, t)` is the same
        for every `t >= reach`, and for every `t <= -reach`. The row is monotone in `t` and bounded by the table:
        each side brackets the reach between powers of two, then narrows it 64 ways at a time."""
        reach = 1
        for sign in (1, -1):
            powers = 2 ** torch.arange(63, device="cpu")
            last = self.distance_index(0, sign * powers[-1])
            at = int(powers[self.distance_index(0, sign * powers) == last][0])
            below = at // 2 if at > 1 else 0  # not saturated, or 0
            while at - below > 1:
                points = torch.arange(below + 1, at, max(1, (at - below) // 64), device="cpu")
                hits = self.distance_index(0, sign * points) == last
                below = int(points[~hits][-1]) if not hits.all() else below
                at = int(points[hits][0]) if hits.any() else at
            reach = max(reach, at)
        return reach

    def window_rows(self, device: torch.device) -> torch.Tensor:
        """`distance_index(0, t)` for `t = j - i` in `[-reach, reach]`: the projected rows of a window of distances
        that `clipped_bias` reads, `[2 reach + 1]`. It depends on the config alone: kept per device outside a
        compiled graph (where it is a constant of the graph)."""
        kept = None if torch.compiler.is_compiling() else self._window_rows.get(device)
        if kept is None:
            distances = torch.arange(-self.reach, self.reach + 1, device=device)
            kept = self.distance_index(torch.zeros_like(distances), distances)
            if not torch.compiler.is_compiling():
                self._window_rows[device] = kept
        return kept

    def relative_index(self, state: PositionState, rows: slice = slice(None)) -> torch.Tensor:
        """`distance_index` of the queries in `rows` and every key, `[batch, len(rows), k_len]`. It depends on
        `i - j` alone: each distinct distance is bucketed once, then every pair looks its row up (in the kept
        `window_rows` where there is one: no log per forward, nothing read on the host)."""
        if "index" in state.tables:
            return state.tables["index"][:, rows]
        if self.reach is not None:
            reach = self.reach
            return self.window_rows(state.query_positions.device)[
                relative_distance(state, rows).clamp(-reach, reach) + reach
            ]
        if torch.compiler.is_compiling():
            # The eager lookup table's size is read from the positions on the host: a graph buckets every pair.
            return self.distance_index(state.query_positions[:, rows, None], state.key_positions[:, None, :])
        relative = state.query_positions[:, rows, None] - state.key_positions[:, None, :]
        reach = int(relative.abs().max())
        distances = torch.arange(-reach, reach + 1, device=relative.device)
        return self.distance_index(distances, torch.zeros_like(distances))[relative + reach]

    def projection_modules(self, layer_idx: int) -> tuple[nn.Module | None, nn.Module | None]:
        """The modules that project `r` into `Kr` (for `c2p`) and `Qr` (for `p2c`) in one layer, or None."""
        if self.share_att_key:
            if not self.shared_projections:
                raise RuntimeError(
                    "share_att_key=True: the model must pass each layer's query and key projections to "
                    "bind_projections before the first forward."
                )
            query_proj, key_proj = self.shared_projections[layer_idx]
        else:
            query_proj = self.pos_query_proj[layer_idx] if "p2c" in self.terms else None
            key_proj = self.pos_key_proj[layer_idx] if "c2p" in self.terms else None
        return (key_proj if "c2p" in self.terms else None), (query_proj if "p2c" in self.terms else None)

    def position_projections(
        self, layer_idx: int, dtype: torch.dtype, continues_cache: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`Kr` and `Qr` of one layer, `[heads, rows, head_dim]` each and contiguous (None for a term not in
        `pos_att_type`), of the relative table's rows from `first_row` (`rows = 2 span - first_row`). Head-major like
        the keys, so a decode step copies each head's rows for its cached keys in one contiguous pass.

        They depend on parameters only, so without autograd (inference, generation) they are kept while the
        parameters they come from hold the same values: a decode step would otherwise project the whole table in
        every layer (3.5x slower decoding at hidden 768, 256 buckets). The values are compared with a copy kept with
        them, because an in-place write through `.data` changes neither a parameter's `_version` nor its `data_ptr`.
        A step that `continues_cache` (its keys extend a KV cache) takes the kept ones without comparing: the cache
        was built with the weights that its first step checked, and comparing every step cost a third of a decode
        step at GPT-2 small's widths (11 ms of 12 layers' parameters). A compiled graph computes them.
        """
        keep = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        kept = self._projections.get(layer_idx) if keep else None
        fresh = kept is not None and kept[0] == dtype
        if fresh and continues_cache:
            return kept[2]
        modules = self.projection_modules(layer_idx)
        norm = () if self.LayerNorm is None else tuple(self.LayerNorm.parameters())
        parameters = [self.rel_embeddings.weight, *norm,
                      *(p for module in modules if module is not None for p in module.parameters())]
        if fresh and all(map(same_values, kept[1], parameters)):
            return kept[2]
        relative = self.rel_embeddings.weight[self.first_row:]
        relative = (relative if self.LayerNorm is None else self.LayerNorm(relative)).to(dtype)
        heads = (2 * self.span - self.first_row, self.num_heads, self.head_dim)
        projections = tuple(None if module is None else module(relative).view(heads).transpose(0, 1).contiguous()
                            for module in modules)
        if keep:
            self._projections[layer_idx] = (dtype, [p.detach().clone() for p in parameters], projections)
        return projections

    def distance_scores(
        self, query: torch.Tensor, key: torch.Tensor, layer_idx: int, window: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """The tables of the terms in `pos_att_type`, scaled: `q . Kr` `[batch, heads, q_len, rows]` (c2p) and
        `k . Qr` `[batch, heads, k_len, rows]` (p2c). With `window`, over the rows of `window_rows` instead (the
        p2c table's in reverse), what `clipped_bias` reads: `[batch, heads, len, 2 reach + 1]`."""
        pos_key, pos_query = self.position_projections(layer_idx, query.dtype)
        if window:
            rows = self.window_rows(query.device)
            pos_key = None if pos_key is None else pos_key[:, rows]
            pos_query = None if pos_query is None else pos_query[:, rows.flip(0)]
        scale = self.scaling(query.shape[-1])
        tables = ()
        if pos_key is not None:
            tables += (torch.matmul(query, pos_key.transpose(-1, -2)) * scale,)
        if pos_query is not None:
            tables += (torch.matmul(key, pos_query.transpose(-1, -2)) * scale,)
        return tables

    def bias_tables(self, query, key, state, layer_idx):
        # A window of distances (twice the table at the defaults) costs a larger `q . Kr`, but its backward is the
        # gradient of a small gather of `Kr`'s rows, where the bucket index of every pair scatter-adds each one.
        return self.distance_scores(query, key, layer_idx, window=self.reads_window(state))

    def reads_window(self, state: PositionState) -> bool:
        """Whether this step reads the window of `distance_scores(window=True)` by `clipped_bias`."""
        return self.reach is not None and reads_clipped(state)

    def bias_rows(self, tables, state, rows=slice(None)):
        if self.reads_window(state):
            return clipped_bias(state, rows, self.reach, tables[0] if "c2p" in self.terms else None,
                                tables[-1] if "p2c" in self.terms else None)
        reader = dense_reader(state, tables)
        tables = iter(tables)
        query_table = next(tables) if "c2p" in self.terms else None
        key_table = next(tables) if "p2c" in self.terms else None
        if reader == "diagonals":
            return diagonal_bias(state, self.name, lambda distance: self.distance_index(0, distance), query_table,
                                 key_table)
        index = self.relative_index(state, rows)
        # `bucket(i - j)` falls along a row (keys) and rises down a column (queries).
        runs = reader == "runs"
        bias = 0 if query_table is None else gather_relative(query_table, index, True if runs else None)
        if key_table is not None:
            bias = bias + gather_relative_keys(key_table, index, False if runs else None)
        return bias

    def bias(self, query, key, state, layer_idx):
        if query.shape[2] * query.shape[-1] <= 2 * self.span - self.first_row:
            # Few queries (a decode step): `k_j . Qr_d` for the pairs present, O(q_len k_len d), instead of every
            # cached key against every row of the table, O(k_len rows d).
            pos_key, pos_query = self.position_projections(layer_idx, query.dtype, key.shape[2] > query.shape[2])
            scale, index = self.scaling(query.shape[-1]), state.tables["index"]
            if pair_dot_applies(query, key, pos_key, pos_query):
                # Generation on a CPU: each pair's key and rows read once, in C: 98 µs per layer and step against 182
                # at GPT-2 small's widths (`benchmarks/decode_bias.py`).
                return pair_dot(None if pos_key is None else query, None if pos_query is None else key, pos_key,
                                pos_query, index, scale)
            bias = 0
            if pos_query is not None:
                # Each head's rows of the pairs present, `[batch, heads, q_len, k_len, d]`, multiplied in place by
                # their keys: no product is allocated beside the copy (a fresh 0.4 MB per layer at GPT-2 small).
                index = index.expand(key.shape[0], -1, -1)
                rows = pos_query.index_select(1, index.reshape(-1)).view(pos_query.shape[0], *index.shape, -1)
                bias = rows.transpose(0, 1).mul_(key[:, :, None]).sum(-1)
            if pos_key is not None:
                bias = bias + gather_relative(torch.matmul(query, pos_key.transpose(-1, -2)), index)
            return bias * scale
        return self.bias_rows(self.bias_tables(query, key, state, layer_idx), state)

    def score_mod(self, query, key, state, layer_idx):
        tables = self.distance_scores(query, key, layer_idx)
        c2p = tables[0] if "c2p" in self.terms else None
        p2c = tables[-1] if "p2c" in self.terms else None
        query_positions, key_positions = state.query_positions, state.key_positions

        def score_mod(score, b, h, q_idx, kv_idx):
            d = self.distance_index(query_positions[b, q_idx], key_positions[b, kv_idx])
            if c2p is not None:
                score = score + c2p[b, h, q_idx, d]
            if p2c is not None:
                score = score + p2c[b, h, kv_idx, d]
            return score

        return score_mod


def same_values(kept: torch.Tensor, parameter: torch.Tensor) -> bool:
    """Whether `parameter` still holds exactly the values of the copy `kept` (same shape, dtype and device)."""
    return (kept.shape == parameter.shape and kept.dtype == parameter.dtype and kept.device == parameter.device
            and torch.equal(kept, parameter))


POSITION_ENCODINGS: dict[str, type[PositionEncoding]] = {
    cls.name: cls
    for cls in (
        AbsolutePositionEncoding,
        SinusoidalPositionEncoding,
        RelativeKeyEncoding,
        RelativeKeyQueryEncoding,
        T5RelativeBias,
        ALiBiEncoding,
        KerpleEncoding,
        FireEncoding,
        DisentangledEncoding,
        RotaryPositionEncoding,
        XPosEncoding,
        NoPositionEncoding,
    )
}


def get_encoding_class(position_embedding_type: str) -> type[PositionEncoding]:
    """The registered class of `position_embedding_type`, or a `ValueError` listing the allowed names."""
    if not isinstance(position_embedding_type, str) or position_embedding_type not in POSITION_ENCODINGS:
        raise ValueError(
            f"position_embedding_type={position_embedding_type!r} is not supported; choose one of "
            f"{sorted(POSITION_ENCODINGS)}."
        )
    return POSITION_ENCODINGS[position_embedding_type]


# The most memory an encoding's parameters and buffers may take (a typo like max_relative_positions=10**9 would
# otherwise allocate, and initialise, tens of GiB).
MAX_ENCODING_BYTES = 4 * 2**30


def build_position_encoding(config, causal: bool) -> PositionEncoding:
    """Validate `config` for its `position_embedding_type` and build the encoding, first on the meta device to
    refuse one larger than `MAX_ENCODING_BYTES`."""
    cls = get_encoding_class(config.position_embedding_type)
    cls.validate(config, causal)
    with torch.device("meta"):
        probe = cls(config, causal)
    size = sum(tensor.numel() * tensor.element_size() for tensor in (*probe.parameters(), *probe.buffers()))
    if size > MAX_ENCODING_BYTES:
        fields = ("max_position_embeddings", "max_relative_positions", "position_buckets",
                  "relative_attention_num_buckets", "fire_mlp_width", "hidden_size", "num_hidden_layers")
        values = ", ".join(f"{name}={getattr(config, name)}" for name in fields)
        raise ValueError(
            f"position_embedding_type={cls.name!r} would take {size / 2**30:.1f} GiB of position parameters, more "
            f"than the {MAX_ENCODING_BYTES // 2**30} GiB allowed: reduce its table sizes ({values})."
        )
    return cls(config, causal)
