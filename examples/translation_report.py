#!/usr/bin/env python
"""Table and plot of `run_translation.py` runs: BLEU and chrF on the test set, overall and per source-length bin,
next to the score of copying the source unchanged.

    python examples/translation_report.py --runs "transformers BERT2BERT=out/mt-bert2bert" "alibi=out/mt-alibi" \
        --train_words 24 --markdown out/translation.md --plot docs/translation_bleu_by_length.png

Each run folder holds the `test_results.json` and `trainer_state.json` that `run_translation.py --do_train
--do_predict` writes.
"""

import argparse
import json
import os


def load_run(folder: str) -> dict:
    with open(os.path.join(folder, "test_results.json")) as handle:
        test = json.load(handle)
    losses = []
    state_file = os.path.join(folder, "trainer_state.json")
    if os.path.exists(state_file):
        with open(state_file) as handle:
            losses = [row["loss"] for row in json.load(handle)["log_history"] if "loss" in row]
    return {"test": test, "final_train_loss": losses[-1] if losses else None}


def markdown(runs: dict[str, dict]) -> str:
    bins = list(next(iter(runs.values()))["test"]["test_by_source_length"])
    header = ["model", "train loss (last log)", "BLEU", "chrF", *[f"BLEU {label} words" for label in bins]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, run in runs.items():
        test, by_bin = run["test"], run["test"]["test_by_source_length"]
        loss = f"{run['final_train_loss']:.3f}" if run["final_train_loss"] is not None else "—"
        cells = [name, loss, f"{test['test_bleu']:.1f}", f"{test['test_chrf']:.1f}",
                 *[f"{by_bin[label]['bleu']:.1f}" for label in bins]]
        lines.append("| " + " | ".join(cells) + " |")
    copy = next(iter(runs.values()))["test"]["test_by_source_length"]
    counts = ", ".join(f"{label}: {copy[label]['n']}" for label in bins)
    lines.append("| copy the source unchanged (no model) | — | — | — | "
                 + " | ".join(f"{copy[label]['copy_bleu']:.1f}" for label in bins) + " |")
    lines.append(f"\nTest verses per bin: {counts}.")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], path: str, train_words: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    bins = list(next(iter(runs.values()))["test"]["test_by_source_length"])
    figure, axes = plt.subplots(figsize=(9, 6.5), dpi=120)
    positions = range(len(bins))
    for index, (name, run) in enumerate(runs.items()):
        by_bin = run["test"]["test_by_source_length"]
        axes.plot(positions, [by_bin[label]["bleu"] for label in bins], marker="osD^v<>p"[index % 8], label=name)
    copy = next(iter(runs.values()))["test"]["test_by_source_length"]
    axes.plot(positions, [copy[label]["copy_bleu"] for label in bins], color="gray", linestyle=":",
              label="copy the source")
    if train_words is not None:
        longest = max(i for i, label in enumerate(bins) if label.startswith("<=") and int(label[2:]) <= train_words)
        axes.axvline(longest + 0.5, color="black", linestyle="--", linewidth=1,
                     label=f"longest training source ({train_words} words)")
    axes.set_xticks(list(positions), [f"{label} words" for label in bins])
    axes.set_xlabel("source length (KJV verse)")
    axes.set_ylabel("BLEU (sacrebleu)")
    axes.set_title("KJV -> WEB, BERT2BERT warm-started from MiniLM: BLEU by source length")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=FOLDER, in table order")
    parser.add_argument("--train_words", type=int, default=None, help="longest training source, in words")
    parser.add_argument("--markdown", default=None, help="write the table here (default: print it)")
    parser.add_argument("--plot", default=None, help="write the PNG here")
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.runs:
        name, _, folder = spec.rpartition("=")
        if not name:
            parser.error(f"--runs takes NAME=FOLDER, got {spec!r}")
        runs[name] = load_run(folder)
    table = markdown(runs)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table)
    else:
        print(table)
    if args.plot:
        plot(runs, args.plot, args.train_words)
    return table


if __name__ == "__main__":
    main()
