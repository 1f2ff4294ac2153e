"""Model cards and pushes for relpos models.

- `render_model_card(folder, ...)` / `write_model_card(folder, ...)`: the `README.md` of a saved model, Hub
  metadata (YAML) and text, from its `config.json` and, when present, Trainer's `trainer_state.json`,
  `all_results.json` / `eval_results.json` and `training_args.json` beside it.
- `files_to_push(folder)`: exactly the files loading needs (weights, config, code, tokenizer, card); refuses
  pickled weights.
- `push_to_hub(folder, repo_id, ...)`: uploads those files (and the card, written first when missing) with
  huggingface_hub's `HfApi`; `push_model_card(folder, repo_id, ...)` uploads the card alone, e.g. after
  `model.push_to_hub(repo_id)`.
"""

import glob
import json
import logging
import re
from pathlib import Path

import yaml
from huggingface_hub import CommitInfo, HfApi, ModelCard

from .encodings import get_encoding_class


TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "template.md"

PIPELINE_TAGS = {
    "ForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "ForTokenClassification": ("token-classification", "AutoModelForTokenClassification"),
    "ForQuestionAnswering": ("question-answering", "AutoModelForQuestionAnswering"),
    "ForMaskedLM": ("fill-mask", "AutoModelForMaskedLM"),
    "ForMultipleChoice": ("multiple-choice", "AutoModelForMultipleChoice"),
    "ForCausalLM": ("text-generation", "AutoModelForCausalLM"),
}

# How each family is expected to behave beyond the training length (docs/EXTRAPOLATION.md has measurements).
EXTRAPOLATION = {
    "absolute": "cannot run beyond max_position_embeddings: the learned table ends there.",
    "sinusoidal": "runs at any length, but quality is known to degrade beyond the training length.",
    "rope": "runs at any length; unscaled RoPE degrades beyond the training length (use a rope_type with scaling).",
    "xpos": "runs at any length; its decay is designed to extrapolate better than RoPE.",
    "nope": "runs at any length; a decoder orders tokens through its causal mask alone.",
}
DEFAULT_EXTRAPOLATION = "runs at any length; relative biases are expected to extrapolate beyond the training length."


def encoding_description(position_embedding_type: str) -> str:
    """The formula and paper of an encoding: its class docstring, the one place they are written."""
    doc = get_encoding_class(position_embedding_type).__doc__ or ""
    return " ".join(doc.split("\n\n")[0].split())


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _metrics(folder: Path) -> dict[str, float]:
    results = _read_json(folder / "all_results.json") or _read_json(folder / "eval_results.json") or {}
    if not results:
        state = _read_json(folder / "trainer_state.json") or {}
        for entry in state.get("log_history", []):
            results.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    return {k[len("eval_"):]: v for k, v in results.items() if k.startswith("eval_") and isinstance(v, (int, float))
            and k not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_samples")}


ARCHITECTURE_KINDS = {
    "relpos_gpt": "A decoder (GPT-2 layout)",
    "relpos_llama": "A decoder (Llama layout: RMSNorm, SwiGLU, grouped-query attention)",
}


def render_model_card(
    folder: str | Path,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    dataset_name: str | None = None,
    license: str = "apache-2.0",
    language: str | None = "en",
) -> str:
    """The `README.md` of the model saved in `folder`: YAML metadata the Hub understands and the card text."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    encoding = config.get("position_embedding_type", "absolute")
    architecture = (config.get("architectures") or ["RelPosBertModel"])[0]
    pipeline_tag, auto_class = next(
        (value for suffix, value in PIPELINE_TAGS.items() if architecture.endswith(suffix)),
        ("feature-extraction", "AutoModel"),
    )
    repo_id = repo_id or folder.name
    metrics = _metrics(folder)
    metadata: dict = {
        "library_name": "transformers",
        "pipeline_tag": pipeline_tag,
        "license": license,
        "tags": ["hf-relpos", f"position-encoding-{encoding}", config.get("model_type", "relpos")],
    }
    if language:
        metadata["language"] = [language]
    if base_model:
        metadata["base_model"] = base_model
    if datasets:
        metadata["datasets"] = list(datasets)
    if metrics:
        metadata["model-index"] = [{
            "name": repo_id,
            "results": [{
                "task": {"type": pipeline_tag},
                "dataset": {"type": (datasets or [dataset_name or "custom"])[0],
                            "name": dataset_name or (datasets or ["custom"])[0]},
                "metrics": [{"type": name, "value": value} for name, value in sorted(metrics.items())],
            }],
        }]

    state = _read_json(folder / "trainer_state.json") or {}
    args = _read_json(folder / "training_args.json") or {}
    training_lines = [f"- {key}: {args[key]}" for key in ("learning_rate", "num_train_epochs",
                      "per_device_train_batch_size", "seed") if key in args]
    for key, label in (("train_batch_size", "train_batch_size"), ("num_train_epochs", "num_train_epochs")):
        if key in state and not any(line.startswith(f"- {label}") for line in training_lines):
            training_lines.append(f"- {label}: {state[key]}")
    if state.get("global_step"):
        training_lines.append(f"- steps: {state['global_step']}")
    adaptation = _read_json(folder / "adaptation_report.json")
    if adaptation:
        training_lines.insert(0, _adaptation_line(adaptation))
    training_lines.append(f"- architecture: {architecture}, {config.get('num_hidden_layers', config.get('n_layer'))}"
                          f" layers, hidden size {config.get('hidden_size', config.get('n_embd'))}")
    length = config.get("max_position_embeddings") or config.get("n_positions")
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    evaluation = "\n".join(["| metric | value |", "|---|---|",
                            *(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))]) if metrics else (
        "No evaluation results were saved with this model.")
    card = TEMPLATE.read_text().format(
        metadata=yaml.safe_dump(metadata, sort_keys=False).strip(),
        title=repo_id,
        architecture_kind=ARCHITECTURE_KINDS.get(config.get("model_type"), "An encoder (BERT layout)"),
        encoding=encoding,
        converted_from=f", converted from `{base_model}`" if base_model else "",
        encoding_description=encoding_description(encoding),
        imports=", ".join(sorted({auto_class, *(["AutoTokenizer"] if has_tokenizer else [])})),
        load_lines="\n".join([
            # The tokenizer too: config.json names custom code, and AutoTokenizer reads it.
            *([f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)']
              if has_tokenizer else []),
            f'model = {auto_class}.from_pretrained("{repo_id}", trust_remote_code=True)',
        ]),
        training="\n".join(training_lines),
        evaluation=evaluation,
        limitations=f"Positions seen in training: up to {length} (`max_position_embeddings`). Beyond that the "
        f"model {EXTRAPOLATION.get(encoding, DEFAULT_EXTRAPOLATION)}",
    )
    ModelCard(card)  # parses the metadata as the Hub will; raises on malformed YAML
    return card


def _adaptation_line(report: dict) -> str:
    """One line stating an `hf_relpos.adapt` run (adaptation_report.json): text, steps, agreement with the teacher."""
    text = f"`{report['text_file']}` ({report['train_texts']} texts)" if report.get("text_file") else (
        f"{report['train_texts']} texts")
    targets = ("hidden states and attention maps (weight "
               f"{report['attention_weight']:g})" if report.get("attention_weight") else "hidden states")
    dropout = " with the student's dropout on" if report.get("dropout") else ""
    return (f"- Adaptation before fine-tuning (`hf_relpos.adapt`): the {targets} of `{report['teacher']}` "
            f"distilled on {text}, "
            f"{report['max_steps']} steps of {report['batch_size']} x up to {report['max_length']} tokens{dropout}; "
            f"held-out hidden-state distance to the teacher {report['before']['distance']:.3f} -> "
            f"{report['after']['distance']:.3f}, last-layer cosine {report['before']['cosine']:.3f} -> "
            f"{report['after']['cosine']:.3f}")


def write_model_card(folder: str | Path, **kwargs) -> Path:
    """Render the card of the model in `folder` and write it to `folder/README.md`."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(folder, **kwargs))
    return path


logger = logging.getLogger(__name__)

# Files that loading reads besides weights and code, when the folder has them.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
)
CARD_FILE = "README.md"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
# Pickle files: never uploaded. Trainer's own state is skipped quietly; pickled *weights* are refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TRAINING_STATE = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$")
# transformers' shard names: model-00001-of-00002.safetensors (a pattern that cannot match inside a subfolder).
SHARD_PATTERN = "model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"


class UnsafePushError(ValueError):
    """The folder cannot be pushed as it is: pickled weights, no safetensors weights, missing code files, or
    symlinks and index entries that lead outside it."""


def stale_patterns() -> list[str]:
    """What `push_to_hub(delete_stale=True)` may delete: top-level files of the kinds `files_to_push` uploads
    (config, tokenizer, safetensors weights and shards, hf_relpos's own code files). Anything else in the repo
    (other code, subfolders, pickles, ...) is never touched."""
    return [*CONFIG_FILES, *TOKENIZER_FILES, SAFE_WEIGHTS, SAFE_INDEX, SHARD_PATTERN, *_relpos_code_files()]


def _relpos_code_files() -> list[str]:
    """The files of this package that travel as remote code: `configuration_*.py`, `modeling_*.py` and what they
    import relatively."""
    from transformers.dynamic_module_utils import get_relative_imports

    package = Path(__file__).resolve().parent
    pending = [p.stem for p in package.glob("*.py") if p.name.startswith(("configuration_", "modeling_"))]
    found: set[str] = set()
    while pending:
        module = pending.pop()
        if module not in found:
            found.add(module)
            pending += get_relative_imports(package / f"{module}.py")
    return sorted(f"{module}.py" for module in found)


def _outside(folder: Path, names: list[str]) -> list[str]:
    """The `names` whose path, symlinks followed, leaves `folder`."""
    root = folder.resolve()
    return [name for name in names if not (folder / name).resolve().is_relative_to(root)]


def _code_files(folder: Path, config: dict) -> list[str]:
    """The modelling code loading needs: every module `auto_map` names, and their relative imports, recursively."""
    from transformers.dynamic_module_utils import get_relative_imports

    references = []
    for value in (config.get("auto_map") or {}).values():
        references += value if isinstance(value, (list, tuple)) else [value]
    pending = sorted({ref.rsplit(".", 1)[0] for ref in references if ref and "--" not in ref})
    needed: list[str] = []
    while pending:
        module = pending.pop()
        name = f"{module}.py"
        if name in needed:
            continue
        if not (folder / name).is_file():
            raise UnsafePushError(
                f"{folder} has no {name}, which config.json's auto_map needs to load with trust_remote_code=True. "
                "Save the model with `save_pretrained` while hf_relpos is imported so its code is copied beside it."
            )
        needed.append(name)
        pending += [m for m in get_relative_imports(folder / name) if f"{m}.py" not in needed]
    return sorted(needed)


def files_to_push(folder: str | Path) -> list[str]:
    """The files of the model saved in `folder` that loading needs, relative to it.

    `config.json` (+ `generation_config.json`), the safetensors weights (one file, or the index and every shard it
    names), the code files `auto_map` needs, the tokenizer files, and `README.md` — whichever of the optional ones
    exist. Raises `UnsafePushError` for pickled weights (`pytorch_model.bin`, `*.pt`, ...), missing safetensors
    weights or missing code files; Trainer's pickled state (`training_args.bin`, `optimizer.pt`, ...) is skipped.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the model with `save_pretrained` first.")
    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    unsafe = [name for name in pickles if not TRAINING_STATE.match(name)]
    if unsafe:
        raise UnsafePushError(
            f"Refusing to push pickled files from {folder}: {', '.join(unsafe)}. hf_relpos publishes safetensors only "
            "(pickles can run code when loaded). Re-save the model with `model.save_pretrained(folder)` (safetensors "
            "is the default) and delete the pickled files, or push from a folder without them."
        )
    if pickles:
        logger.info("Not pushing Trainer state (pickles): %s", ", ".join(pickles))
    if (folder / SAFE_INDEX).is_file():
        shards = sorted(set(json.loads((folder / SAFE_INDEX).read_text())["weight_map"].values()))
        outside = _outside(folder, shards)
        if outside:
            raise UnsafePushError(f"Refusing to push {folder}: {SAFE_INDEX} names shards outside the folder: "
                                  f"{', '.join(outside)}")
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise UnsafePushError(f"{folder}/{SAFE_INDEX} names shards that are not there: {', '.join(missing)}")
        weights = [SAFE_INDEX, *shards]
    elif (folder / SAFE_WEIGHTS).is_file():
        weights = [SAFE_WEIGHTS]
    else:
        raise UnsafePushError(f"{folder} has no {SAFE_WEIGHTS} (or {SAFE_INDEX}): nothing to push.")
    config = json.loads((folder / "config.json").read_text())
    optional = [name for name in (*CONFIG_FILES, *TOKENIZER_FILES, CARD_FILE) if (folder / name).is_file()]
    files = sorted({*optional, *weights, *_code_files(folder, config)})
    links = [f"{name} -> {(folder / name).resolve()}" for name in _outside(folder, files)]
    if links:
        raise UnsafePushError(f"Refusing to push {folder}: these symlinks lead outside it: {', '.join(links)}. "
                              "Copy the files into the folder (`cp -L`) if they are meant to be published.")
    return files


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str = "Upload relpos model with hf_relpos",
    commit_description: str | None = None,
    create_pr: bool = False,
    overwrite_card: bool = False,
    delete_stale: bool = False,
    endpoint: str | None = None,
    **card_kwargs,
) -> CommitInfo:
    """Upload the model saved in `folder` to the Hub repo `repo_id`: exactly the files `files_to_push` lists.

    The card (`README.md`) is written first when the folder has none, or when `overwrite_card` is set (e.g. to
    replace the generic card Trainer writes); `card_kwargs` go to `render_model_card` (`base_model`, `datasets`,
    `dataset_name`, `license`, `language`). The repo is created when missing (`private` applies then), and the
    branch `revision` when it does not exist yet. Nothing in the repo is deleted unless `delete_stale`: then the
    top-level files of the kinds this function uploads (`stale_patterns()`: weights and shards, index, config,
    tokenizer, hf_relpos's code files) that this folder does not have are deleted in the same commit; other files
    (a `handler.py`, subfolders, pickles) are never touched. Returns the `CommitInfo`; `.oid` is the commit to pin
    in `from_pretrained(repo_id, revision=...)`.
    """
    folder = Path(folder)
    files_to_push(folder)  # validate before anything is written or sent
    api = HfApi(endpoint=endpoint, token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    if overwrite_card or not (folder / CARD_FILE).is_file():
        write_model_card(folder, repo_id=card_kwargs.pop("repo_id", repo_id), **card_kwargs)
    files = files_to_push(folder)
    if revision is not None and revision != "main" and not create_pr and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    logger.info("Pushing to %s: %s", repo_id, ", ".join(files))
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        allow_patterns=[glob.escape(name) for name in files],
        delete_patterns=stale_patterns() if delete_stale else None,
        revision=revision,
        commit_message=commit_message,
        commit_description=commit_description,
        create_pr=create_pr,
    )


def push_model_card(
    folder: str | Path,
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str = "Add hf_relpos model card",
    endpoint: str | None = None,
    **card_kwargs,
) -> CommitInfo:
    """Render the card of the model saved in `folder` and upload it alone as `README.md` of `repo_id`.

    For repos pushed with `model.push_to_hub` / `Trainer.push_to_hub`, whose card is transformers' generic one.
    """
    card = render_model_card(folder, repo_id=card_kwargs.pop("repo_id", repo_id), **card_kwargs)
    return HfApi(endpoint=endpoint, token=token).upload_file(
        path_or_fileobj=card.encode(), path_in_repo=CARD_FILE, repo_id=repo_id, revision=revision,
        commit_message=commit_message,
    )
