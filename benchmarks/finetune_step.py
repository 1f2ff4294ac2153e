"""A training step as fine-tuning runs it: attention dropout on and a padded batch, which `run.py`'s train section
(dropout 0, no padding) leaves out. Each encoding's `RelPosBertModel` on sdpa against transformers' `BertModel`
(sdpa) with the same dropout and padding, paired as `run.py` pairs them (docs/PERFORMANCE.md, section 1b).

    python benchmarks/finetune_step.py [--encodings alibi] [--cases 512x4,2048x1] [--dropout 0.1] [--rounds 7]

With dropout, torch's fused CPU kernel does not apply and sdpa takes its math path for both models: a fixed bias
(ALiBi) runs `kernels.flushed_dropout_attention` there instead. Padding (the second half of the batch loses its last
quarter of tokens) makes the bias dense (`masked_bias`). Prints the median ratio per case, padded and not.
"""

import argparse
import statistics

import run  # first: it quiets the profiler's log before torch loads
import torch
import transformers

from hf_relpos import RelPosBertConfig, RelPosBertModel


def models(encoding: str, length: int, dropout: float) -> dict:
    sizes = dict(vocab_size=run.VOCAB, hidden_size=run.HIDDEN, num_attention_heads=run.HEADS,
                 num_hidden_layers=run.LAYERS, intermediate_size=run.FFN, max_position_embeddings=length,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=dropout)
    bert = transformers.BertModel._from_config(transformers.BertConfig(**sizes), attn_implementation="sdpa")
    relpos = RelPosBertModel._from_config(RelPosBertConfig(position_embedding_type=encoding, **sizes),
                                          attn_implementation="sdpa")
    return {"BertModel": bert.train(), encoding: relpos.train()}


def step(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    def call():
        for parameter in model.parameters():
            parameter.grad = None
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        (hidden * attention_mask[..., None]).pow(2).mean().backward()
    return call


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encodings", default="alibi")
    parser.add_argument("--cases", default="512x4,2048x1", help="LENGTHxBATCH, comma-separated")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
          f"attention dropout {args.dropout}")
    for case in args.cases.split(","):
        length, batch = (int(part) for part in case.split("x"))
        input_ids = run.token_ids(length, batch)
        for padded in (False, True):
            attention_mask = torch.ones(batch, length, dtype=torch.long)
            if padded:
                attention_mask[batch // 2:, length - length // 4:] = 0
            for encoding in run.encoding_list(args.encodings):
                steps = {name: step(model, input_ids, attention_mask)
                         for name, model in models(encoding, length, args.dropout).items()}
                for call in steps.values():
                    call()  # warm-up
                label = f"{encoding} L={length} batch={batch} {'padded' if padded else 'unpadded'}"
                ratios = run.paired("BertModel", steps, args.rounds, label)[encoding]
                print(f"{label}: {statistics.median(ratios):.2f}x BertModel's step "
                      f"({', '.join(f'{ratio:.2f}' for ratio in ratios)})", flush=True)


if __name__ == "__main__":
    main()
