#!/usr/bin/env python
"""Train short, test long: small decoders that differ only in their position encoding.

Every model is a `RelPosGPTForCausalLM` of the same size, trained from the same initial seed on the same batches of
the same English text at the same short length (`--train_length`); only `position_embedding_type` differs. Each
is then evaluated with `hf_relpos.extrapolation` at 1x, 2x, 4x, 8x and 16x the training length on held-out text
(`absolute` is not applicable beyond 1x: its learned table ends there). A second, synthetic task checks passkey
retrieval (Mohtashami & Jaggi 2023) beyond the training length.

Corpus: by default the English prose of the Python Language Reference that ships with every CPython
(`pydoc_data.topics`, ~465k characters): real, offline, and nothing to install. `--text_file` takes any UTF-8 text
instead. Tokenizer: bytes (UTF-8, vocabulary 256), no training, no download; runs of spaces are collapsed so the
reference's indented code does not dominate. The last `--eval_fraction` of the text is held out for evaluation.

Default size (n_embd 64, 2 layers, 4 heads, train length 64, 400 steps of 32 sequences) runs all 12 encodings,
both tasks, in about 7 minutes of CPU time (one thread; 14 min wall on a busy shared 2-core machine):

    python examples/length_extrapolation.py --output_dir extrapolation_results

It writes `results.json` (every row of the harness, per model and task), `results.md` (tables) and
`perplexity.png` / `passkey.png` (one line per model).
"""

from __future__ import annotations

import json
import math
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, get_cosine_schedule_with_warmup

from hf_relpos import POSITION_ENCODINGS, RelPosGPTConfig, RelPosGPTForCausalLM
from hf_relpos.extrapolation import (
    PasskeyScheme,
    evaluate_perplexity,
    markdown_table,
    passkey_accuracy,
    plot,
    save_json,
)


@dataclass
class ExtrapolationArguments:
    output_dir: str = field(default="extrapolation_results", metadata={"help": "where results.json/.md and PNGs go"})
    encodings: list[str] = field(
        default_factory=lambda: list(POSITION_ENCODINGS), metadata={"help": "position_embedding_type values to train"}
    )
    text_file: str | None = field(default=None, metadata={"help": "UTF-8 text corpus (default: pydoc_data.topics)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "held-out tail of the corpus for evaluation"})
    n_embd: int = field(default=64)
    n_layer: int = field(default=2)
    n_head: int = field(default=4)
    train_length: int = field(default=64, metadata={"help": "training sequence length (= n_positions)"})
    max_steps: int = field(default=400)
    batch_size: int = field(default=32)
    learning_rate: float = field(default=3e-3)
    warmup_steps: int = field(default=30)
    weight_decay: float = field(default=0.01)
    seed: int = field(default=0)
    eval_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    eval_mode: str = field(default="nonoverlapping", metadata={"help": "nonoverlapping or sliding"})
    eval_stride: int | None = field(default=None, metadata={"help": "sliding mode: scored tokens per window"})
    eval_tokens: int = field(default=16384, metadata={"help": "held-out tokens evaluated at every length"})
    eval_batch_size: int = field(default=8)
    passkey: bool = field(default=True, metadata={"help": "also train and test passkey retrieval"})
    passkey_steps: int = field(default=300)
    passkey_digits: int = field(default=3)
    passkey_samples: int = field(default=64)
    threads: int = field(default=1, metadata={"help": "torch.set_num_threads: at the default size one thread is "
                                                  "as fast as two (0: torch's default)"})
    progress: bool = field(default=False, metadata={"help": "tqdm bars for the evaluations"})


# --------------------------------------------------------------------------------------------------------------------
# data


def load_text(path: str | None) -> tuple[str, str]:
    """The corpus text and a line naming its source."""
    if path:
        return Path(path).read_text(encoding="utf-8"), path
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return text, f"pydoc_data.topics (Python {platform.python_version()} Language Reference)"


def byte_tokenize(text: str) -> torch.Tensor:
    """UTF-8 bytes as token ids (vocabulary 256), runs of spaces/tabs collapsed to one space."""
    text = re.sub(r"[ \t]+", " ", text)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def model_config(args: ExtrapolationArguments, encoding: str, vocab_size: int) -> RelPosGPTConfig:
    return RelPosGPTConfig(
        vocab_size=vocab_size, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
        n_positions=args.train_length, position_embedding_type=encoding,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )


def train(model, batches, args: ExtrapolationArguments, steps: int) -> float:
    """Plain AdamW + cosine schedule; `batches(step)` returns `(input_ids, labels)`. Returns the last loss."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "wpe" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(0.9, 0.95),
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, steps)
    model.train()
    losses = []
    for step in range(steps):
        input_ids, labels = batches(step)
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


# --------------------------------------------------------------------------------------------------------------------
# the two tasks


def run_language_modelling(args, encoding, train_ids, eval_ids, lengths) -> tuple[list[dict], float]:
    generator = torch.Generator().manual_seed(args.seed)  # the same batches for every encoding
    starts = torch.randint(0, len(train_ids) - args.train_length, (args.max_steps, args.batch_size),
                           generator=generator)

    def batches(step):
        input_ids = torch.stack([train_ids[s:s + args.train_length] for s in starts[step].tolist()])
        return input_ids, input_ids

    torch.manual_seed(args.seed)
    model = RelPosGPTForCausalLM(model_config(args, encoding, 256))
    loss = train(model, batches, args, args.max_steps)
    rows = evaluate_perplexity(
        model, eval_ids, lengths, mode=args.eval_mode, stride=args.eval_stride, batch_size=args.eval_batch_size,
        max_tokens=args.eval_tokens, progress=args.progress, on_unsupported="nan",
    )
    return rows, loss


def run_passkey(args, encoding, lengths) -> tuple[list[dict], float]:
    scheme = PasskeyScheme(num_digits=args.passkey_digits)
    generator = torch.Generator().manual_seed(args.seed + 1)

    def batches(step):
        input_ids, labels, _ = scheme.make_batch(args.train_length, args.batch_size, generator)
        return input_ids, labels

    torch.manual_seed(args.seed)
    model = RelPosGPTForCausalLM(model_config(args, encoding, scheme.first_free_id))
    loss = train(model, batches, args, args.passkey_steps)
    rows = passkey_accuracy(
        model, lengths, scheme, num_samples=args.passkey_samples, batch_size=args.eval_batch_size, seed=args.seed + 2,
        progress=args.progress, on_unsupported="nan",
    )
    return rows, loss


def main(argv=None) -> dict:
    (args,) = HfArgumentParser(ExtrapolationArguments).parse_args_into_dataclasses(args=argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = sorted(set(args.encodings) - set(POSITION_ENCODINGS))
    if unknown:
        raise SystemExit(f"unknown encodings {unknown}; choose from {list(POSITION_ENCODINGS)}")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    text, source = load_text(args.text_file)
    token_ids = byte_tokenize(text)
    split = int(len(token_ids) * (1 - args.eval_fraction))
    train_ids, eval_ids = token_ids[:split], token_ids[split:]
    lengths = [args.train_length * multiple for multiple in args.eval_multiples]
    if len(eval_ids) < max(lengths):
        raise SystemExit(f"the held-out text has {len(eval_ids)} tokens, fewer than the longest length {max(lengths)}")
    # The same scored text at every length: a multiple of the longest length.
    args.eval_tokens = min(args.eval_tokens, len(eval_ids)) // max(lengths) * max(lengths)
    print(f"corpus: {source}: {len(token_ids)} byte tokens ({len(train_ids)} train, {args.eval_tokens} evaluated); "
          f"lengths {lengths}; {torch.get_num_threads()} threads", flush=True)

    started = time.time()
    perplexity, passkey, meta = {}, {}, {}
    for encoding in args.encodings:
        t0 = time.time()
        rows, loss = run_language_modelling(args, encoding, train_ids, eval_ids, lengths)
        perplexity[encoding] = rows
        meta[encoding] = {"lm_train_loss": loss}
        line = " ".join("n/a" if math.isnan(r["perplexity"]) else f"{r['perplexity']:.2f}" for r in rows)
        message = f"{encoding:>20}  lm loss {loss:.3f}  ppl {line}"
        if args.passkey:
            rows, loss = run_passkey(args, encoding, lengths)
            passkey[encoding] = rows
            meta[encoding]["passkey_train_loss"] = loss
            line = " ".join("n/a" if math.isnan(r["accuracy"]) else f"{r['accuracy']:.2f}" for r in rows)
            message += f"  | passkey {line}"
        meta[encoding]["seconds"] = time.time() - t0
        print(f"{message}  ({meta[encoding]['seconds']:.0f}s)", flush=True)
    runtime = time.time() - started

    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    summary = {
        "command": command,
        "runtime_seconds": runtime,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads, "
                   f"python {platform.python_version()}, torch {torch.__version__}",
        "corpus": source,
        "arguments": asdict(args),
        "train": meta,
        "perplexity": perplexity,
        "passkey": passkey,
    }
    save_json(summary, output / "results.json")
    plot(perplexity, output / "perplexity.png", train_length=args.train_length,
         title=f"byte-level perplexity vs. length (trained at {args.train_length})")
    tables = [f"Perplexity ({args.eval_mode}, {args.eval_tokens} held-out byte tokens per length):\n",
              markdown_table(perplexity, "perplexity", args.train_length)]
    if passkey:
        plot(passkey, output / "passkey.png", train_length=args.train_length, metric="accuracy",
             title=f"passkey retrieval ({args.passkey_digits} digits) vs. length", log_y=False)
        tables += [f"\nPasskey retrieval accuracy ({args.passkey_samples} samples per length):\n",
                   markdown_table(passkey, "accuracy", args.train_length)]
    (output / "results.md").write_text("".join(tables))
    print("".join(tables))
    print(f"runtime {runtime:.0f}s; wrote {output}/results.json, results.md, perplexity.png"
          + (", passkey.png" if passkey else ""))
    alibi = perplexity.get("alibi")
    if alibi and 8 in args.eval_multiples and 1 in args.eval_multiples:
        at = {row["length"]: row["perplexity"] for row in alibi}
        ratio = at[8 * args.train_length] / at[args.train_length]
        print(f"alibi: perplexity at 8x / at 1x = {ratio:.3f}")
        summary["alibi_8x_over_1x"] = ratio
        (output / "results.json").write_text(json.dumps(json.loads((output / "results.json").read_text())
                                                        | {"alibi_8x_over_1x": ratio}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
