"""Which kernel trains a bias that needs no gradient: one attention layer's forward+backward on CPU.

    python benchmarks/bias_kernels.py [--lengths 512,2048] [--rounds 5] [--threads 1]

ALiBi's bias (4 heads of 64, batch 1) through torch's fused sdpa as a dense float mask, as a view of its diagonals
over reversed queries (`toeplitz_attention_forward`), and through the query-blocked kernel (`QueryBlockedAttention`),
each as a paired ratio to torch's fused sdpa without a mask (the run before and the run after every candidate),
median over rounds. `attention.blocked_training` sends a bias without a gradient to the fused kernel, and
`attention.toeplitz_kernel` a bias of `j - i` to its diagonals, on the strength of this measurement
(docs/PERFORMANCE.md).
"""

import argparse
import os
import statistics
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from hf_relpos import RelPosBertConfig  # noqa: E402
from hf_relpos.attention import BLOCK_SCORES, toeplitz_attention_forward, toeplitz_diagonals  # noqa: E402
from hf_relpos.encodings import build_position_encoding  # noqa: E402
from hf_relpos.kernels import QueryBlockedAttention  # noqa: E402


HEADS, HEAD_DIM = 4, 64


def candidates(length: int) -> dict:
    config = RelPosBertConfig(position_embedding_type="alibi", hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS)
    encoding = build_position_encoding(config, causal=False)
    positions = torch.arange(length)[None]
    bias = encoding.prepare(positions, positions, torch.float32, dense=True).tables["bias"]
    state = encoding.prepare(positions, positions, torch.float32, dense=False)
    query, key, value = (torch.randn(1, HEADS, length, HEAD_DIM, requires_grad=True) for _ in range(3))

    def fused(mask=None):
        F.scaled_dot_product_attention(query, key, value, attn_mask=mask).sum().backward()

    diagonals = toeplitz_diagonals(encoding, state)

    def diagonal_view():
        toeplitz_attention_forward(None, query, key, value, diagonals, HEAD_DIM**-0.5)[0].sum().backward()

    def blocked():
        tables = encoding.bias_tables(query, key, state, 0)
        output = QueryBlockedAttention.apply(
            query, key, value, None, lambda tables, rows: encoding.bias_rows(tables, state, rows), encoding.row_tables,
            HEAD_DIM**-0.5, 0.0, False, max(16, BLOCK_SCORES // (HEADS * length)), *tables,
        )
        output.sum().backward()

    return {"no mask": fused, "fused, dense mask": lambda: fused(bias), "fused, diagonals": diagonal_view,
            "query-blocked": blocked}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=lambda text: [int(x) for x in text.split(",")], default=[512, 2048])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for length in args.lengths:
        fns = candidates(length)
        baseline = fns.pop("no mask")
        for fn in (baseline, *fns.values()):
            fn()  # warm-up
        ratios = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                before, candidate, after = seconds(baseline), seconds(fn), seconds(baseline)
                ratios[name].append(candidate / ((before + after) / 2))
        cells = ", ".join(f"{name} {statistics.median(values):.2f}x" for name, values in ratios.items())
        print(f"L={length}: {cells} (of fused sdpa without a mask)")


if __name__ == "__main__":
    main()
