"""The autograd kernels the encodings and the attention dispatch call: `QueryBlockedAttention` (attention with a
differentiable score bias, block by block of queries), the bias row readers `DiagonalRows`, `SkewedRows` and
`DistanceRows`, and `RunGather` (a gather from a distance table whose backward needs no scatter-add).

Custom `torch.autograd.Function`s that save memory and time over autograd's own graph, kept apart so that
`encodings.py` stays the catalog of schemes and `attention.py` the dispatch.
"""

import torch
from torch import nn


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
    `fused_forward(query, key, value)`, when given (no dropout), computes the output instead of the blocks: a fused
    kernel reading the same bias without its gradient; backward recomputes each block's probabilities either way.
    """

    @staticmethod
    def forward(ctx, query, key, value, mask, bias_rows, row_tables, scaling, dropout, causal, block_size,
                fused_forward, *tables):
        seed = int(torch.randint(2**62, ())) if dropout > 0.0 else 0
        kept = None
        if fused_forward is not None:
            output = fused_forward(query, key, value)
        else:
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
        grad_query, grad_key, grad_value = torch.empty_like(query), torch.zeros_like(key), torch.zeros_like(value)
        needs_grad = ctx.needs_input_grad[11:]
        grad_tables = [torch.zeros_like(table) if needs else None
                       for table, needs in zip(tables, needs_grad, strict=True)]
        # rowsum(dO * O) = rowsum(dP * P): the softmax backward's correction term, one value per query.
        correction = (grad_output * output).sum(-1, keepdim=True)
        for rows in query_blocks(query.shape[2], block_size):
            leaves = [table.detach().requires_grad_(needs)
                      for table, needs in zip(block_tables(tables, row_tables, rows), needs_grad, strict=True)]
            with torch.enable_grad():
                bias = bias_rows(leaves, rows)
            if kept is None:
                probabilities = block_probabilities(scaled_query, key, mask, bias.detach(), causal, rows)
            else:
                probabilities = kept
            block_grad_output = grad_output[:, :, rows]
            grad_value += torch.matmul(block_dropout(probabilities, dropout, seed, rows).transpose(-1, -2),
                                       block_grad_output)
            grad_scores = block_dropout(torch.matmul(block_grad_output, value.transpose(-1, -2)), dropout, seed, rows)
            grad_scores.sub_(correction[:, :, rows]).mul_(probabilities)
            grad_query[:, :, rows] = torch.matmul(grad_scores, key).mul_(scaling)
            grad_key += torch.matmul(grad_scores.transpose(-1, -2), scaled_query[:, :, rows])
            if any(needs_grad):
                wanted = [index for index, leaf in enumerate(leaves) if leaf.requires_grad]
                grads = torch.autograd.grad(bias, [leaves[index] for index in wanted],
                                            grad_scores.sum_to_size(bias.shape), allow_unused=True)
                for index, grad in zip(wanted, grads, strict=True):
                    if grad is not None:
                        total = grad_tables[index][..., rows, :] if index < row_tables else grad_tables[index]
                        total += grad
        return grad_query, grad_key, grad_value, None, None, None, None, None, None, None, None, *grad_tables


def block_tables(tables, row_tables: int, rows: slice) -> list[torch.Tensor]:
    """`tables` with the first `row_tables` (indexed by query on dim -2) sliced to the block's `rows`."""
    return [table[..., rows, :] if index < row_tables else table for index, table in enumerate(tables)]


def query_blocks(length: int, block_size: int) -> list[slice]:
    """Slices of `block_size` consecutive queries covering `length`."""
    return [slice(start, min(start + block_size, length)) for start in range(0, length, block_size)]


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


class DiagonalRows(torch.autograd.Function):
    """`out[h, r, j] = table[h, start - r + j]`: `rows` rows and `cols` columns of the Toeplitz matrix whose
    diagonals are `table` `[heads, n]`. Both directions are copies and a sum: backward adds the gradient along
    diagonals through a strided view, without an index tensor."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, start: int, rows: int, cols: int) -> torch.Tensor:
        ctx.shape, ctx.first = table.shape, start - rows + 1
        windows = table.unfold(-1, cols, 1)
        # Row r is window start - r. Reversing a contiguous copy is fast; by chunks, that copy stays small. (Flipping
        # the strided view itself is faster alone, but leaves a column-major result that slows every later op.)
        if rows <= 256:
            return windows[:, ctx.first : start + 1].contiguous().flip(1)
        out = table.new_empty(table.shape[0], rows, cols)
        for chunk in range(0, rows, 256):
            stop = min(rows, chunk + 256)
            out[:, chunk:stop] = windows[:, start - stop + 1 : start - chunk + 1].contiguous().flip(1)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        heads, rows, cols = grad.shape
        width = rows + cols - 1
        # Row r of the gradient lands at columns (rows - 1 - r) .. of its own row of `shifted`: columns are then
        # the table index minus `first`, and a sum over rows adds each diagonal.
        shifted = grad.new_empty(heads, rows, width)
        # Row r's data covers columns rows-1-r .. rows-2-r+cols: zero only the two bands it may leave uncovered.
        shifted[..., : rows - 1].zero_()
        shifted[..., cols:].zero_()
        shifted.as_strided((heads, rows, cols), (rows * width, width - 1, 1), rows - 1).copy_(grad)
        grad_table = grad.new_zeros(ctx.shape)
        grad_table[:, ctx.first : ctx.first + width] = shifted.sum(1)
        return grad_table, None, None, None


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
