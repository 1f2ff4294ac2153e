"""Train short, test long: perplexity, masked-LM accuracy and passkey retrieval versus sequence length.

```python
>>> from hf_relpos.extrapolation import evaluate_perplexity, plot, save_json
>>> results = evaluate_perplexity(model, token_ids, lengths=[64, 128, 256, 512, 1024])
>>> save_json({"alibi": results}, "extrapolation.json")
>>> plot({"alibi": results}, "extrapolation.png", train_length=64)
```

Every function takes a 1-D `LongTensor` of an already tokenised corpus, so it works with any tokenizer (or none).

Modes of `evaluate_perplexity` (causal LMs):

- `"nonoverlapping"`: the corpus is cut into chunks of `length` tokens; every token of a chunk but its first is
  scored, with the chunk's earlier tokens as its only context (Press et al. 2022, "non-overlapping inference").
- `"sliding"`: windows of `length` tokens move by `stride`; each window scores only its last `stride` tokens, which
  therefore see `length - stride` tokens or more of left context (the first window scores all of its tokens).
  With `stride == length` it is `"nonoverlapping"`.

Every length uses the same corpus prefix (`max_tokens` of it, or all of it): the tail that does not fill a whole
chunk/window is left out, so scores at different lengths cover (nearly) the same text.

Lengths a model cannot run at: a learned `absolute` table ends at `max_position_embeddings`. By default
(`on_unsupported="raise"`) the evaluation checks every requested length *before* any forward pass and raises a
`ValueError` naming the model's `max_position_embeddings` and the length. With `on_unsupported="nan"` (what one wants
when sweeping many models) such a length is recorded as `perplexity = nan` with `"skipped": <reason>` instead; the
JSON, the markdown table and the plot show it as "n/a".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn import functional as F


MODES = ("nonoverlapping", "sliding")


# --------------------------------------------------------------------------------------------------------------------
# lengths a model supports


def max_supported_length(model) -> int | None:
    """The longest input the model's position encoding can take, or `None` when it has no limit.

    Only a learned `absolute` table has one: `max_position_embeddings - position_offset` (RoBERTa's offset). Models
    that are not relpos models are taken to have a limit when their config says `position_embedding_type="absolute"`
    (BERT, RoBERTa) or they are GPT-2-like (`n_positions`).
    """
    config = model.config
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind != "absolute":
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    return int(limit) - int(getattr(config, "position_offset", 0) or 0)


def unsupported_reason(model, length: int) -> str | None:
    """Why `model` cannot run at `length` tokens, or `None` when it can."""
    limit = max_supported_length(model)
    if limit is not None and length > limit:
        config = model.config
        return (
            f"length {length} exceeds the learned position table of position_embedding_type='absolute' "
            f"(max_position_embeddings={config.max_position_embeddings}"
            + (f", position_offset={config.position_offset}" if getattr(config, "position_offset", 0) else "")
            + f": at most {limit} positions)"
        )
    return None


def check_lengths(model, lengths: Sequence[int]) -> None:
    """Raise a `ValueError` naming `max_position_embeddings` if any of `lengths` is beyond the model's table."""
    for length in lengths:
        if int(length) < 2:
            raise ValueError(f"every length must be >= 2 tokens, got {length}.")
        reason = unsupported_reason(model, int(length))
        if reason is not None:
            raise ValueError(
                f"Cannot evaluate at {length} tokens: {reason}. Drop the longer lengths, pass on_unsupported='nan' "
                "to record them as not applicable, or convert the model to a relative encoding (alibi, rope, t5, ...)."
            )


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


def _check_on_unsupported(on_unsupported: str) -> None:
    if on_unsupported not in ("raise", "nan"):
        raise ValueError(f"on_unsupported must be 'raise' or 'nan', got {on_unsupported!r}.")


def _as_corpus(token_ids, max_tokens: int | None) -> torch.Tensor:
    token_ids = torch.as_tensor(token_ids, dtype=torch.long)
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be a 1-D tensor (one tokenised corpus), got shape {tuple(token_ids.shape)}.")
    if max_tokens is not None:
        token_ids = token_ids[: int(max_tokens)]
    return token_ids


def _progress(iterable, total: int, description: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# --------------------------------------------------------------------------------------------------------------------
# causal LM perplexity


def _windows(num_tokens: int, length: int, mode: str, stride: int) -> list[tuple[int, int]]:
    """`(start, first_scored)` of every window: the window is `[start, start + length)`, and its tokens at
    `first_scored` and after (absolute corpus indices, `> start`) are scored."""
    if num_tokens < length:
        return []
    if mode == "nonoverlapping":
        return [(start, start + 1) for start in range(0, num_tokens - length + 1, length)]
    windows = [(0, 1)]
    end = length
    while end + stride <= num_tokens:
        end += stride
        windows.append((end - length, end - stride))
    return windows


@torch.no_grad()
def evaluate_perplexity(
    model,
    token_ids,
    lengths: Sequence[int],
    mode: str = "nonoverlapping",
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
    on_unsupported: str = "raise",
) -> list[dict]:
    """Perplexity of a causal LM on `token_ids` at each of `lengths`.

    Args:
        model: a causal LM (`RelPosGPTForCausalLM` or any `AutoModelForCausalLM`) whose forward returns `logits`.
        token_ids: 1-D `LongTensor`, the tokenised evaluation corpus.
        lengths: context lengths (window sizes) to evaluate, e.g. `[L, 2L, 4L, 8L, 16L]`.
        mode: `"nonoverlapping"` or `"sliding"` (see the module docstring).
        stride: `"sliding"` only: tokens scored per window (default `length // 2`); must be in `[1, length]`.
        batch_size: windows per forward pass.
        max_tokens: evaluate only the first `max_tokens` tokens of the corpus.
        progress: show a tqdm bar per length.
        on_unsupported: `"raise"` (a `ValueError` before any forward pass) or `"nan"` (record the length as not
            applicable) for lengths beyond a learned absolute table.

    Returns:
        one dict per length: `length`, `perplexity` (`exp(nll)`), `nll` (mean negative log-likelihood per scored
        token, nats), `tokens` (tokens scored), `windows`, `mode`, `stride`; plus `skipped` (the reason) when
        the length was not applicable.
    """
    _check_mode(mode)
    _check_on_unsupported(on_unsupported)
    lengths = [int(length) for length in lengths]
    if on_unsupported == "raise":
        check_lengths(model, lengths)
    corpus = _as_corpus(token_ids, max_tokens)
    device = _device(model)
    was_training = model.training
    model.eval()
    results = []
    try:
        for length in lengths:
            window_stride = length if mode == "nonoverlapping" else int(stride if stride is not None else length // 2)
            if not 1 <= window_stride <= length:
                raise ValueError(f"stride must be in [1, length={length}], got {window_stride}.")
            row = {"length": length, "mode": mode, "stride": window_stride}
            reason = unsupported_reason(model, length)
            if reason is not None:
                results.append({**row, "perplexity": math.nan, "nll": math.nan, "tokens": 0, "windows": 0,
                                "skipped": reason})
                continue
            windows = _windows(len(corpus), length, mode, window_stride)
            if not windows:
                raise ValueError(f"the corpus has {len(corpus)} tokens, fewer than one window of {length}.")
            total_nll, total_tokens = 0.0, 0
            batches = range(0, len(windows), batch_size)
            for first in _progress(batches, len(batches), f"ppl@{length}", progress):
                chunk = windows[first:first + batch_size]
                input_ids = torch.stack([corpus[start:start + length] for start, _ in chunk]).to(device)
                logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
                targets = input_ids[:, 1:]
                nll = -torch.gather(F.log_softmax(logits, dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)
                # Target at window offset t+1 is predicted at offset t; score those at or after `first_scored`.
                offsets = torch.arange(1, length, device=device)
                first_scored = torch.tensor([scored - start for start, scored in chunk], device=device)
                scored = offsets.unsqueeze(0) >= first_scored.unsqueeze(1)
                total_nll += nll[scored].double().sum().item()
                total_tokens += int(scored.sum())
            mean = total_nll / total_tokens
            results.append({**row, "perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens,
                            "windows": len(windows)})
    finally:
        model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------------------------------
# masked LM accuracy


@torch.no_grad()
def evaluate_mlm_accuracy(
    model,
    token_ids,
    lengths: Sequence[int],
    mask_token_id: int,
    mask_prob: float = 0.15,
    seed: int = 0,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
    on_unsupported: str = "raise",
    special_token_ids: Sequence[int] = (),
) -> list[dict]:
    """Masked-token accuracy of a masked LM (`RelPosBertForMaskedLM`, ...) at each of `lengths`.

    The corpus is cut into non-overlapping chunks of `length`; in every chunk each token (but `special_token_ids`)
    is replaced by `mask_token_id` with probability `mask_prob` (at least one per chunk), drawn from a generator
    seeded with `seed` so that runs are reproducible. The model predicts the masked tokens with the whole chunk as
    context.

    Returns one dict per length: `length`, `accuracy` (argmax == original over masked tokens), `nll` (mean over
    masked tokens), `perplexity` (`exp(nll)`, the pseudo-perplexity of the masked tokens), `tokens` (masked tokens
    scored), `windows`; plus `skipped` when the length was not applicable (see `on_unsupported`).
    """
    _check_on_unsupported(on_unsupported)
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}.")
    lengths = [int(length) for length in lengths]
    if on_unsupported == "raise":
        check_lengths(model, lengths)
    corpus = _as_corpus(token_ids, max_tokens)
    device = _device(model)
    special = torch.tensor(list(special_token_ids), dtype=torch.long)
    was_training = model.training
    model.eval()
    results = []
    try:
        for length in lengths:
            row = {"length": length, "mask_prob": mask_prob}
            reason = unsupported_reason(model, length)
            if reason is not None:
                results.append({**row, "accuracy": math.nan, "nll": math.nan, "perplexity": math.nan, "tokens": 0,
                                "windows": 0, "skipped": reason})
                continue
            num_windows = len(corpus) // length
            if num_windows == 0:
                raise ValueError(f"the corpus has {len(corpus)} tokens, fewer than one window of {length}.")
            chunks = corpus[: num_windows * length].view(num_windows, length)
            generator = torch.Generator().manual_seed(seed)
            masked = torch.rand(chunks.shape, generator=generator) < mask_prob
            if special.numel():
                masked &= ~torch.isin(chunks, special)
            empty = ~masked.any(dim=1)
            if empty.any():  # at least one masked token per chunk (the first maskable one)
                maskable = ~torch.isin(chunks, special) if special.numel() else torch.ones_like(masked)
                first = maskable.float().argmax(dim=1)
                rows = torch.nonzero(empty & maskable.any(dim=1)).squeeze(1)
                masked[rows, first[rows]] = True
            correct, total, total_nll = 0, 0, 0.0
            batches = range(0, num_windows, batch_size)
            for first_row in _progress(batches, len(batches), f"mlm@{length}", progress):
                labels = chunks[first_row:first_row + batch_size].to(device)
                mask = masked[first_row:first_row + batch_size].to(device)
                input_ids = labels.masked_fill(mask, mask_token_id)
                logits = model(input_ids=input_ids).logits.float()[mask]
                targets = labels[mask]
                correct += int((logits.argmax(-1) == targets).sum())
                total_nll += F.cross_entropy(logits, targets, reduction="sum").double().item()
                total += int(mask.sum())
            mean = total_nll / max(total, 1)
            results.append({**row, "accuracy": correct / max(total, 1), "nll": mean, "perplexity": math.exp(mean),
                            "tokens": total, "windows": num_windows})
    finally:
        model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------------------------------
# passkey retrieval (Mohtashami & Jaggi 2023), on a tokenizer-free token scheme


class PasskeyScheme:
    """The token ids of the synthetic passkey task; needs a vocabulary of at least `first_free_id` tokens.

    A sample of `length` tokens is: filler, `key_marker`, the passkey (`num_digits` digit tokens), filler,
    `query_marker`, and the passkey again as the answer. The filler repeats `filler_ids` (a fixed cycle, like the
    "The grass is green. The sky is blue." of the original task), so the only thing to remember is the passkey; it
    sits at a random depth of the filler. The model must produce the answer after `query_marker`.

    Ids: digits `0..9` -> `digit_offset + d`, then `key_marker`, `query_marker`, then the filler ids.
    """

    def __init__(self, num_digits: int = 5, digit_offset: int = 0, num_filler: int = 5):
        if num_digits < 1:
            raise ValueError(f"num_digits must be >= 1, got {num_digits}.")
        self.num_digits = num_digits
        self.digit_offset = digit_offset
        self.key_marker = digit_offset + 10
        self.query_marker = digit_offset + 11
        self.filler_ids = list(range(digit_offset + 12, digit_offset + 12 + num_filler))
        self.first_free_id = digit_offset + 12 + num_filler

    def min_length(self) -> int:
        return 2 * self.num_digits + 2 + 2

    def make_batch(self, length: int, batch_size: int, generator: torch.Generator | None = None,
                   depths: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(input_ids [batch, length], labels [batch, length], passkeys [batch, num_digits])`.

        `labels` is `-100` everywhere but on the answer digits (the last `num_digits` tokens), ready for a causal
        LM's shifted loss. `depths` (fractions in [0, 1]) fix where the passkey sits; random when `None`.
        """
        if length < self.min_length():
            raise ValueError(f"a passkey sample with {self.num_digits} digits needs length >= {self.min_length()}.")
        k = self.num_digits
        filler_total = length - (2 * k + 2)  # everything but the marker, key, query marker and answer
        passkeys = torch.randint(0, 10, (batch_size, k), generator=generator)
        if depths is None:
            depth = torch.rand(batch_size, generator=generator)
        else:
            depth = torch.as_tensor(list(depths), dtype=torch.float).expand(batch_size)
        before = (depth * filler_total).long().clamp(0, filler_total)
        phase = torch.randint(0, len(self.filler_ids), (batch_size,), generator=generator)
        filler = torch.tensor(self.filler_ids)
        rows = []
        for i in range(batch_size):
            stream = filler[(torch.arange(filler_total) + phase[i]) % len(filler)]
            key = passkeys[i] + self.digit_offset
            rows.append(torch.cat([
                stream[: before[i]], torch.tensor([self.key_marker]), key, stream[before[i]:],
                torch.tensor([self.query_marker]), key,
            ]))
        input_ids = torch.stack(rows)
        labels = torch.full_like(input_ids, -100)
        labels[:, -k:] = input_ids[:, -k:]
        return input_ids, labels, passkeys


@torch.no_grad()
def passkey_accuracy(
    model,
    lengths: Sequence[int],
    scheme: PasskeyScheme | None = None,
    num_samples: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    depths: Sequence[float] | None = None,
    progress: bool = True,
    on_unsupported: str = "raise",
) -> list[dict]:
    """Passkey retrieval accuracy of a causal LM at each of `lengths` (the total tokens of a sample).

    A sample counts as retrieved when the model's greedy prediction of every answer digit is right; with teacher
    forcing that is one forward pass and equals greedy generation's exact match (greedy decoding follows the same
    path as long as every digit is right). `digit_accuracy` is the fraction of right digits. Samples are drawn
    from a generator seeded with `seed` (the same for every model); `depths` fixes the passkey depths.

    Returns one dict per length: `length`, `accuracy`, `digit_accuracy`, `samples` (plus `skipped`, see
    `evaluate_perplexity`'s `on_unsupported`).
    """
    _check_on_unsupported(on_unsupported)
    scheme = scheme or PasskeyScheme()
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and vocab < scheme.first_free_id:
        raise ValueError(f"the passkey scheme uses token ids up to {scheme.first_free_id - 1}; the model's "
                         f"vocab_size is {vocab}.")
    lengths = [int(length) for length in lengths]
    if on_unsupported == "raise":
        check_lengths(model, lengths)
    device = _device(model)
    k = scheme.num_digits
    was_training = model.training
    model.eval()
    results = []
    try:
        for length in lengths:
            reason = unsupported_reason(model, length)
            if reason is not None:
                results.append({"length": length, "accuracy": math.nan, "digit_accuracy": math.nan, "samples": 0,
                                "skipped": reason})
                continue
            generator = torch.Generator().manual_seed(seed)
            exact, digits, seen = 0, 0, 0
            batches = range(0, num_samples, batch_size)
            for first in _progress(batches, len(batches), f"passkey@{length}", progress):
                size = min(batch_size, num_samples - first)
                sample_depths = None if depths is None else [depths[(first + i) % len(depths)] for i in range(size)]
                input_ids, _, passkeys = scheme.make_batch(length, size, generator, depths=sample_depths)
                logits = model(input_ids=input_ids.to(device), use_cache=False).logits
                predicted = logits[:, -k - 1:-1].argmax(-1).cpu() - scheme.digit_offset
                right = predicted == passkeys
                exact += int(right.all(dim=1).sum())
                digits += int(right.sum())
                seen += size
            results.append({"length": length, "accuracy": exact / seen, "digit_accuracy": digits / (seen * k),
                            "samples": seen})
    finally:
        model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------------------------------
# output: JSON, markdown, plot


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN: not applicable is null (with the row's "skipped" reason)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value


def save_json(results, path) -> Path:
    """Write `results` (a list of rows, or a dict of them, e.g. `{model_name: rows}`) as JSON; NaN -> `null`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(results), indent=2, sort_keys=False) + "\n")
    return path


def load_json(path):
    """Read what `save_json` wrote; `null` metrics come back as NaN."""
    def restore(value):
        if isinstance(value, dict):
            return {key: math.nan if item is None and key in _METRICS else restore(item) for key, item in value.items()}
        if isinstance(value, list):
            return [restore(item) for item in value]
        return value

    return restore(json.loads(Path(path).read_text()))


_METRICS = ("perplexity", "nll", "accuracy", "digit_accuracy")


def markdown_table(results_by_model: dict[str, list[dict]], metric: str = "perplexity", train_length: int | None = None,
                   digits: int = 2) -> str:
    """A markdown table, one row per model and one column per length (`n/a` where not applicable).

    Column headers show the length and, with `train_length`, its multiple of it (`512 (8x)`).
    """
    lengths = sorted({row["length"] for rows in results_by_model.values() for row in rows})

    def header(length):
        if train_length:
            ratio = length / train_length
            return f"{length} ({ratio:g}x)"
        return str(length)

    lines = ["| model | " + " | ".join(header(length) for length in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for name, rows in results_by_model.items():
        by_length = {row["length"]: row for row in rows}
        cells = []
        for length in lengths:
            value = by_length.get(length, {}).get(metric)
            cells.append("n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results_by_model: dict[str, list[dict]], path, train_length: int | None = None, metric: str = "perplexity",
         title: str | None = None, log_y: bool | None = None) -> Path:
    """Plot `metric` versus length, one line per model, to a PNG at `path` (matplotlib, Agg backend).

    The x axis (length) is logarithmic, base 2; the y axis is logarithmic for perplexity (`log_y=None` picks: log
    for `perplexity`, linear otherwise). A dashed vertical line marks `train_length`. Lengths that were not
    applicable (NaN) are left out of their model's line, so `absolute` stops at its table.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if log_y is None:
        log_y = metric == "perplexity"
    figure, axes = plt.subplots(figsize=(8, 5.5), dpi=120)
    cmap = plt.get_cmap("tab20" if len(results_by_model) > 10 else "tab10")
    markers = "osD^v<>phX*P"
    for index, (name, rows) in enumerate(results_by_model.items()):
        points = sorted((row["length"], row.get(metric)) for row in rows
                        if row.get(metric) is not None and math.isfinite(row.get(metric)))
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker=markers[index % len(markers)], markersize=4, linewidth=1.5,
                  color=cmap(index % cmap.N), label=name)
    if train_length:
        axes.axvline(train_length, color="black", linestyle="--", linewidth=1, label=f"train length ({train_length})")
    axes.set_xscale("log", base=2)
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel("evaluation length (tokens)")
    axes.set_ylabel(metric.replace("_", " "))
    axes.set_title(title or f"{metric.replace('_', ' ')} vs. evaluation length")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, ncol=2, loc="best")
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


__all__ = [
    "MODES",
    "PasskeyScheme",
    "check_lengths",
    "evaluate_mlm_accuracy",
    "evaluate_perplexity",
    "load_json",
    "markdown_table",
    "max_supported_length",
    "passkey_accuracy",
    "plot",
    "save_json",
    "unsupported_reason",
]
