"""Where a compiled training step spends its time on a bias alone: forward + backward of the bias, compiled, at one
length (docs/PERFORMANCE.md, section 1b, fourth pass).

    python benchmarks/compiled_bias.py [--length 2048] [--heads 4] [--rounds 5] [--threads 1]

- relative_key_query's two terms, `q . r_clip(j - i)` and `k . r_clip(j - i)`, read from `[heads, L, 2k + 1]` tables:
  `kernels.ClippedRows` (what the library runs compiled) against a plain gather by an index tensor (what it ran
  before), paired in one process; the ratio is ClippedRows' time over the gather's.
- FIRE's `pair_bias` (its MLP by pieces, every pair): on the C kernel (`kernels.piecewise_linear`) and as inductor
  compiles the torch form (`cpu_kernel = False`), paired in one process; the median times, their ratio, and
  `torch.profiler`'s split of one step on the kernel.
"""

import argparse
import os
import statistics
import sys
import time

import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_relpos import RelPosBertConfig  # noqa: E402
from hf_relpos.encodings import PositionState, build_position_encoding  # noqa: E402
from hf_relpos.kernels import ClippedRows  # noqa: E402


def gathered_terms(query_table, key_table, index):
    shape = (*query_table.shape[:-1], index.shape[-1])
    return (query_table.gather(-1, index.expand(shape))
            + key_table.transpose(-1, -2).gather(-2, index.expand(shape)))


def clipped_terms(query_table, key_table, index):
    k = (query_table.shape[-1] - 1) // 2
    keys = ClippedRows.apply(key_table.flip(-1), k, query_table.shape[-2])
    return ClippedRows.apply(query_table, k, key_table.shape[-2]) + keys.transpose(-1, -2)


def seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def paired(title: str, steps: dict, rounds: int) -> None:
    """Each step's median time over `rounds` rounds that run them in turn, and the median ratio of the first step's
    time to the second's within a round."""
    (first, second), times = steps, {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(seconds(step))
    ratios = [a / b for a, b in zip(times[first], times[second], strict=True)]
    print(title)
    for name, values in times.items():
        print(f"  {name:<17} {statistics.median(values) * 1e3:7.1f} ms (median of {rounds})")
    print(f"  {first} / {second}: {statistics.median(ratios):.2f}x (median of paired rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-relative-positions", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    length, heads, k = args.length, args.heads, args.max_relative_positions

    tables = [torch.randn(1, heads, length, 2 * k + 1, requires_grad=True) for _ in range(2)]
    positions = torch.arange(length)
    index = ((positions[None, :] - positions[:, None]).clamp(-k, k) + k)[None, None]
    grad = torch.randn(1, heads, length, length)

    def training_step(terms):
        compiled = torch.compile(terms)
        return lambda: compiled(*tables, index).backward(grad)

    steps = {"ClippedRows": training_step(clipped_terms), "gather": training_step(gathered_terms)}
    for step in steps.values():
        step()  # compilation
    paired(f"relative_key_query terms, L={length}, {heads} heads, table {2 * k + 1}, forward + backward, compiled:",
           steps, args.rounds)

    config = RelPosBertConfig(position_embedding_type="fire", hidden_size=64 * heads, num_attention_heads=heads,
                              max_position_embeddings=length)
    fire = build_position_encoding(config, causal=False)
    fire.init_weights(config)
    for layer in (fire.mlp[0], fire.mlp[2]):
        torch.nn.init.normal_(layer.weight)
        torch.nn.init.normal_(layer.bias)
    state_positions = positions[None]

    def fire_step(cpu_kernel: bool):
        graph = torch.compile(lambda: fire.pair_bias(PositionState(state_positions, state_positions),
                                                     fire.parameter_tables()))

        def step():
            fire.cpu_kernel = cpu_kernel  # read when the graph is traced: the first call compiles this form
            graph().backward(grad)

        step()  # compilation
        return step

    fire_steps = {"C kernel": fire_step(True), "torch (inductor)": fire_step(False)}
    paired(f"FIRE pair_bias, L={length}, {heads} heads, forward + backward, compiled:", fire_steps, args.rounds)
    with torch.profiler.profile() as profile:
        fire_steps["C kernel"]()
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
