"""The autograd kernels the encodings and the attention dispatch call: `QueryBlockedAttention` (attention with a
differentiable score bias, block by block of queries), the custom operator `toeplitz_attention` (torch's fused kernel
over a bias's diagonals, a blocked backward, opaque to a compiled graph), the bias row readers `DiagonalRows`,
`SkewedRows`, `ClippedRows` (its compiled form) and `DistanceRows`, `RunGather` (a gather from a distance table
whose backward needs no scatter-add), the custom operators `flushed_attention` (torch's fused CPU kernel over a fixed
bias with denormal floats flushed) and `flushed_dropout_attention` (the same with dropout, by sdpa's math path),
and two C kernels built at first use: the custom operator `piecewise_linear` (FIRE's pieces per pair on a CPU) and
`pair_dot` (the decode bias of the content encodings).

Custom `torch.autograd.Function`s that save memory and time over autograd's own graph, kept apart so that
`encodings.py` stays the catalog of schemes and `attention.py` the dispatch.
"""

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)


# The namespace of this file's operators, one per version of it: the installed package and a checkpoint's remote
# code (another copy, maybe of another release) can share a process, and torch lets the last definition of an
# operator name replace the others.
OPERATORS = f"hf_relpos_{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]}"

# Probabilities below this (~1e-19) are zeroed by the blocked kernel (see `block_probabilities`).
DENORMAL_GUARD = torch.finfo(torch.float32).tiny ** 0.5


class QueryBlockedAttention(torch.autograd.Function):
    """`softmax(q k^T * scaling + bias + mask) v` over blocks of queries, for a bias that needs a gradient.

    Each block reads its rows of the bias from the encoding's small tables (`bias_rows`), so no
    `[batch, heads, q_len, k_len]` bias, score or gradient is ever held whole: forward keeps one block's scores at a
    time, backward recomputes them and reduces the score gradient `dS = P * (dP - rowsum(dO * O))` into the tables
    block by block (Milakov & Gimelshein 2018; Dao et al. 2022, with full rows instead of an online softmax).
    The first `row_tables` tables are indexed by query on dim -2: `bias_rows` gets the block's slice of them, and
    their gradient is written into that slice. When all queries fit in one block the probabilities are kept for
    backward instead (no larger than a block). Dropout masks are regenerated in backward from one seed per call.
    """

    @staticmethod
    def forward(ctx, query, key, value, mask, bias_rows, row_tables, scaling, dropout, causal, block_size, *tables):
        seed = int(torch.randint(2**62, ())) if dropout > 0.0 else 0
        scaled_query, output = query * scaling, torch.empty_like(query)
        blocks = query_blocks(query.shape[2], block_size)
        for rows in blocks:
            bias = bias_rows(block_tables(tables, row_tables, rows), rows)
            probabilities = block_probabilities(scaled_query, key, mask, bias, causal, rows)
            output[:, :, rows] = torch.matmul(block_dropout(probabilities, dropout, seed, rows), value)
        kept = probabilities if len(blocks) == 1 else None
        ctx.save_for_backward(query, key, value, mask, output, kept, *tables)
        ctx.options = bias_rows, row_tables, scaling, dropout, causal, block_size, seed
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, mask, output, kept, *tables = ctx.saved_tensors
        bias_rows, row_tables, scaling, dropout, causal, block_size, seed = ctx.options
        scaled_query = query * scaling
        grads = torch.empty_like(query), torch.zeros_like(key), torch.zeros_like(value)
        needs_grad = ctx.needs_input_grad[10:]
        grad_tables = [torch.zeros_like(table) if needs else None
                       for table, needs in zip(tables, needs_grad, strict=True)]
        correction = softmax_correction(grad_output, output)
        for rows in query_blocks(query.shape[2], block_size):
            leaves = [table.detach().requires_grad_(needs)
                      for table, needs in zip(block_tables(tables, row_tables, rows), needs_grad, strict=True)]
            with torch.enable_grad():
                bias = bias_rows(leaves, rows)
            if kept is None:
                probabilities = block_probabilities(scaled_query, key, mask, bias.detach(), causal, rows)
            else:
                probabilities = kept
            grad_scores = block_backward(grad_output, scaled_query, key, value, probabilities, correction, rows,
                                         scaling, grads, dropout, seed)
            if any(needs_grad):
                wanted = [index for index, leaf in enumerate(leaves) if leaf.requires_grad]
                table_grads = torch.autograd.grad(bias, [leaves[index] for index in wanted],
                                                  grad_scores.sum_to_size(bias.shape), allow_unused=True)
                for index, grad in zip(wanted, table_grads, strict=True):
                    if grad is not None:
                        total = grad_tables[index][..., rows, :] if index < row_tables else grad_tables[index]
                        total += grad
        return *grads, None, None, None, None, None, None, None, *grad_tables


def block_tables(tables, row_tables: int, rows: slice) -> list[torch.Tensor]:
    """`tables` with the first `row_tables` (indexed by query on dim -2) sliced to the block's `rows`."""
    return [table[..., rows, :] if index < row_tables else table for index, table in enumerate(tables)]


def query_blocks(length: int, block_size: int) -> list[slice]:
    """Slices of `block_size` consecutive queries covering `length`."""
    return [slice(start, min(start + block_size, length)) for start in range(0, length, block_size)]


def softmax_correction(grad_output: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """`rowsum(dO * O) = rowsum(dP * P)` `[batch, heads, q_len, 1]`: the softmax backward's term, one per query."""
    return (grad_output * output).sum(-1, keepdim=True)


def block_backward(
    grad_output: torch.Tensor, scaled_query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    probabilities: torch.Tensor, correction: torch.Tensor, rows: slice, scaling: float,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dropout: float = 0.0, seed: int = 0,
) -> torch.Tensor:
    """One block of queries' share of attention's backward: writes `dQ[rows]` and adds into `dK`, `dV` (`grads`,
    in that order) and returns the block's score gradient `dS = P * (dP - correction)` `[batch, heads, len(rows),
    k_len]`, which is also the gradient of its bias."""
    grad_query, grad_key, grad_value = grads
    block_grad_output = grad_output[:, :, rows]
    grad_value += torch.matmul(block_dropout(probabilities, dropout, seed, rows).transpose(-1, -2), block_grad_output)
    grad_scores = block_dropout(torch.matmul(block_grad_output, value.transpose(-1, -2)), dropout, seed, rows)
    grad_scores.sub_(correction[:, :, rows]).mul_(probabilities)
    grad_query[:, :, rows] = torch.matmul(grad_scores, key).mul_(scaling)
    grad_key += torch.matmul(grad_scores.transpose(-1, -2), scaled_query[:, :, rows])
    return grad_scores


def block_probabilities(
    scaled_query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor, causal: bool,
    rows: slice,
) -> torch.Tensor:
    """Softmax probabilities `[batch, heads, len(rows), k_len]` of the queries in `rows`, softmax in fp32 or wider:
    `bias` is the block's, `mask` (bool or additive, or None) and `causal` apply to all queries."""
    scores = torch.matmul(scaled_query[:, :, rows], key.transpose(-1, -2))
    scores += bias.to(scores.dtype)
    if mask is not None:
        block_mask = mask[..., rows, :] if mask.shape[-2] > 1 else mask
        if block_mask.dtype == torch.bool:
            scores.masked_fill_(~block_mask, torch.finfo(scores.dtype).min)
        else:
            scores += block_mask
    elif causal:
        scores.masked_fill_(later_keys(rows, scaled_query.shape[2], key.shape[2], key.device),
                            torch.finfo(scores.dtype).min)
    probabilities = nn.functional.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    # Probabilities below ~1e-19 are zeroed: far keys under a steep bias (ALiBi) otherwise leave denormal floats,
    # which make every matmul that reads them (P v, P^T dO, dS k, dS^T q) several times slower on x86 CPUs.
    nn.functional.threshold_(probabilities, DENORMAL_GUARD, 0.0)
    return probabilities.to(scaled_query.dtype)


def later_keys(rows: slice, query_length: int, key_length: int, device: torch.device) -> torch.Tensor:
    """`[len(rows), k_len]`, True where key `j` comes after query `i` (the queries are the last `q_len` of the
    keys, cached keys first): what a causal mask hides from the queries in `rows`."""
    queries = torch.arange(rows.start, rows.stop, device=device)[:, None] + (key_length - query_length)
    return torch.arange(key_length, device=device) > queries


def block_dropout(probabilities: torch.Tensor, dropout: float, seed: int, rows: slice) -> torch.Tensor:
    """Dropout whose mask is a function of `(seed, rows)`, so backward regenerates the mask forward used."""
    if dropout == 0.0:
        return probabilities
    generator = torch.Generator(device=probabilities.device).manual_seed(seed + rows.start)
    keep = torch.rand(probabilities.shape, generator=generator, device=probabilities.device) >= dropout
    return probabilities * keep / (1.0 - dropout)


def diagonal_rows(table: torch.Tensor, start: int, rows: int, cols: int) -> torch.Tensor:
    """`out[h, r, j] = table[h, start - r + j]` `[heads, rows, cols]`: rows of the Toeplitz matrix whose diagonals
    are `table` `[heads, n]`, copied without an index tensor."""
    windows = table.unfold(-1, cols, 1)
    first = start - rows + 1
    # Row r is window start - r. Reversing a contiguous copy is fast; by chunks, that copy stays small. (Flipping the
    # strided view itself is faster alone, but leaves a column-major result that slows every later op.)
    if rows <= 256:
        return windows[:, first : start + 1].contiguous().flip(1)
    out = table.new_empty(table.shape[0], rows, cols)
    for chunk in range(0, rows, 256):
        stop = min(rows, chunk + 256)
        out[:, chunk:stop] = windows[:, start - stop + 1 : start - chunk + 1].contiguous().flip(1)
    return out


def diagonal_sums(grad: torch.Tensor, start: int, entries: int) -> torch.Tensor:
    """The gradient `[heads, entries]` of `diagonal_rows(table, start, rows, cols)` for its gradient `grad`
    `[heads, rows, cols]`: each diagonal of `grad` summed into its entry, through a strided view."""
    heads, rows, cols = grad.shape
    width, first = rows + cols - 1, start - rows + 1
    # Row r of the gradient lands at columns (rows - 1 - r) .. of its own row of `shifted`: columns are then the
    # table index minus `first`, and a sum over rows adds each diagonal.
    shifted = grad.new_empty(heads, rows, width)
    # Row r's data covers columns rows-1-r .. rows-2-r+cols: zero only the two bands it may leave uncovered.
    shifted[..., : rows - 1].zero_()
    shifted[..., cols:].zero_()
    shifted.as_strided((heads, rows, cols), (rows * width, width - 1, 1), rows - 1).copy_(grad)
    grad_table = grad.new_zeros(heads, entries)
    grad_table[:, first : first + width] = shifted.sum(1)
    return grad_table


class DiagonalRows(torch.autograd.Function):
    """`diagonal_rows` with its gradient `diagonal_sums`: both directions are copies and a sum."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, start: int, rows: int, cols: int) -> torch.Tensor:
        ctx.start, ctx.entries = start, table.shape[-1]
        return diagonal_rows(table, start, rows, cols)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return diagonal_sums(grad, ctx.start, ctx.entries), None, None, None


def toeplitz_mask(diagonals: torch.Tensor, query_length: int, key_length: int) -> torch.Tensor:
    """The view `mask[0, h, i, j] = diagonals[h, i + j]` `[1, heads, q_len, k_len]` of `diagonals` `[heads, q_len +
    k_len - 1]` (strides (1, 1)): the Toeplitz bias of the queries in reverse order, never materialised."""
    diagonals = diagonals.contiguous()
    return diagonals.as_strided((1, diagonals.shape[0], query_length, key_length), (0, diagonals.stride(0), 1, 1))


@torch.library.custom_op(f"{OPERATORS}::toeplitz_attention", mutates_args=())
def toeplitz_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, diagonals: torch.Tensor, scaling: float,
    block_size: int, dropout: float = 0.0, seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`softmax(q k^T * scaling + B) v` `[batch, heads, q_len, d]` for the Toeplitz bias `B[h, i, j] = diagonals[h,
    (q_len - 1 - i) + j]` (`diagonals` `[heads, q_len + k_len - 1]`, a causal mask folded in), differentiable in
    all four inputs.

    Forward is torch's fused kernel over the reversed queries, reading the bias as a strided view of the diagonals
    (with `dropout`: `block_size` queries at a time, the dropout masks drawn from `seed`, a scalar tensor).
    Backward (`toeplitz_attention_backward`) recomputes blocks of queries and sums each block's score gradient along
    its diagonals into the diagonals' gradient. An opaque operator: a compiled graph calls both kernels as they are,
    where inductor would otherwise decompose a differentiable bias into `[q_len, k_len]` math.
    """
    query_length, key_length = query.shape[2], key.shape[2]
    if dropout == 0.0:
        # Detached: torch's fused kernel declines a mask that asks for a gradient (this operator gives it one).
        mask = toeplitz_mask(diagonals.detach(), query_length, key_length)
        output = nn.functional.scaled_dot_product_attention(query.flip(2), key, value, attn_mask=mask, scale=scaling)
        return output.transpose(1, 2).flip(1).contiguous().transpose(1, 2)
    scaled_query, output = query * scaling, toeplitz_attention_shape(query, key, value)
    for rows in query_blocks(query_length, block_size):
        bias = diagonal_rows(diagonals, query_length - 1 - rows.start, rows.stop - rows.start, key_length)
        probabilities = block_probabilities(scaled_query, key, None, bias, False, rows)
        output[:, :, rows] = torch.matmul(block_dropout(probabilities, dropout, int(seed), rows), value)
    return output


@toeplitz_attention.register_fake
def toeplitz_attention_shape(query, key, value, *args) -> torch.Tensor:
    """The output `[batch, heads, q_len, d]`, laid out as `[batch, q_len, heads, d]` (what the models read)."""
    batch, heads, length, _ = query.shape
    return query.new_empty(batch, length, heads, value.shape[-1]).transpose(1, 2)


@torch.library.custom_op(f"{OPERATORS}::toeplitz_attention_backward", mutates_args=())
def toeplitz_attention_backward(
    grad_output: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, diagonals: torch.Tensor,
    output: torch.Tensor, scaling: float, block_size: int, dropout: float, seed: torch.Tensor | None,
    diagonals_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `toeplitz_attention` in its query, key, value and diagonals (zeros unless
    `diagonals_grad`), by blocks of queries (`QueryBlockedAttention`'s backward with the bias rows of the
    diagonals). The diagonals' gradient is summed in fp32."""
    query_length, key_length = query.shape[2], key.shape[2]
    scaled_query, correction = query * scaling, softmax_correction(grad_output, output)
    seed = int(seed) if dropout > 0.0 else 0
    grads = torch.empty_like(query), torch.zeros_like(key), torch.zeros_like(value)
    grad_diagonals = torch.zeros(diagonals.shape, dtype=torch.promote_types(diagonals.dtype, torch.float32),
                                 device=diagonals.device)
    for rows in query_blocks(query_length, block_size):
        start = query_length - 1 - rows.start
        bias = diagonal_rows(diagonals, start, rows.stop - rows.start, key_length)
        probabilities = block_probabilities(scaled_query, key, None, bias, False, rows)
        grad_scores = block_backward(grad_output, scaled_query, key, value, probabilities, correction, rows, scaling,
                                     grads, dropout, seed)
        if diagonals_grad:
            grad_diagonals += diagonal_sums(grad_scores.sum(0, dtype=grad_diagonals.dtype), start,
                                            diagonals.shape[-1])
    return *grads, grad_diagonals.to(diagonals.dtype)


@toeplitz_attention_backward.register_fake
def toeplitz_attention_backward_shapes(grad_output, query, key, value, diagonals, *args):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), torch.empty_like(diagonals)


def toeplitz_attention_context(ctx, inputs, output) -> None:
    query, key, value, diagonals, scaling, block_size, dropout, seed = inputs
    ctx.save_for_backward(query, key, value, diagonals, output, seed)
    ctx.scaling, ctx.block_size, ctx.dropout = scaling, block_size, dropout


def toeplitz_attention_gradients(ctx, grad_output):
    query, key, value, diagonals, output, seed = ctx.saved_tensors
    grads = toeplitz_attention_backward(
        grad_output.contiguous(), query, key, value, diagonals, output, ctx.scaling, ctx.block_size, ctx.dropout,
        seed, ctx.needs_input_grad[3],
    )
    return *grads, None, None, None, None


toeplitz_attention.register_autograd(toeplitz_attention_gradients, setup_context=toeplitz_attention_context)


def denormals_flushed() -> bool:
    """Whether the CPU flushes denormal floats to zero (`torch.set_flush_denormal`, which has no getter): a denormal
    constant then reads back as zero."""
    return torch.full((), 1e-40).item() == 0.0


@contextlib.contextmanager
def flushed_denormals() -> Iterator[None]:
    """Denormal floats flushed to zero on the CPU inside the block, the caller's mode restored after it."""
    was_flushed = denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_flushed)


def fused_mask(mask: torch.Tensor, query_length: int, key_length: int) -> torch.Tensor:
    """The float mask torch's fused kernel reads from `flushed_attention`'s `mask`: the Toeplitz view of diagonals
    `[heads, q_len + k_len - 1]` (`toeplitz_mask`), or a dense `[batch or 1, heads or 1, q_len or 1, k_len]` mask
    as it is."""
    return toeplitz_mask(mask, query_length, key_length) if mask.dim() == 2 else mask


@torch.library.custom_op(f"{OPERATORS}::flushed_attention", mutates_args=(), device_types="cpu")
def flushed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fused CPU attention with a fixed float `mask`, forward and backward with denormal floats flushed to
    zero, the caller's mode restored after each: the output `[batch, heads, q_len, d]` and the log-sum-exp its
    backward reads. `mask` is the diagonals `[heads, q_len + k_len - 1]` of a Toeplitz bias (`toeplitz_mask`: queries
    in reverse order) or a dense mask `[batch or 1, heads or 1, q_len or 1, k_len]` (a bias with padding folded in).
    Opaque, so a compiled graph flushes too.

    A bias that falls far below its row's maximum (ALiBi's distant keys) leaves probabilities between fp32's smallest
    denormal and its smallest normal number (1e-45 to 1e-38), which some CPUs compute at a small fraction of their
    speed: ALiBi's training step at 2048 tokens took 3.5x `BertModel`'s on an AVX-512 Xeon, 1.04x flushed. Only
    values below 1.2e-38 change, to zero. No gradient for the mask: a bias that trains takes `toeplitz_attention` or
    `QueryBlockedAttention`."""
    mask = fused_mask(mask, query.shape[2], key.shape[2])
    with flushed_denormals():
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value,
                                                                                       attn_mask=mask, scale=scaling)
    # Contiguous whatever the inputs' layout, as the fake kernel says (the fused kernel's follows its query's).
    return output.contiguous(), logsumexp.contiguous()


@flushed_attention.register_fake
def flushed_attention_shapes(query, key, value, mask, scaling):
    batch, heads, length, _ = query.shape
    return query.new_empty(batch, heads, length, value.shape[-1]), query.new_empty(batch, heads, length,
                                                                                   dtype=torch.float32)


@torch.library.custom_op(f"{OPERATORS}::flushed_attention_backward", mutates_args=(), device_types="cpu")
def flushed_attention_backward(
    grad_output: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
    output: torch.Tensor, logsumexp: torch.Tensor, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `flushed_attention` in its query, key and value, by torch's fused backward, flushed."""
    mask = fused_mask(mask, query.shape[2], key.shape[2])
    with flushed_denormals():
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_output.contiguous(), query, key, value, output, logsumexp, 0.0, False, attn_mask=mask, scale=scaling
        )
    return tuple(grad.contiguous() for grad in grads)


@flushed_attention_backward.register_fake
def flushed_attention_backward_shapes(grad_output, query, key, value, *args):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def flushed_attention_context(ctx, inputs, output) -> None:
    query, key, value, mask, scaling = inputs
    ctx.save_for_backward(query, key, value, mask, *output)
    ctx.scaling = scaling


def flushed_attention_gradients(ctx, grad_output, grad_logsumexp):
    query, key, value, mask, output, logsumexp = ctx.saved_tensors
    grads = flushed_attention_backward(grad_output, query, key, value, mask, output, logsumexp, ctx.scaling)
    return *grads, None, None


flushed_attention.register_autograd(flushed_attention_gradients, setup_context=flushed_attention_context)


@torch.library.custom_op(f"{OPERATORS}::flushed_dropout_attention", mutates_args=(), device_types="cpu")
def flushed_dropout_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float, dropout: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`flushed_attention` with attention dropout, which torch's fused CPU kernel lacks: the math sdpa falls back
    to (`[q_len, k_len]` scores), forward and backward with denormal floats flushed. Returns the output `[batch,
    heads, q_len, d]` and, for backward, what sdpa's math path keeps too: the probabilities, the dropped weights and
    the dropout mask `[batch, heads, q_len, k_len]` (0 where dropped, else `1 / (1 - dropout)`), which is drawn from
    torch's generator."""
    mask = fused_mask(mask, query.shape[2], key.shape[2])
    with flushed_denormals():
        scores = torch.matmul(query * scaling, key.transpose(-1, -2)).add_(mask)
        probabilities = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        # As `nn.functional.dropout` draws it on a CPU: one fused pass fewer than `native_dropout`'s boolean mask.
        kept = torch.empty_like(probabilities).bernoulli_(1.0 - dropout).div_(1.0 - dropout)
        weights = probabilities * kept
        output = torch.matmul(weights, value)
    return output, probabilities, weights, kept


@flushed_dropout_attention.register_fake
def flushed_dropout_attention_shapes(query, key, value, mask, scaling, dropout):
    batch, heads, length, _ = query.shape
    weights = query.new_empty(batch, heads, length, key.shape[2])
    return query.new_empty(batch, heads, length, value.shape[-1]), weights, torch.empty_like(weights), torch.empty_like(
        weights)


@torch.library.custom_op(f"{OPERATORS}::flushed_dropout_attention_backward", mutates_args=(), device_types="cpu")
def flushed_dropout_attention_backward(
    grad_output: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    probabilities: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `flushed_dropout_attention` in its query, key and value, by the passes of autograd's math
    path, flushed."""
    with flushed_denormals():
        grad_value = torch.matmul(weights.transpose(-1, -2), grad_output)
        grad_weights = torch.matmul(grad_output, value.transpose(-1, -2)).mul_(kept)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_weights, probabilities, -1, probabilities.dtype)
        grad_query = torch.matmul(grad_scores, key).mul_(scaling)
        grad_key = torch.matmul(grad_scores.transpose(-1, -2), query).mul_(scaling)
    return grad_query, grad_key, grad_value


@flushed_dropout_attention_backward.register_fake
def flushed_dropout_attention_backward_shapes(grad_output, query, key, value, *args):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def flushed_dropout_attention_context(ctx, inputs, output) -> None:
    query, key, value, mask, scaling, dropout = inputs
    ctx.save_for_backward(query, key, value, *output[1:])
    # Only the output has a gradient: no `[q_len, k_len]` zeros for the others.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.scaling = scaling


def flushed_dropout_attention_gradients(ctx, grad_output, *unused):
    query, key, value, probabilities, weights, kept = ctx.saved_tensors
    grads = flushed_dropout_attention_backward(grad_output.contiguous(), query, key, value, probabilities, weights,
                                               kept, ctx.scaling)
    return *grads, None, None, None


flushed_dropout_attention.register_autograd(flushed_dropout_attention_gradients,
                                            setup_context=flushed_dropout_attention_context)


class SkewedRows(torch.autograd.Function):
    """`out[..., r, c] = table[..., r, clamp(start + c - r, 0, n - 1)]`: each row of `table` `[..., rows, n]` read
    along its diagonal over `cols` columns and clipped at both ends (Shaw et al. 2018's `clip(j - i, k)`). A padded
    copy and a strided copy instead of an index tensor and a gather; backward adds each row's clipped ends into its
    first and last entries."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, start: int, cols: int) -> torch.Tensor:
        *lead, rows, n = table.shape
        left = max(0, rows - 1 - start)
        right = max(0, start + cols - n)
        padded = table.new_empty(*lead, rows, left + n + right)
        padded[..., :left] = table[..., :1]
        padded[..., left : left + n] = table
        padded[..., left + n :] = table[..., -1:]
        # Row r, column c sits at padded column `first - r + c`.
        first = left + start
        ctx.geometry = n, left, first, padded.shape[-1]
        return skewed(padded, first, cols).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n, left, first, width = ctx.geometry
        *lead, rows, cols = grad.shape
        spread = grad.new_empty(*lead, rows, width)
        # Row r's data covers columns first - r .. first - r + cols - 1: zero only what it may leave uncovered.
        spread[..., : first].zero_()
        spread[..., first - rows + 1 + cols :].zero_()
        skewed(spread, first, cols).copy_(grad)
        grad_table = spread[..., left : left + n].clone()
        grad_table[..., 0] += spread[..., :left].sum(-1)
        grad_table[..., -1] += spread[..., left + n :].sum(-1)
        return grad_table, None, None


class ClippedRows(torch.autograd.Function):
    """`SkewedRows`' map, `out[..., r, c] = table[..., r, clamp(start + c - r, 0, n - 1)]`, for a compiled graph:
    forward gathers by an index computed from iotas, which inductor fuses into the reader. Backward reads too: entry
    `e` strictly inside the clip gets the gradient at column `c = e - start + r`, each end the sum of its row's
    clipped run (`n >= 2`). A gather's own backward scatter-adds every pair into its entry (inductor's atomic adds,
    twice as slow at 2048 tokens); `SkewedRows`' padded copies are slower still once compiled."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, start: int, cols: int) -> torch.Tensor:
        ctx.start, ctx.entries = start, table.shape[-1]
        offsets = clipped_offsets(table.shape[-2], cols, start, table.device)
        return table.gather(-1, offsets.clamp(0, ctx.entries - 1).expand(*table.shape[:-1], cols))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        *lead, rows, cols = grad.shape
        offsets = clipped_offsets(rows, cols, ctx.start, grad.device)
        n = ctx.entries
        columns = torch.arange(n, device=grad.device) - ctx.start + torch.arange(rows, device=grad.device)[:, None]
        inside = (columns >= 0) & (columns < cols)
        grad_table = grad.gather(-1, columns.clamp(0, cols - 1).expand(*lead, rows, n)) * inside
        grad_table[..., 0] = (grad * (offsets <= 0)).sum(-1)
        grad_table[..., -1] = (grad * (offsets >= n - 1)).sum(-1)
        return grad_table, None, None


def clipped_offsets(rows: int, cols: int, start: int, device: torch.device) -> torch.Tensor:
    """`start + c - r` `[rows, cols]`: the unclipped table entry of row `r`, column `c` (`ClippedRows`)."""
    return start + torch.arange(cols, device=device) - torch.arange(rows, device=device)[:, None]


class DistanceRows(torch.autograd.Function):
    """`out[..., r, c] = table[..., r, columns[rows - 1 + c - r]]`: each row of `table` `[..., rows, n]` read along
    the diagonals of a `[rows, cols]` matrix through `columns` `[rows + cols - 1]`, a monotone map from diagonals
    (bottom-left first) to table entries: Shaw et al.'s `clip(j - i, k)`, DeBERTa's log buckets. `runs` are the
    lengths of the constant runs at both ends of `columns` (host ints, `head + tail <= rows + cols - 1`).

    Forward is a column gather and a strided copy. Backward copies the gradient back along the diagonals and adds
    each diagonal into its entry: one sum per end run (the clipped distances, thousands of them at long lengths) and
    `index_add_` over the rest. A gather's backward would scatter-add every pair into its entry, which a GPU
    serialises when thousands of pairs share one (an atomic add each). Nothing is read on the host.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, columns: torch.Tensor, runs: tuple[int, int], cols: int) -> torch.Tensor:
        ctx.save_for_backward(columns)
        ctx.entries, ctx.runs = table.shape[-1], runs
        return skewed(table.index_select(-1, columns), table.shape[-2] - 1, cols).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (columns,) = ctx.saved_tensors
        (head, tail), width = ctx.runs, columns.shape[0]
        *lead, rows, cols = grad.shape
        spread = grad.new_empty(*lead, rows, width)
        # Row r's data covers columns rows-1-r .. rows-2-r+cols: zero only the two bands it may leave uncovered.
        spread[..., : rows - 1].zero_()
        spread[..., cols:].zero_()
        skewed(spread, rows - 1, cols).copy_(grad)
        grad_table = grad.new_zeros(*lead, rows, ctx.entries)
        grad_table.index_add_(-1, columns[head : width - tail], spread[..., head : width - tail])
        for run, entry in ((slice(0, head), columns[:1]), (slice(width - tail, width), columns[width - 1 :])):
            if run.start < run.stop:
                grad_table.index_add_(-1, entry, spread[..., run].sum(-1, keepdim=True))
        return grad_table, None, None, None


class RunGather(torch.autograd.Function):
    """`out[b, h, i, j] = table[b, h, i, index[b, i, j]]`, `table` `[batch, heads, rows, n]`, for an `index`
    `[batch, rows, cols]` monotone along each row (rising, or falling with `falls`): how a distance table is read
    with ordered positions, padding included.

    Backward sums each row's runs of equal entries: differences of the gradient's cumulative sum (in float64, so
    that a difference of two long prefixes keeps fp32's precision) at the run ends, which `searchsorted` finds. A
    gather's backward would scatter-add every pair into its entry, which a GPU serialises when thousands of pairs
    share one (an atomic add each).
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, falls: bool) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.table_shape, ctx.falls = table.shape, falls
        batch = max(table.shape[0], index.shape[0])
        expanded = index[:, None].expand(batch, table.shape[1], *index.shape[1:])
        return table.expand(batch, -1, -1, -1).gather(-1, expanded)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        if ctx.falls:
            index, grad = index.flip(-1), grad.flip(-1)
        entries = ctx.table_shape[-1]
        prefix = grad.new_zeros(*grad.shape[:-1], grad.shape[-1] + 1, dtype=torch.float64)
        torch.cumsum(grad, -1, dtype=torch.float64, out=prefix[..., 1:])
        targets = torch.arange(entries, device=index.device).expand(*index.shape[:-1], entries)
        # Per row, how many pairs read an entry <= t: the end of entry t's run.
        ends = torch.searchsorted(index.contiguous(), targets.contiguous(), right=True)
        at_ends = prefix.gather(-1, ends[:, None].expand(prefix.shape[0], prefix.shape[1], -1, -1))
        grad_table = at_ends.diff(dim=-1, prepend=at_ends.new_zeros(*at_ends.shape[:-1], 1))
        return grad_table.to(grad.dtype).sum_to_size(ctx.table_shape), None, None


def skewed(padded: torch.Tensor, first: int, cols: int) -> torch.Tensor:
    """The view `out[..., r, c] = padded[..., r, first - r + c]` of a contiguous `padded` `[..., rows, width]`."""
    *lead, rows, width = padded.shape
    return padded.as_strided((*lead, rows, cols), (*padded.stride()[:-2], width - 1, 1),
                             padded.storage_offset() + first)


# Two kernels in C, built at first use with the system's C compiler (`$CC`, else `cc`) into `$HF_RELPOS_CACHE`
# (default `~/.cache/hf_relpos`):
# - FIRE's pieces (`piecewise_linear`). A compiled graph cannot do better than gather each pair's slope and intercept
#   lane by lane and scatter-add their gradients one scalar at a time (section 1b of PERFORMANCE.md); this kernel
#   counts each pair's breakpoints with vector comparisons. FIRE's x is monotone along a query's keys on either side
#   of it, so most runs of 16 neighbouring pairs share one piece: such a run reads its piece's entries once and adds
#   its gradients as one vector; a run across a breakpoint goes pair by pair, each into its own lane of the sums.
# - The decode bias of the content encodings (`pair_dot`): each cached key and the query against the row of their
#   pair, read once, where torch copies the rows, multiplies and sums in three passes over them.
CPU_KERNELS_SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define TILE 256
#define LANES 16

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define KERNEL __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KERNEL
#endif

/* The piece of each x[j]: the number of breakpoints below it, or width + 1 + that number when it is on one; and
   whether each run of LANES pairs from the tile's start shares one piece (a full run only). */
static inline void pieces(const float *x, int64_t n, const float *breakpoints, int64_t width, int32_t *piece,
                          int32_t *uniform) {
    int32_t below[TILE];
    for (int64_t j = 0; j < n; j++) below[j] = 0;
    for (int64_t u = 0; u < width; u++) {
        const float t = breakpoints[u];
        for (int64_t j = 0; j < n; j++) below[j] += (t < x[j]) ? 1 : 0;
    }
    for (int64_t j = 0; j < n; j++) {
        const int32_t k = below[j];
        piece[j] = (k < width && breakpoints[k] == x[j]) ? k + (int32_t)width + 1 : k;
    }
    for (int64_t run = 0; run * LANES < n; run++) {
        int32_t same = (run + 1) * LANES <= n;
        for (int64_t t = 0; same && t < LANES; t++) same = piece[run * LANES + t] == piece[run * LANES];
        uniform[run] = same;
    }
}

/* out[b, h, i, :] = slope[h, p] x[b, i, :] + intercept[h, p] for the rows (b, i) in [begin, end);
   tables [2, heads, count]: the slopes, then the intercepts. A run of one piece reads its entries once. */
KERNEL void piecewise_linear_forward(const float *x, const float *breakpoints, int64_t width, const float *tables,
                                     int64_t count, int64_t heads, int64_t queries, int64_t keys, int64_t begin,
                                     int64_t end, float *out) {
    int32_t piece[TILE], uniform[TILE / LANES];
    const int64_t plane = queries * keys;
    for (int64_t row = begin; row < end; row++) {
        const int64_t b = row / queries, i = row % queries;
        for (int64_t start = 0; start < keys; start += TILE) {
            const int64_t n = keys - start < TILE ? keys - start : TILE;
            const float *xs = x + row * keys + start;
            float *o = out + (b * heads * queries + i) * keys + start;
            pieces(xs, n, breakpoints, width, piece, uniform);
            for (int64_t h = 0; h < heads; h++) {
                const float *slope = tables + h * count, *intercept = tables + (heads + h) * count;
                float *oh = o + h * plane;
                for (int64_t j = 0; j < n; j += LANES) {
                    const int64_t m = n - j < LANES ? n - j : LANES;
                    if (uniform[j / LANES]) {
                        const float s = slope[piece[j]], c = intercept[piece[j]];
                        for (int64_t t = 0; t < LANES; t++) oh[j + t] = c + s * xs[j + t];
                    } else {
                        for (int64_t t = 0; t < m; t++)
                            oh[j + t] = intercept[piece[j + t]] + slope[piece[j + t]] * xs[j + t];
                    }
                }
            }
        }
    }
}

/* The floats of scratch that piecewise_linear_backward needs: [2, heads, count, LANES] partial sums, and a flag per
   piece (as a float) for the pieces a row touched. */
int64_t piecewise_linear_scratch(int64_t heads, int64_t count) { return 2 * heads * count * LANES + count; }

/* The forward's gradients for the rows in [begin, end): grad_x[b, i, j] = sum_h grad[b, h, i, j] slope[h, p], and
   into sums [2, heads, count] (float64) the sums of grad x and of grad per head and piece (tables: the slopes,
   [heads, count]), scratch holding piecewise_linear_scratch(heads, count) zeroed floats. Pair j of a run adds into
   lane j % LANES of its piece's partial sums: a run of one piece is a vector addition, and pairs of a run never
   wait on each other's additions. Each row's partial sums go into sums in float64. */
KERNEL void piecewise_linear_backward(const float *grad, const float *x, const float *breakpoints, int64_t width,
                                      const float *tables, int64_t count, int64_t heads, int64_t queries,
                                      int64_t keys, int64_t begin, int64_t end, float *grad_x, double *sums,
                                      float *scratch) {
    int32_t piece[TILE], uniform[TILE / LANES];
    const int64_t plane = queries * keys, half = heads * count;
    float *touched = scratch + 2 * half * LANES;
    for (int64_t row = begin; row < end; row++) {
        const int64_t b = row / queries, i = row % queries;
        for (int64_t start = 0; start < keys; start += TILE) {
            const int64_t n = keys - start < TILE ? keys - start : TILE;
            const float *xs = x + row * keys + start;
            const float *g = grad + (b * heads * queries + i) * keys + start;
            float *gx = grad_x + row * keys + start;
            pieces(xs, n, breakpoints, width, piece, uniform);
            memset(gx, 0, sizeof(float) * n);
            for (int64_t j = 0; j < n; j += LANES) {
                const int64_t m = uniform[j / LANES] ? 1 : (n - j < LANES ? n - j : LANES);
                for (int64_t t = 0; t < m; t++) touched[piece[j + t]] = 1.0f;
            }
            for (int64_t h = 0; h < heads; h++) {
                const float *slope = tables + h * count, *gh = g + h * plane;
                float *by_x = scratch + h * count * LANES, *plain = scratch + (half + h * count) * LANES;
                for (int64_t j = 0; j < n; j += LANES) {
                    const int64_t m = n - j < LANES ? n - j : LANES;
                    if (uniform[j / LANES]) {
                        const float s = slope[piece[j]];
                        float *bx = by_x + piece[j] * LANES, *pl = plain + piece[j] * LANES;
                        for (int64_t t = 0; t < LANES; t++) {
                            gx[j + t] += gh[j + t] * s;
                            bx[t] += gh[j + t] * xs[j + t];
                            pl[t] += gh[j + t];
                        }
                    } else {
                        for (int64_t t = 0; t < m; t++) {
                            const int64_t p = piece[j + t];
                            gx[j + t] += gh[j + t] * slope[p];
                            by_x[p * LANES + t] += gh[j + t] * xs[j + t];
                            plain[p * LANES + t] += gh[j + t];
                        }
                    }
                }
            }
        }
        for (int64_t p = 0; p < count; p++) {
            if (touched[p] == 0.0f) continue;
            touched[p] = 0.0f;
            for (int64_t e = p; e < 2 * half; e += count) {
                double total = 0.0;
                for (int64_t t = 0; t < LANES; t++) total += scratch[e * LANES + t];
                memset(scratch + e * LANES, 0, sizeof(float) * LANES);
                sums[e] += total;
            }
        }
    }
}

/* a . b over dim floats, in LANES partial sums added in halves at the end (four dependent additions, not sixteen). */
static inline float dot(const float *a, const float *b, int64_t dim) {
    float lanes[LANES] = {0.0f}, total = 0.0f;
    int64_t d = 0;
    for (; d + LANES <= dim; d += LANES)
        for (int64_t t = 0; t < LANES; t++) lanes[t] += a[d + t] * b[d + t];
    for (; d < dim; d++) total += a[d] * b[d];
    for (int64_t width = LANES / 2; width > 0; width /= 2)
        for (int64_t t = 0; t < width; t++) lanes[t] += lanes[t + width];
    return total + lanes[0];
}

/* out[b, h, i, j] = scale (q[b, h, i] . query_rows[h, r] + k[b, h, j] . key_rows[h, r]), r = index[b, i, j]: q
   [batch, heads, queries, dim], k [batch, heads, keys, dim], the row tables [table_heads, rows, dim] (table_heads 1
   or heads), index [index_batch, queries, keys] (index_batch 1 or batch), all contiguous; a NULL query (with its
   rows) or key drops its term. Returns -1, before writing, if an index is not a row. */
KERNEL int64_t pair_dot(const float *query, const float *key, const float *query_rows, const float *key_rows,
                        const int64_t *index, int64_t batch, int64_t index_batch, int64_t heads, int64_t table_heads,
                        int64_t rows, int64_t queries, int64_t keys, int64_t dim, float scale, float *out) {
    for (int64_t e = 0; e < index_batch * queries * keys; e++)
        if (index[e] < 0 || index[e] >= rows) return -1;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < heads; h++) {
            const int64_t table = (table_heads > 1 ? h : 0) * rows * dim;
            const float *k = key ? key + (b * heads + h) * keys * dim : NULL;
            for (int64_t i = 0; i < queries; i++) {
                const float *q = query ? query + ((b * heads + h) * queries + i) * dim : NULL;
                const int64_t *r = index + ((index_batch > 1 ? b : 0) * queries + i) * keys;
                float *o = out + ((b * heads + h) * queries + i) * keys;
                for (int64_t j = 0; j < keys; j++) {
                    float total = 0.0f;
                    if (q) total += dot(q, query_rows + table + r[j] * dim, dim);
                    if (k) total += dot(k + j * dim, key_rows + table + r[j] * dim, dim);
                    o[j] = scale * total;
                }
            }
        }
    return 0;
}
"""


@functools.cache
def cpu_kernels() -> ctypes.CDLL | None:
    """The C kernels of `piecewise_linear` and `pair_dot`, built once per machine and source (None, with a warning,
    when no C compiler builds them: FIRE and the decode steps then take their torch paths)."""
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", "-shared", "-fPIC", "-ffp-contract=off"]
    key = hashlib.sha256("\0".join([CPU_KERNELS_SOURCE, compiler, *flags]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("HF_RELPOS_CACHE", Path.home() / ".cache" / "hf_relpos"))
    library = folder / f"cpu_kernels_{key}.so"
    try:
        if not library.exists():
            folder.mkdir(parents=True, exist_ok=True)
            # Built beside its final name and moved there: another process sees the old state or the whole file.
            with tempfile.TemporaryDirectory(dir=folder) as build:
                source, built = Path(build) / "cpu_kernels.c", Path(build) / library.name
                source.write_text(CPU_KERNELS_SOURCE)
                subprocess.run([compiler, *flags, str(source), "-o", str(built)], check=True, capture_output=True,
                               text=True, timeout=300)
                os.replace(built, library)
        built = ctypes.CDLL(str(library))
        built.piecewise_linear_scratch.restype = built.pair_dot.restype = ctypes.c_int64
        return built
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        logger.warning_once(f"hf_relpos's CPU kernels could not be built with `{compiler}` ({detail}): FIRE and the "
                            "decode steps of deberta and relative_key_query take their slower torch paths. Set CC "
                            "to a C compiler to build them.")
        return None


def built_library(operator: str) -> ctypes.CDLL:
    """`cpu_kernels()`, or a `RuntimeError` that names `operator` where they could not be built."""
    library = cpu_kernels()
    if library is None:
        raise RuntimeError(f"{operator} needs its C kernel, which no C compiler built here (see the warning above; "
                           "set CC to a C compiler)")
    return library


def row_ranges(rows: int, per_call: int = 64) -> list[tuple[int, int]]:
    """`rows` split over torch's intra-op threads, at least `per_call` rows each."""
    calls = max(1, min(torch.get_num_threads(), rows // per_call))
    bounds = [rows * part // calls for part in range(calls + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def on_threads(call, ranges: list[tuple[int, int]]) -> list:
    """`call(begin, end)` for each range, in threads (a ctypes call releases the GIL)."""
    if len(ranges) == 1:
        return [call(*ranges[0])]
    with concurrent.futures.ThreadPoolExecutor(len(ranges)) as pool:
        return list(pool.map(lambda bounds: call(*bounds), ranges))


def pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


@torch.library.custom_op(f"{OPERATORS}::piecewise_linear", mutates_args=(), device_types="cpu")
def piecewise_linear(
    x: torch.Tensor, breakpoints: torch.Tensor, slopes: torch.Tensor, intercepts: torch.Tensor
) -> torch.Tensor:
    """`out[b, h, i, j] = slopes[p, h] x[b, i, j] + intercepts[p, h]`, `p` the piece of `x[b, i, j]` among the
    sorted `breakpoints` `[width]` (`FireEncoding.piece`): x `[batch, q_len, k_len]`, slopes and intercepts `[2 width
    + 1, heads]`, out `[batch, heads, q_len, k_len]`, all fp32 on a CPU. By the C kernel of
    `cpu_kernels`; differentiable in x, slopes and intercepts."""
    if {x.dtype, breakpoints.dtype, slopes.dtype, intercepts.dtype} != {torch.float32}:
        raise TypeError("piecewise_linear takes fp32 x, breakpoints, slopes and intercepts")
    library = built_library("piecewise_linear")
    x, breakpoints = x.contiguous(), breakpoints.contiguous()
    tables = torch.stack((slopes.T, intercepts.T)).contiguous()
    batch, queries, keys = x.shape
    heads, count = tables.shape[1:]
    out = x.new_empty(batch, heads, queries, keys)
    on_threads(lambda begin, end: library.piecewise_linear_forward(
        pointer(x), pointer(breakpoints), ctypes.c_int64(breakpoints.numel()), pointer(tables),
        ctypes.c_int64(count), ctypes.c_int64(heads), ctypes.c_int64(queries), ctypes.c_int64(keys),
        ctypes.c_int64(begin), ctypes.c_int64(end), pointer(out),
    ), row_ranges(batch * queries))
    return out


@piecewise_linear.register_fake
def piecewise_linear_shape(x, breakpoints, slopes, intercepts) -> torch.Tensor:
    return x.new_empty(x.shape[0], slopes.shape[1], *x.shape[1:])


@torch.library.custom_op(f"{OPERATORS}::piecewise_linear_backward", mutates_args=(), device_types="cpu")
def piecewise_linear_backward(
    grad: torch.Tensor, x: torch.Tensor, breakpoints: torch.Tensor, slopes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `piecewise_linear` in x `[batch, q_len, k_len]`, slopes and intercepts `[pieces, heads]`,
    from `grad` `[batch, heads, q_len, k_len]`; the tables' sums in float64."""
    library = built_library("piecewise_linear")
    grad, x, breakpoints = grad.contiguous(), x.contiguous(), breakpoints.contiguous()
    tables = slopes.T.contiguous()
    batch, queries, keys = x.shape
    heads, count = tables.shape
    grad_x = torch.empty_like(x)

    def rows(begin: int, end: int) -> torch.Tensor:
        sums = torch.zeros(2, heads, count, dtype=torch.float64)
        scratch = torch.zeros(library.piecewise_linear_scratch(ctypes.c_int64(heads), ctypes.c_int64(count)))
        library.piecewise_linear_backward(
            pointer(grad), pointer(x), pointer(breakpoints), ctypes.c_int64(breakpoints.numel()), pointer(tables),
            ctypes.c_int64(count), ctypes.c_int64(heads), ctypes.c_int64(queries), ctypes.c_int64(keys),
            ctypes.c_int64(begin), ctypes.c_int64(end), pointer(grad_x), pointer(sums), pointer(scratch),
        )
        return sums

    sums = torch.stack(on_threads(rows, row_ranges(batch * queries))).sum(0).float()
    return grad_x, sums[0].T.contiguous(), sums[1].T.contiguous()


@piecewise_linear_backward.register_fake
def piecewise_linear_backward_shapes(grad, x, breakpoints, slopes):
    return torch.empty_like(x), torch.empty_like(slopes), torch.empty_like(slopes)


def piecewise_linear_context(ctx, inputs, output) -> None:
    x, breakpoints, slopes, _ = inputs
    ctx.save_for_backward(x, breakpoints, slopes)


def piecewise_linear_gradients(ctx, grad):
    x, breakpoints, slopes = ctx.saved_tensors
    grad_x, grad_slopes, grad_intercepts = piecewise_linear_backward(grad, x, breakpoints, slopes)
    return grad_x, None, grad_slopes, grad_intercepts


piecewise_linear.register_autograd(piecewise_linear_gradients, setup_context=piecewise_linear_context)


def pair_dot(
    query: torch.Tensor | None, key: torch.Tensor | None, query_rows: torch.Tensor | None,
    key_rows: torch.Tensor | None, index: torch.Tensor, scale: float,
) -> torch.Tensor:
    """`out[b, h, i, j] = scale (query[b, h, i] . query_rows[h, r] + key[b, h, j] . key_rows[h, r])`, `r = index[b,
    i, j]`: the bias of a content encoding's decode step, each pair's rows read once by a C kernel (`cpu_kernels`).
    query `[batch, heads, q_len, d]`, key `[batch, heads, k_len, d]`, row tables `[heads or 1, rows, d]`, index
    `[batch or 1, q_len, k_len]`; a None query (with its rows) or key drops its term. fp32 on a CPU, without
    autograd: the callers take it where nothing needs a gradient (`pair_dot_applies`)."""
    library = built_library("pair_dot")
    reference = query if query is not None else key
    batch, heads, queries, dim = reference.shape[0], reference.shape[1], index.shape[1], reference.shape[-1]
    table = query_rows if query_rows is not None else key_rows
    if table.shape[0] not in (1, heads) or table.shape[-1] != dim or index.shape[0] not in (1, batch):
        raise ValueError(f"pair_dot: tables {tuple(table.shape)} and index {tuple(index.shape)} do not fit queries "
                         f"and keys of {batch} rows, {heads} heads and dim {dim}")
    query, key, query_rows, key_rows = (
        None if t is None else t.contiguous() for t in (query, key, query_rows, key_rows)
    )
    index = index.to(torch.int64).contiguous()
    out = reference.new_empty(batch, heads, queries, index.shape[2])
    failed = library.pair_dot(
        None if query is None else pointer(query), None if key is None else pointer(key),
        None if query_rows is None else pointer(query_rows), None if key_rows is None else pointer(key_rows),
        pointer(index), ctypes.c_int64(batch), ctypes.c_int64(index.shape[0]), ctypes.c_int64(heads),
        ctypes.c_int64(table.shape[0]), ctypes.c_int64(table.shape[1]), ctypes.c_int64(queries),
        ctypes.c_int64(index.shape[2]), ctypes.c_int64(dim), ctypes.c_float(scale), pointer(out),
    )
    if failed:
        raise IndexError(f"pair_dot: an index is outside the {table.shape[1]} rows of its tables")
    return out


def pair_dot_applies(*tensors: torch.Tensor | None) -> bool:
    """Whether `pair_dot` serves these tensors: fp32 on a CPU, eager, nothing that needs a gradient, and the C kernel
    built."""
    present = [t for t in tensors if t is not None]
    return (
        not torch.compiler.is_compiling()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in present)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in present))
        and cpu_kernels() is not None
    )
