"""Model cards for relpos models: Hub metadata (YAML) and text, rendered from a saved model folder.

`write_model_card(folder)` reads `config.json` and, when present, Trainer's `trainer_state.json`,
`all_results.json` / `eval_results.json` and `training_args.json` beside it.
"""

import json
from pathlib import Path

import yaml
from huggingface_hub import ModelCard

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
    if state.get("global_step"):
        training_lines.append(f"- steps: {state['global_step']}")
    length = config.get("max_position_embeddings") or config.get("n_positions")
    evaluation = "\n".join(["| metric | value |", "|---|---|",
                            *(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))]) if metrics else (
        "No evaluation results were saved with this model.")
    card = TEMPLATE.read_text().format(
        metadata=yaml.safe_dump(metadata, sort_keys=False).strip(),
        title=repo_id,
        architecture_kind="decoder (GPT-2 layout)" if config.get("model_type") == "relpos_gpt"
        else "encoder (BERT layout)",
        encoding=encoding,
        converted_from=f", converted from `{base_model}`" if base_model else "",
        encoding_description=encoding_description(encoding),
        auto_class=auto_class,
        repo_id=repo_id,
        training="\n".join(training_lines) or "Training settings were not saved with this model.",
        evaluation=evaluation,
        limitations=f"Positions seen in training: up to {length} (`max_position_embeddings`). Beyond that the "
        f"model {EXTRAPOLATION.get(encoding, DEFAULT_EXTRAPOLATION)}",
    )
    ModelCard(card)  # parses the metadata as the Hub will; raises on malformed YAML
    return card


def write_model_card(folder: str | Path, **kwargs) -> Path:
    """Render the card of the model in `folder` and write it to `folder/README.md`."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(folder, **kwargs))
    return path
