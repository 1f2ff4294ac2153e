"""Where a decode step's position terms go: each layer's `encoding.bias` timed inside greedy generation, at GPT-2
small's widths (hidden 768, 12 heads, 12 layers), one thread, next to `GPT2LMHeadModel`'s time per token in the
same run (docs/PERFORMANCE.md, section 2, decoding).

    python benchmarks/decode_bias.py [--encodings deberta,relative_key_query] [--new-tokens 128] [--rounds 3]

Per encoding it prints the time per token of the step and of the layers' bias calls, both as a share of GPT-2's
time per token (medians of the rounds, GPT-2 run beside each round). For DeBERTa it also times the least any decode
bias must do: read the layer's two projected tables `Kr` and `Qr` once (`--floor`, a bias of zeros that sums
them), which is what a fused kernel would still pay.
"""

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import transformers


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_relpos import RelPosGPTConfig, RelPosGPTForCausalLM  # noqa: E402
from hf_relpos.encodings import DisentangledEncoding  # noqa: E402


def timed_bias(encoding, spent: list[float], floor: bool = False):
    """`encoding.bias`, adding the seconds of every decode step's call (one query) to `spent[0]`. With `floor`, a
    bias of zeros after reading the layer's projected tables (DeBERTa)."""
    bias = encoding.bias

    def call(query, key, state, layer_idx):
        start = time.perf_counter()
        if floor and query.shape[2] == 1:
            tables = encoding.position_projections(layer_idx, query.dtype, continues_cache=True)
            sum(float(table.sum()) for table in tables if table is not None)
            out = query.new_zeros(query.shape[0], query.shape[1], 1, key.shape[2])
        else:
            out = bias(query, key, state, layer_idx)
        if query.shape[2] == 1:
            spent[0] += time.perf_counter() - start
        return out

    return call


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encodings", default="deberta,relative_key_query")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    common = dict(vocab_size=8192, n_embd=768, n_head=12, n_layer=12, n_positions=1024, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    input_ids = torch.randint(1, common["vocab_size"], (1, args.prompt))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(input_ids))
    models = {"GPT2LMHeadModel": transformers.GPT2LMHeadModel._from_config(
        transformers.GPT2Config(**common), attn_implementation="sdpa").eval()}
    spent = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.encodings.split(","):
            variants = [(name, False)] + ([(f"{name} (floor)", True)] if name == DisentangledEncoding.name else [])
            for label, floor in variants:
                model = RelPosGPTForCausalLM._from_config(
                    RelPosGPTConfig(position_embedding_type=name, **common), attn_implementation="sdpa").eval()
                spent[label] = [0.0]
                model.transformer.wpe.bias = timed_bias(
                    model.transformer.wpe, spent[label], floor)
                models[label] = model

    def per_token(model) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids, **kwargs)
        return (time.perf_counter() - start) / args.new_tokens

    for model in models.values():
        per_token(model)  # warm-up
    times = {label: [] for label in models}
    bias_times = {label: [] for label in spent}
    for _ in range(args.rounds):
        for label, model in models.items():
            if label == "GPT2LMHeadModel":
                continue
            times["GPT2LMHeadModel"].append(per_token(models["GPT2LMHeadModel"]))
            spent[label][0] = 0.0
            times[label].append(per_token(model))
            bias_times[label].append(spent[label][0] / (args.new_tokens - 1))
    baseline = statistics.median(times["GPT2LMHeadModel"])
    layers = common["n_layer"]
    print(f"GPT2LMHeadModel: {baseline * 1e3:.2f} ms per token (median of {len(times['GPT2LMHeadModel'])} runs)")
    print(f"{'model':<28} {'ms/token':>9} {'tokens/s vs GPT-2':>18} {'bias us/layer':>14} {'bias share':>11}")
    for label in spent:
        step, bias = statistics.median(times[label]), statistics.median(bias_times[label])
        print(f"{label:<28} {step * 1e3:9.2f} {baseline / step:17.3f}x {bias / layers * 1e6:14.1f} "
              f"{bias / baseline:10.1%}")


if __name__ == "__main__":
    main()
