"""The `hf-relpos` command.

```
hf-relpos convert SRC DST --position-embedding-type alibi [--task sequence-classification] [--overwrite]
hf-relpos convert SRC DST --position-embedding-type alibi --task seq2seq [--decoder-position-embedding-type rope]
hf-relpos card DIR
hf-relpos push DIR REPO_ID [--delete-stale]
hf-relpos extrapolate MODEL [MODEL ...] --text-file eval.txt --lengths 64 128 256
hf-relpos adapt ORIGINAL CONVERTED OUT --text-file FILE [--max-steps N] [--max-length L] [--attention-weight W]
    [--overwrite]
```

This module lives beside the `hf_relpos` package, not in it: importing the package registers every model with
transformers' Auto classes, which imports torch and transformers' model stack (seconds). The command imports
`hf_relpos` only inside a subcommand, so `--help` and argument errors return at once (docs/ARCHITECTURE.md).

A user error (bad argument, missing path, refused destination, invalid config value) prints one line
`hf-relpos: error: ...` and exits with status 2; nothing is written.

Subcommands plug in through `SUBCOMMANDS`: a name -> function `(subparsers) -> None` that adds its parser and sets
`func` (called with the parsed namespace, returns an exit code). Other modules add theirs with
`register_subcommand(name, add_parser)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable


PROG = "hf-relpos"
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}
# What the library raises for bad input: invalid values (ValueError, and json's JSONDecodeError), missing or refused
# files and unreachable Hub ids (OSError), sources it cannot convert (NotImplementedError).
USER_ERRORS = (ValueError, OSError, NotImplementedError)


class UsageError(Exception):
    """A user error found by the command itself; `main` prints it as one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        _print_error(f"{message} (see `{self.prog} --help`)")
        sys.exit(2)


def _print_error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def register_subcommand(name: str, add_parser: Callable[[argparse._SubParsersAction], None]) -> None:
    """Add a subcommand: `add_parser(subparsers)` must create its parser and `set_defaults(func=...)`."""
    SUBCOMMANDS[name] = add_parser


def _json_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text}") from None


def _check_local_path(name: str, what: str) -> None:
    """Raise `UsageError` when `name` is meant as a local path and is not there, instead of letting it be read as a
    Hub id (which fails late, after network retries). A path is meant as local when it is absolute, starts with
    `.` or `~`, has more than one `/` (a Hub id has one), or its first component is an existing folder."""
    if os.path.exists(name):
        return
    parts = name.split("/")
    local = os.path.isabs(name) or name.startswith((".", "~")) or len(parts) > 2
    if local or (len(parts) == 2 and os.path.isdir(parts[0])):
        raise UsageError(f"{what} {name} does not exist.")


def _check_folder(name: str) -> None:
    """Raise `UsageError` unless `name` is an existing folder."""
    if not os.path.isdir(name):
        raise UsageError(f"DIR {name} {'is not a folder' if os.path.exists(name) else 'does not exist'}.")


def _add_encoding_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("encoding options (default: the config's defaults)")
    group.add_argument("--max-relative-positions", type=int, help="relative_key(_query) clip k / deberta range")
    group.add_argument("--position-buckets", type=int, help="deberta: log buckets per direction")
    group.add_argument("--relative-attention-num-buckets", type=int, help="t5: number of buckets")
    group.add_argument("--relative-attention-max-distance", type=int, help="t5: largest bucketed distance")
    group.add_argument("--rope-parameters", type=_json_value, help='rope/xpos, JSON: \'{"rope_type": "default", '
                       '"rope_theta": 10000.0}\'')
    group.add_argument("--xpos-scale-base", type=int, help="xpos: decay length scale")
    group.add_argument("--fire-mlp-width", type=int, help="fire: MLP hidden width")


ENCODING_OPTIONS = (
    "max_relative_positions", "position_buckets", "relative_attention_num_buckets", "relative_attention_max_distance",
    "rope_parameters", "xpos_scale_base", "fire_mlp_width",
)


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a BERT/RoBERTa/MiniLM/RoFormer/DeBERTa/GPT-2 or Llama-family (folder or .gguf) checkpoint to "
        "another position encoding",
        description="Load SRC (a local folder or Hub id) into a relpos model with the chosen position encoding and "
        "save it to DST with its modelling code (trust_remote_code), tokenizer and conversion_report.json. DST must "
        "be new or empty (or --overwrite), and may not be or contain SRC; it is written in full beside DST and "
        "renamed into place, so an interrupted run leaves the old DST or the complete new one.",
    )
    parser.add_argument("source", metavar="SRC")
    parser.add_argument("destination", metavar="DST")
    parser.add_argument("--position-embedding-type", required=True, help="absolute, alibi, rope, t5, ...")
    parser.add_argument("--task", help="the head: base, masked-lm, causal-lm, sequence-classification, ... (default: "
                        "the source's architecture); seq2seq: BERT2BERT, both halves warm-started from SRC")
    parser.add_argument("--decoder-position-embedding-type",
                        help="--task seq2seq: the decoder's encoding (default: --position-embedding-type)")
    parser.add_argument("--cross-attention-init",
                        help="--task seq2seq: random (default, as published) or self_attention: start the decoder's"
                        " new cross-attention as a copy of each layer's self-attention")
    parser.add_argument("--num-labels", type=int, help="classification heads: number of labels")
    parser.add_argument("--revision")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    _add_encoding_options(parser)
    parser.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    _check_local_path(args.source, "SRC")
    from hf_relpos.convert import CROSS_ATTENTION_INITS, SEQ2SEQ_TASK, TASKS, convert_checkpoint
    from hf_relpos.encodings import POSITION_ENCODINGS

    for flag in ("position_embedding_type", "decoder_position_embedding_type"):
        value = getattr(args, flag)
        if value is not None and value not in POSITION_ENCODINGS:
            raise UsageError(f"unknown --{flag.replace('_', '-')} {value!r}; choose one of "
                             f"{sorted(POSITION_ENCODINGS)}")
    if args.task is not None and args.task not in [*TASKS, SEQ2SEQ_TASK]:
        raise UsageError(f"unknown --task {args.task!r}; choose one of {sorted([*TASKS, SEQ2SEQ_TASK])}")
    options = {name: getattr(args, name) for name in ENCODING_OPTIONS if getattr(args, name) is not None}
    if args.decoder_position_embedding_type is not None:
        if args.task != SEQ2SEQ_TASK:
            raise UsageError("--decoder-position-embedding-type needs --task seq2seq")
        options["decoder_position_embedding_type"] = args.decoder_position_embedding_type
    if args.cross_attention_init is not None:
        if args.task != SEQ2SEQ_TASK:
            raise UsageError("--cross-attention-init needs --task seq2seq")
        if args.cross_attention_init not in CROSS_ATTENTION_INITS:
            raise UsageError(f"unknown --cross-attention-init {args.cross_attention_init!r}; choose one of "
                             f"{list(CROSS_ATTENTION_INITS)}")
        options["cross_attention_init"] = args.cross_attention_init
    if args.num_labels is not None:
        options["num_labels"] = args.num_labels
    if args.revision is not None:
        options["revision"] = args.revision
    model, report = convert_checkpoint(
        args.source, args.destination, args.position_embedding_type, args.task,
        copy_tokenizer=not args.no_tokenizer, overwrite=args.overwrite, **options,
    )
    if report.is_lossless:  # otherwise the report was already logged as a warning
        print(report)
    print(f"Saved {type(model).__name__} to {args.destination}")
    return 0


register_subcommand("convert", _add_convert)


def _add_card_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model card")
    group.add_argument("--base-model", help="the checkpoint it was converted from")
    group.add_argument("--dataset", dest="datasets", action="append", help="a training dataset (repeatable)")
    group.add_argument("--dataset-name", help="the evaluation dataset's display name")
    group.add_argument("--license", default="apache-2.0")
    group.add_argument("--language", default="en")


def _card_options(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in ("base_model", "datasets", "dataset_name", "license", "language")}


def _add_card(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "card", help="write DIR/README.md, the model card of a saved relpos model",
        description="Render the model card (Hub metadata + text) from DIR/config.json and any trainer_state.json, "
        "all_results.json or eval_results.json beside it.",
    )
    parser.add_argument("folder", metavar="DIR")
    parser.add_argument("--repo-id", help="the name shown in the card (default: the folder name)")
    _add_card_options(parser)
    parser.set_defaults(func=_run_card)


def _run_card(args: argparse.Namespace) -> int:
    _check_folder(args.folder)
    from hf_relpos.hub import write_model_card

    print(f"Wrote {write_model_card(args.folder, repo_id=args.repo_id, **_card_options(args))}")
    return 0


def _add_push(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push", help="upload a saved relpos model (safetensors, code, tokenizer, card) to the Hub",
        description="Upload exactly the files loading needs; refuses pickled weights, and symlinks or index entries "
        "that lead outside DIR. Deletes nothing in the repo unless --delete-stale. Honours HF_ENDPOINT/HF_TOKEN.",
    )
    parser.add_argument("folder", metavar="DIR")
    parser.add_argument("repo_id", metavar="REPO_ID")
    parser.add_argument("--revision")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token")
    parser.add_argument("--commit-message", default="Upload relpos model with hf_relpos")
    parser.add_argument("--create-pr", action="store_true")
    parser.add_argument("--overwrite-card", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded")
    parser.add_argument("--delete-stale", action="store_true", help="also delete files of the kinds it uploads "
                        "(weights, config, tokenizer, hf_relpos code) that the repo has and DIR does not; nothing "
                        "else in the repo is touched")
    _add_card_options(parser)
    parser.set_defaults(func=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    _check_folder(args.folder)
    from hf_relpos.hub import files_to_push, push_to_hub

    if args.dry_run:
        print("\n".join(files_to_push(args.folder)))
        return 0
    info = push_to_hub(
        args.folder, args.repo_id, revision=args.revision, private=args.private, token=args.token,
        commit_message=args.commit_message, create_pr=args.create_pr, overwrite_card=args.overwrite_card,
        delete_stale=args.delete_stale, **_card_options(args),
    )
    print(f"Pushed {args.folder} to {args.repo_id} at commit {info.oid}")
    return 0


register_subcommand("card", _add_card)
register_subcommand("push", _add_push)


def _add_extrapolate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extrapolate",
        help="perplexity (causal LM) or masked-token accuracy (masked LM) versus sequence length",
        description="Evaluate one or more saved models on a text file at several lengths and write a JSON table, a "
        "markdown table and a PNG plot (one line per model). Lengths beyond a learned absolute table are recorded "
        "as n/a with the reason.",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="local folders or Hub ids")
    parser.add_argument("--text-file", required=True, help="UTF-8 evaluation text")
    parser.add_argument("--lengths", type=int, nargs="+", required=True, help="e.g. 64 128 256 512 1024")
    parser.add_argument("--train-length", type=int, help="marked on the plot")
    parser.add_argument("--task", choices=["causal-lm", "masked-lm"], default="causal-lm")
    parser.add_argument("--mode", choices=["nonoverlapping", "sliding"], default="nonoverlapping")
    parser.add_argument("--stride", type=int, help="sliding mode: tokens scored per window (default length // 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the text")
    parser.add_argument("--mask-prob", type=float, default=0.15, help="masked-lm: fraction of tokens masked")
    parser.add_argument("--tokenizer", help="tokenizer folder/id (default: each model's own; 'bytes' for UTF-8 bytes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="extrapolation", help="writes OUTPUT.json, OUTPUT.md and OUTPUT.png")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run_extrapolate)


def _run_extrapolate(args: argparse.Namespace) -> int:
    from pathlib import Path

    for name in args.models:
        _check_local_path(name, "MODEL")
    text = Path(args.text_file).read_text(encoding="utf-8")

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from hf_relpos.extrapolation import evaluate_mlm_accuracy, evaluate_perplexity, markdown_table, plot, save_json

    auto = AutoModelForCausalLM if args.task == "causal-lm" else AutoModelForMaskedLM
    results = {}
    for name in args.models:
        model = auto.from_pretrained(name, trust_remote_code=True).to(args.device).eval()
        if args.tokenizer == "bytes":
            token_ids, mask_token_id = torch.tensor(list(text.encode("utf-8"))), None
        else:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or name, trust_remote_code=True)
            token_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
            mask_token_id = tokenizer.mask_token_id
        common = dict(batch_size=args.batch_size, max_tokens=args.max_tokens, progress=not args.no_progress,
                      on_unsupported="nan")
        if args.task == "causal-lm":
            rows = evaluate_perplexity(model, token_ids, args.lengths, mode=args.mode, stride=args.stride, **common)
        else:
            if mask_token_id is None:
                raise UsageError("--task masked-lm needs a tokenizer with a mask token")
            rows = evaluate_mlm_accuracy(model, token_ids, args.lengths, mask_token_id, mask_prob=args.mask_prob,
                                         **common)
        results[name] = rows
        for row in rows:
            if "skipped" in row:
                print(f"{name}: {row['length']}: n/a ({row['skipped']})", file=sys.stderr)
    metric = "perplexity" if args.task == "causal-lm" else "accuracy"
    save_json(results, f"{args.output}.json")
    table = markdown_table(results, metric, args.train_length)
    Path(f"{args.output}.md").write_text(table)
    plot(results, f"{args.output}.png", train_length=args.train_length, metric=metric)
    print(table)
    print(f"wrote {args.output}.json, {args.output}.md, {args.output}.png")
    return 0


register_subcommand("extrapolate", _add_extrapolate)


def _add_adapt(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "adapt", help="distil the absolute ORIGINAL into its converted copy on unlabeled text",
        description="Teach CONVERTED (a checkpoint written by `hf-relpos convert`) the word order of ORIGINAL (the "
        "absolute checkpoint it came from) by matching its hidden states and attention maps on the text of "
        "--text-file, and save it to OUT with its code, tokenizer, model card and adaptation_report.json (loss curve, "
        "held-out agreement). OUT must be new or empty (or --overwrite); it is written beside OUT and renamed into "
        "place.",
    )
    parser.add_argument("original", metavar="ORIGINAL")
    parser.add_argument("converted", metavar="CONVERTED")
    parser.add_argument("output", metavar="OUT")
    parser.add_argument("--text-file", required=True, help="UTF-8 text, one document per line")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per window; longer lines are split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--attention-weight", type=float,
                        help="weight of the attention-map term, 0 for hidden states only (default: hf_relpos.adapt's)")
    parser.add_argument("--no-group-by-length", action="store_true",
                        help="batch texts in random order (default: texts of similar length together, less padding)")
    parser.add_argument("--no-dropout", action="store_true",
                        help="run the student without dropout (default: with it, as fine-tuning will)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run_adapt)


def _run_adapt(args: argparse.Namespace) -> int:
    _check_local_path(args.original, "ORIGINAL")
    _check_local_path(args.converted, "CONVERTED")
    if not os.path.isfile(args.text_file):
        raise UsageError(f"--text-file {args.text_file} does not exist.")
    from hf_relpos.adapt import adapt_checkpoint

    weights = {} if args.attention_weight is None else {"attention_weight": args.attention_weight}
    report = adapt_checkpoint(
        args.original, args.converted, args.output, text_file=args.text_file, max_steps=args.max_steps,
        max_length=args.max_length, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
        group_by_length=not args.no_group_by_length, dropout=not args.no_dropout, overwrite=args.overwrite, **weights,
        progress=not args.no_progress,
    )
    print(report)
    print(f"Saved the adapted model to {args.output}")
    return 0


register_subcommand("adapt", _add_adapt)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Position encodings for BERT/GPT-style transformers models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in SUBCOMMANDS.values():
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, *USER_ERRORS) as error:
        _print_error(error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
