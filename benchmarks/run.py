"""Speed and memory of every position encoding against transformers' own models, as ratios measured in one run.

    python benchmarks/run.py [--quick] [--out benchmarks/results.json] [--sections train,generation,memory,llama]

Sections (see benchmarks/README.md and docs/PERFORMANCE.md for the method):

1. ``train``: forward+backward time and peak memory of ``RelPosBertModel`` per encoding (``sdpa`` and ``eager``)
   and of transformers' ``BertModel`` (sdpa and eager), ``T5EncoderModel``, ``DebertaV2Model``, ``RoFormerModel``,
   ``BloomModel`` of the same size; every time is a ratio to the faster ``BertModel``, measured paired (below).
   ``--compiled`` adds ``torch.compile(model)`` rows (``compiled``: sdpa under inductor, BertModel's too);
   ``--peers`` adds lucidrains' x-transformers ``Encoder`` (absolute, rope, alibi, t5; the ``bench`` extra).
2. ``generation``: greedy tokens/s with the KV cache, ``RelPosGPTForCausalLM`` per encoding vs ``GPT2LMHeadModel``.
3. ``memory``: inference (no_grad) peak memory versus length on the ``flex_attention`` path (alibi, relative_key)
   next to ``sdpa`` with its dense bias; flex compilation is excluded (one warm-up per shape).
4. ``llama``: ``RelPosLlamaForCausalLM`` (rope, alibi and the ``--encodings`` given) against ``LlamaForCausalLM`` of
   the same size (grouped-query attention): greedy tokens/s with the KV cache, and causal-LM train-step time.

Timings on a shared machine are noisy: every candidate run sits between two runs of the baseline (B c1 B c2 B ...,
the candidate order reversed every other round), each candidate's time is divided by the mean of its two
neighbouring baseline runs, and the median of these paired ratios over rounds is reported. Peak memory is the
high-water mark of live tensor bytes allocated during one step, from ``torch.profiler`` memory events (CPU has
no ``max_memory_allocated``).
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable


os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's start/stop lines
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_relpos import (  # noqa: E402
    POSITION_ENCODINGS,
    RelPosBertConfig,
    RelPosBertModel,
    RelPosGPTConfig,
    RelPosGPTForCausalLM,
    RelPosLlamaConfig,
    RelPosLlamaForCausalLM,
)


# Model size (`--size`): small enough for many repetitions at 2048 tokens on two CPU cores, the same for every
# model; `base` is BERT-base's widths, for a GPU.
SIZES = {"small": (256, 4, 2, 1024), "base": (768, 12, 12, 3072)}
(HIDDEN, HEADS, LAYERS, FFN), VOCAB = SIZES["small"], 8192
# Where the models run (`--device`, `--dtype`, `--batch` of the train section): CPU, fp32, batch 1 unless told.
DEVICE, DTYPE, BATCH = torch.device("cpu"), torch.float32, 1
# The generation section's widths: `--size`'s (default) or GPT-2 small's.
GENERATION_SIZES = {"gpt2": (768, 12, 12)}
# transformers' own model of the same encoding.
ANCHOR_OF = {"t5": "T5EncoderModel", "deberta": "DebertaV2Model", "rope": "RoFormerModel", "alibi": "BloomModel"}
CONTENT_ENCODINGS = ("relative_key", "relative_key_query", "deberta")
GENERATION_TARGET, TIME_TARGET, CONTENT_TIME_TARGET = 0.95, 1.10, 1.25
# Llama section: the same widths with two key/value heads (GQA); targets of the Llama issue.
LLAMA_KV_HEADS, LLAMA_TRAIN_TARGET, LLAMA_TIMED_ENCODINGS = 2, 1.05, ("rope", "alibi")
# Compiled training (`torch.compile` over sdpa) at the longest length, issue 19.
COMPILED_TIME_TARGET, COMPILED_CONTENT_TIME_TARGET = 1.3, 1.6
# x-transformers (lucidrains) `Encoder` flags per encoding: the optional peer (`pip install .[bench]`).
XTRANSFORMERS_ENCODINGS = {"absolute": {}, "rope": {"rotary_pos_emb": True}, "alibi": {"alibi_pos_bias": True},
                           "t5": {"rel_pos_bias": True}}
MiB = 2**20


# --------------------------------------------------------------------------------------------------- measurement

def configure(size: str, device: str, dtype: str, batch: int) -> None:
    """Set the model size, device, dtype and train batch that every section reads."""
    global HIDDEN, HEADS, LAYERS, FFN, DEVICE, DTYPE, BATCH
    (HIDDEN, HEADS, LAYERS, FFN), DEVICE, DTYPE, BATCH = SIZES[size], torch.device(device), getattr(torch, dtype), batch


def placed(model):
    """`model` on the configured device, its floating-point weights in the configured dtype."""
    return model.to(device=DEVICE, dtype=DTYPE)


def token_ids(length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(5, VOCAB, (batch, length), device=DEVICE)


def synchronize() -> None:
    """Wait for the device's queued kernels, so that a host clock times them (CUDA runs asynchronously)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def peak_bytes(fn: Callable[[], object]) -> int:
    """High-water mark of tensor bytes allocated (net of frees) while `fn` runs: CUDA's allocator statistics on a
    GPU, profiler memory events on CPU (which has no `max_memory_allocated`)."""
    if DEVICE.type == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
        fn()
        synchronize()
        return torch.cuda.max_memory_allocated(DEVICE) - before
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)  # kineto prints its start/stop lines on fd 2
        try:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    events = sorted(
        (event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def paired(baseline: str, fns: dict[str, Callable[[], object]], reps: int, label: str,
           on_round: Callable[[dict[str, list[float]]], None] | None = None) -> dict[str, list[float]]:
    """Per-repetition ratios candidate / baseline, the baseline run right before and right after every candidate
    (B c1 B c2 B ...), so each ratio compares runs seconds apart. Returns {name: [ratio, ...]} and the raw times
    under "seconds:<name>"; `on_round` gets the same after every round (a run stopped by a time limit keeps them)."""
    out: dict[str, list[float]] = {name: [] for name in fns if name != baseline}
    raw: dict[str, list[float]] = {name: [] for name in fns}
    names = list(out)

    def timed(name):
        synchronize()
        t0 = time.perf_counter()
        fns[name]()
        synchronize()
        seconds = time.perf_counter() - t0
        raw[name].append(seconds)
        return seconds

    for rep in range(reps):
        start = time.perf_counter()
        # No collection inside a timed run: one per round, outside the clock (on a GPU it costs more than a step).
        gc.collect()
        gc.disable()
        try:
            before = timed(baseline)
            for name in names if rep % 2 == 0 else names[::-1]:
                candidate = timed(name)
                after = timed(baseline)
                out[name].append(candidate / ((before + after) / 2))
                before = after
        finally:
            gc.enable()
        print(f"  [{label}] round {rep + 1}/{reps} ({time.perf_counter() - start:.1f} s)", flush=True)
        if on_round is not None:
            on_round({**out, **{f"seconds:{name}": values for name, values in raw.items()}})
    out.update({f"seconds:{name}": values for name, values in raw.items()})
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


# --------------------------------------------------------------------------------------------------- models

def relpos_encoder(encoding: str, kernel: str, max_len: int):
    config = RelPosBertConfig(
        position_embedding_type=encoding, vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_hidden_layers=LAYERS, intermediate_size=FFN, max_position_embeddings=max_len,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return placed(RelPosBertModel._from_config(config, attn_implementation=kernel))


def anchor_model(name: str, max_len: int):
    """transformers' own model (name, kernel): sdpa where the model supports it, else eager."""
    common = dict(vocab_size=VOCAB)
    if name.startswith("BertModel"):
        kernel = name.split(":")[1]
        config = transformers.BertConfig(
            hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS, intermediate_size=FFN,
            max_position_embeddings=max_len, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common,
        )
        return placed(transformers.BertModel._from_config(config, attn_implementation=kernel)), kernel
    if name == "T5EncoderModel":
        config = transformers.T5Config(
            d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_heads=HEADS, num_layers=LAYERS, dropout_rate=0.0,
            feed_forward_proj="gelu", **common,
        )
        cls = transformers.T5EncoderModel
    elif name == "DebertaV2Model":  # DeBERTa-v3 settings: c2p + p2c, 256 log buckets, shared keys
        config = transformers.DebertaV2Config(
            hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS, intermediate_size=FFN,
            max_position_embeddings=512, relative_attention=True, position_buckets=256, pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, type_vocab_size=0,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common,
        )
        cls = transformers.DebertaV2Model
    elif name == "RoFormerModel":
        config = transformers.RoFormerConfig(
            hidden_size=HIDDEN, embedding_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
            intermediate_size=FFN, max_position_embeddings=max_len, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **common,
        )
        cls = transformers.RoFormerModel
    elif name == "BloomModel":  # causal decoder: its alibi is causal, relpos's encoder alibi is symmetric
        config = transformers.BloomConfig(
            hidden_size=HIDDEN, n_head=HEADS, n_layer=LAYERS, hidden_dropout=0.0, attention_dropout=0.0, **common,
        )
        cls = transformers.BloomModel
    else:
        raise KeyError(name)
    kernel = "sdpa" if cls._supports_sdpa else "eager"
    return placed(cls._from_config(config, attn_implementation=kernel)), kernel


def xtransformers_encoder(encoding: str, max_len: int):
    """x-transformers' `TransformerWrapper(Encoder)` of the same size: flash (torch's sdpa) wherever the encoding
    allows it (its T5 bias does not), learned absolute positions only for `absolute`."""
    from x_transformers import Encoder, TransformerWrapper

    flags = XTRANSFORMERS_ENCODINGS[encoding]
    layers = Encoder(dim=HIDDEN, depth=LAYERS, heads=HEADS, attn_dim_head=HIDDEN // HEADS, ff_mult=FFN // HIDDEN,
                     attn_flash="rel_pos_bias" not in flags, **flags)
    return placed(TransformerWrapper(num_tokens=VOCAB, max_seq_len=max_len, attn_layers=layers,
                                     use_abs_pos_emb=encoding == "absolute"))


def train_step(model, input_ids: torch.Tensor) -> Callable[[], None]:
    def step():
        for parameter in model.parameters():
            parameter.grad = None
        hidden = model(input_ids=input_ids).last_hidden_state
        hidden.float().pow(2).mean().backward()
    return step


def xtransformers_train_step(model, input_ids: torch.Tensor) -> Callable[[], None]:
    def step():
        for parameter in model.parameters():
            parameter.grad = None
        model(input_ids, return_embeddings=True).float().pow(2).mean().backward()
    return step


# --------------------------------------------------------------------------------------------------- sections

def bench_train(lengths: list[int], reps: dict[int, int], eager_max_len: int | None = None,
                encodings: list[str] | None = None, kernels: tuple[str, ...] = ("sdpa", "eager"),
                compiled: bool = False, peers: bool = False, anchors: tuple[str, ...] = tuple(ANCHOR_OF.values()),
                save: Callable[[dict], None] | None = None) -> dict:
    """Forward+backward per (model, kernel) at each length: median seconds, peak bytes, ratios. The relpos `eager`
    rows are left out above `eager_max_len` (transformers' BertModel is always measured with both kernels).
    `compiled` adds `torch.compile(model)` rows (sdpa; BertModel's too), their first step's seconds (compilation)
    recorded; `peers` adds x-transformers' encoder for the encodings it shares (`XTRANSFORMERS_ENCODINGS`)."""
    encodings = encodings or list(POSITION_ENCODINGS)
    results = {}
    for length in lengths:
        torch.manual_seed(0)
        input_ids = token_ids(length, BATCH)
        rows, steps = {}, {}
        for name in ("BertModel:sdpa", "BertModel:eager", *anchors):
            try:
                model, kernel = anchor_model(name, length)
                rows[name] = {"model": name.split(":")[0], "kernel": kernel, "encoding": "absolute" if "Bert" in name
                              else next(e for e, a in ANCHOR_OF.items() if a == name), "family": "transformers"}
                steps[name] = train_step(model.train(), input_ids)
            except Exception as error:  # noqa: BLE001 - record and go on
                rows[name] = {"model": name, "error": repr(error)}
        if compiled:
            model, _ = anchor_model("BertModel:sdpa", length)
            rows["BertModel:compiled"] = {"model": "BertModel", "kernel": "compiled", "encoding": "absolute",
                                          "family": "transformers"}
            steps["BertModel:compiled"] = train_step(torch.compile(model.train()), input_ids)
        for encoding in encodings:
            for kernel in (*kernels, "compiled") if compiled else kernels:
                name = f"relpos:{encoding}:{kernel}"
                if kernel == "eager" and eager_max_len is not None and length > eager_max_len:
                    rows[name] = {"model": "RelPosBertModel", "encoding": encoding, "kernel": kernel,
                                  "skipped": f"not run (--eager-max-len {eager_max_len})"}
                    continue
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        model = relpos_encoder(encoding, "sdpa" if kernel == "compiled" else kernel, length)
                except ValueError as error:  # e.g. xpos is decoder-only
                    rows[name] = {"model": "RelPosBertModel", "encoding": encoding, "kernel": kernel,
                                  "skipped": str(error).split("\n")[0]}
                    continue
                rows[name] = {"model": "RelPosBertModel", "encoding": encoding, "kernel": kernel, "family": "relpos"}
                if kernel == "compiled":
                    model = torch.compile(model)
                    rows[name]["family"] = "relpos-compiled"
                steps[name] = train_step(model.train(), input_ids)
            if peers and encoding in XTRANSFORMERS_ENCODINGS:
                name = f"x-transformers:{encoding}"
                rows[name] = {"model": "x-transformers", "encoding": encoding, "family": "peer",
                              "kernel": "eager" if "rel_pos_bias" in XTRANSFORMERS_ENCODINGS[encoding] else "sdpa"}
                steps[name] = xtransformers_train_step(xtransformers_encoder(encoding, length).train(), input_ids)
        print(f"train L={length}: {len(steps)} configurations; warm-up + peak memory", flush=True)
        for name, step in list(steps.items()):
            try:
                if rows[name]["kernel"] == "compiled":
                    start = time.perf_counter()
                    step()
                    rows[name]["compile_s"] = round(time.perf_counter() - start, 1)
                    print(f"  {name}: first step (compilation) {rows[name]['compile_s']} s", flush=True)
                rows[name]["peak_bytes"] = peak_bytes(step)  # doubles as the warm-up
            except Exception as error:  # noqa: BLE001
                rows[name]["error"] = repr(error)
                del steps[name]

        def record(ratios, length=length, rows=rows, steps=steps):
            rounds = len(next(iter(ratios.values())))
            for name in steps:
                rows[name]["seconds"] = ratios[f"seconds:{name}"]
                rows[name]["median_s"] = median(ratios[f"seconds:{name}"])
                rows[name]["ratio_vs_bert_sdpa"] = 1.0 if name == "BertModel:sdpa" else median(ratios[name])
            # The baseline is the faster BertModel: sdpa, or eager when its paired ratio to sdpa is below 1.
            eager = rows["BertModel:eager"].get("ratio_vs_bert_sdpa", math.inf)
            base, factor = ("BertModel:eager", eager) if eager < 1.0 else ("BertModel:sdpa", 1.0)
            for row in rows.values():
                if "ratio_vs_bert_sdpa" not in row:
                    continue
                row["time_ratio"] = row["ratio_vs_bert_sdpa"] / factor
                same_kernel = rows.get(f"BertModel:{row['kernel']}", rows["BertModel:sdpa"])
                row["mem_ratio"] = row["peak_bytes"] / same_kernel["peak_bytes"]
                anchor = ANCHOR_OF.get(row["encoding"])
                if row["family"] == "relpos" and anchor and "ratio_vs_bert_sdpa" in rows.get(anchor, {}):
                    row["vs_anchor"] = anchor
                    row["time_vs_anchor"] = row["ratio_vs_bert_sdpa"] / rows[anchor]["ratio_vs_bert_sdpa"]
                    row["mem_vs_anchor"] = row["peak_bytes"] / rows[anchor]["peak_bytes"]
            results[str(length)] = {"baseline": base, "reps": rounds, "rows": rows}
            if save is not None:
                save(results)

        paired("BertModel:sdpa", steps, reps[length], f"train L={length}", on_round=record)
    return results


def bench_generation(encodings: list[str], new_tokens: int, reps: int, prompt: int = 32,
                     size: tuple[int, int, int] | None = None) -> dict:
    """`size` is (hidden, heads, layers), `--size`'s by default; `--generation-size gpt2` uses GPT-2 small's (768, 12,
    12)."""
    hidden, heads, layers = size or (HIDDEN, HEADS, LAYERS)
    common = dict(vocab_size=VOCAB, n_embd=hidden, n_head=heads, n_layer=layers, n_positions=1024,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    input_ids = token_ids(prompt)
    models = {"GPT2LMHeadModel": placed(transformers.GPT2LMHeadModel._from_config(
        transformers.GPT2Config(**common), attn_implementation="sdpa"))}
    for encoding in encodings:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[encoding] = placed(RelPosGPTForCausalLM._from_config(
                RelPosGPTConfig(position_embedding_type=encoding, **common), attn_implementation="sdpa"))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(input_ids))

    def generate(model):
        def call():
            with torch.no_grad():
                out = model.generate(input_ids, **kwargs)
            assert out.shape[1] == prompt + new_tokens, out.shape
        return call

    calls = {name: generate(model.eval()) for name, model in models.items()}
    for call in calls.values():
        call()  # warm-up
    ratios = paired("GPT2LMHeadModel", calls, reps, "generation")
    rows = {}
    for name in calls:
        values = ratios[f"seconds:{name}"]
        # tokens/s ratio = baseline time / candidate time, per adjacent pair
        ratio = 1.0 if name == "GPT2LMHeadModel" else median([1 / r for r in ratios[name]])
        rows[name] = {"model": "GPT2LMHeadModel" if name == "GPT2LMHeadModel" else "RelPosGPTForCausalLM",
                      "encoding": "absolute" if name == "GPT2LMHeadModel" else name, "kernel": "sdpa",
                      "seconds": values, "tokens_per_s": new_tokens / median(values), "ratio": ratio}
    return {"prompt": prompt, "new_tokens": new_tokens, "reps": reps, "rows": rows}


def bench_llama(encodings: list[str], new_tokens: int, reps: int, prompt: int = 32, train_length: int = 512) -> dict:
    """`RelPosLlamaForCausalLM` per encoding vs `LlamaForCausalLM` of the same size, both sdpa: greedy tokens/s
    with the KV cache (batch 1, `prompt` tokens) and forward+backward of the causal-LM loss at `train_length`."""
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=LLAMA_KV_HEADS,
                  num_hidden_layers=LAYERS, intermediate_size=FFN, max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(0)
    models = {"LlamaForCausalLM": placed(transformers.LlamaForCausalLM._from_config(
        transformers.LlamaConfig(**common), attn_implementation="sdpa"))}
    for encoding in encodings:
        models[encoding] = placed(RelPosLlamaForCausalLM._from_config(
            RelPosLlamaConfig(position_embedding_type=encoding, **common), attn_implementation="sdpa"))
    input_ids = token_ids(prompt)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(input_ids))

    def generate(model):
        def call():
            with torch.no_grad():
                out = model.generate(input_ids, **kwargs)
            assert out.shape[1] == prompt + new_tokens, out.shape
        return call

    train_ids = token_ids(train_length)

    def train(model):
        def step():
            for parameter in model.parameters():
                parameter.grad = None
            model(train_ids, labels=train_ids).loss.backward()
        return step

    rows = {name: {"model": "LlamaForCausalLM" if name == "LlamaForCausalLM" else "RelPosLlamaForCausalLM",
                   "encoding": "rope" if name == "LlamaForCausalLM" else name, "kernel": "sdpa"} for name in models}
    for section, make, model_mode in (("generation", generate, "eval"), ("train", train, "train")):
        calls = {name: make(getattr(model, model_mode)()) for name, model in models.items()}
        for call in calls.values():
            call()  # warm-up
        ratios = paired("LlamaForCausalLM", calls, reps, f"llama {section}")
        for name in calls:
            values = ratios[f"seconds:{name}"]
            row = rows[name]
            row[f"{section}_seconds"] = values
            if section == "generation":
                # tokens/s ratio = baseline time / candidate time, per adjacent pair
                row["tokens_per_s"] = new_tokens / median(values)
                row["generation_ratio"] = 1.0 if name == "LlamaForCausalLM" else median([1 / r for r in ratios[name]])
            else:
                row["train_ms"] = 1e3 * median(values)
                row["train_ratio"] = 1.0 if name == "LlamaForCausalLM" else median(ratios[name])
    return {"prompt": prompt, "new_tokens": new_tokens, "train_length": train_length, "reps": reps,
            "size": {**dict(zip(("hidden", "heads", "layers"), (HIDDEN, HEADS, LAYERS), strict=True)),
                     "kv_heads": LLAMA_KV_HEADS}, "rows": rows}


def growth(lengths: list[int], peaks: list[int]) -> list[float]:
    """Exponent of peak ~ L^p between consecutive lengths (1 linear, 2 quadratic)."""
    return [math.log(peaks[i + 1] / peaks[i]) / math.log(lengths[i + 1] / lengths[i]) for i in range(len(peaks) - 1)]


def bench_memory(lengths: list[int], encodings=("alibi", "relative_key"), layers: int = 1,
                 save: Callable[[dict], None] | None = None) -> dict:
    """no_grad peak memory vs length: flex (warm-up per shape excludes compilation) and sdpa with a dense bias."""
    results, models = {}, {}
    for encoding in encodings:
        for kernel in ("flex_attention", "sdpa"):
            config = RelPosBertConfig(
                position_embedding_type=encoding, vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
                num_hidden_layers=layers, intermediate_size=FFN, max_position_embeddings=max(lengths),
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            )
            model = RelPosBertModel._from_config(config, attn_implementation=kernel)
            models[f"{encoding}:{kernel}"] = placed(model).eval()
            results[f"{encoding}:{kernel}"] = {"encoding": encoding, "kernel": kernel, "layers": layers,
                                               "lengths": [], "peak_bytes": [], "warmup_s": []}
    for length in lengths:  # shortest first, so an interrupted run still leaves a curve
        input_ids = token_ids(length)
        for name, model in models.items():
            row = results[name]

            def forward(model=model, input_ids=input_ids):
                with torch.no_grad():
                    model(input_ids=input_ids)

            t0 = time.perf_counter()
            if row["kernel"] == "flex_attention":
                forward()  # compiles for this shape
            warm = time.perf_counter() - t0
            gc.collect()
            row["peak_bytes"].append(peak_bytes(forward))
            row["lengths"].append(length)
            row["warmup_s"].append(round(warm, 2))
            row["bytes_per_token"] = [p / n for p, n in zip(row["peak_bytes"], row["lengths"], strict=True)]
            row["growth_exponent"] = growth(row["lengths"], row["peak_bytes"])
            print(f"  memory {name} L={length}: peak {row['peak_bytes'][-1] / MiB:.1f} MiB "
                  f"(warm-up/compile {warm:.1f} s)", flush=True)
        if save is not None:
            save(results)
    return results


# --------------------------------------------------------------------------------------------------- report

def fmt(value, spec=".2f", suffix="x") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def targets(train: dict, generation: dict | None, memory: dict | None, llama: dict | None = None) -> dict:
    """Each issue target: met or missed, judged on the encoding's faster kernel (sdpa or eager)."""
    out = {"time": {}, "compiled_time": {}, "ahead_of_x_transformers": {}, "generation": {}, "flex_memory_linear": {},
           "llama_generation": {}, "llama_train": {}}
    for name, row in (llama or {}).get("rows", {}).items():
        if name in LLAMA_TIMED_ENCODINGS:
            out["llama_generation"][name] = {"ratio": round(row["generation_ratio"], 3), "target": GENERATION_TARGET,
                                             "met": row["generation_ratio"] >= GENERATION_TARGET}
        if name == "rope":
            out["llama_train"][name] = {"ratio": round(row["train_ratio"], 3), "target": LLAMA_TRAIN_TARGET,
                                        "met": row["train_ratio"] <= LLAMA_TRAIN_TARGET}
    for length, block in train.items():
        for row in block["rows"].values():
            if row.get("family") == "relpos-compiled" and "time_ratio" in row:
                limit = COMPILED_CONTENT_TIME_TARGET if row["encoding"] in CONTENT_ENCODINGS else COMPILED_TIME_TARGET
                out["compiled_time"].setdefault(row["encoding"], {})[length] = {
                    "ratio": round(row["time_ratio"], 3), "target": limit, "met": row["time_ratio"] <= limit}
        by_encoding: dict[str, dict] = {}
        for row in block["rows"].values():
            if row.get("family") == "relpos" and "time_ratio" in row:
                best = by_encoding.get(row["encoding"])
                if best is None or row["time_ratio"] < best["time_ratio"]:
                    by_encoding[row["encoding"]] = row
        for encoding, row in by_encoding.items():
            limit = CONTENT_TIME_TARGET if encoding in CONTENT_ENCODINGS else TIME_TARGET
            out["time"].setdefault(encoding, {})[length] = {
                "ratio": round(row["time_ratio"], 3), "kernel": row["kernel"], "target": limit,
                "met": row["time_ratio"] <= limit}
            peer = block["rows"].get(f"x-transformers:{encoding}", {})
            if "time_ratio" in peer:  # relpos's faster kernel over x-transformers' time: below 1 is ahead
                ratio = row["time_ratio"] / peer["time_ratio"]
                out["ahead_of_x_transformers"].setdefault(encoding, {})[length] = {
                    "ratio": round(ratio, 3), "kernel": row["kernel"], "met": ratio < 1.0}
    for name, row in (generation or {}).get("rows", {}).items():
        if name != "GPT2LMHeadModel":
            out["generation"][name] = {"ratio": round(row["ratio"], 3), "target": GENERATION_TARGET,
                                       "met": row["ratio"] >= GENERATION_TARGET}
    for name, row in (memory or {}).items():
        if row["kernel"] == "flex_attention" and row.get("growth_exponent"):
            last = row["growth_exponent"][-1]
            out["flex_memory_linear"][name] = {"growth_exponent_last": round(last, 3), "met": last <= 1.25}
    return out


def print_report(results: dict) -> None:
    train = results.get("train", {})
    lengths = list(train)
    if train:
        print("\n== forward+backward, batch 1: time ratio to the faster BertModel; peak-memory ratio to BertModel of "
              "the same kernel ==")
        header = f"{'model':<18}{'encoding':<20}{'kernel':<9}"
        for length in lengths:
            header += f"| L={length:<6}time   mem    vs-own "
        print(header)
        names = list(next(iter(train.values()))["rows"])
        for name in names:
            first = train[lengths[0]]["rows"][name]
            line = f"{first['model']:<18}{first.get('encoding', ''):<20}{first.get('kernel', ''):<9}"
            for length in lengths:
                row = train[length]["rows"][name]
                if "skipped" in row:
                    line += f"| {'decoder only' if 'decoder' in row['skipped'] else 'not run':<21}"
                    continue
                if "error" in row and "time_ratio" not in row:
                    line += f"| {'error':<21}"
                    continue
                line += (f"| {fmt(row['time_ratio']):<7}{fmt(row['mem_ratio']):<7}"
                         f"{fmt(row.get('time_vs_anchor')):<7}")
            print(line)
        for length in lengths:
            block = train[length]
            base = block["rows"][block["baseline"]]
            print(f"L={length}: baseline {block['baseline']} {base['median_s'] * 1e3:.0f} ms/step (median), peak "
                  f"{base['peak_bytes'] / MiB:.1f} MiB; {block['reps']} rounds of BertModel:sdpa-paired runs")
    generation = results.get("generation")
    if generation:
        print(f"\n== generation: greedy, batch 1, prompt {generation['prompt']}, {generation['new_tokens']} new tokens,"
              " sdpa, KV cache ==")
        for row in generation["rows"].values():
            print(f"{row['model']:<22}{row['encoding']:<20}{row['tokens_per_s']:8.1f} tok/s  {row['ratio']:.2f}x")
    llama = results.get("llama")
    if llama:
        size = llama["size"]
        print(f"\n== Llama layout vs LlamaForCausalLM, GQA {size['heads']}/{size['kv_heads']} heads, sdpa: greedy "
              f"batch 1, prompt {llama['prompt']}, {llama['new_tokens']} new tokens; train step at "
              f"L={llama['train_length']} ==")
        for row in llama["rows"].values():
            print(f"{row['model']:<24}{row['encoding']:<20}{row['tokens_per_s']:8.1f} tok/s  "
                  f"{row['generation_ratio']:.2f}x   train {row['train_ms']:7.1f} ms  {row['train_ratio']:.2f}x")
    memory = results.get("memory")
    if memory:
        print("\n== inference (no_grad) peak memory vs length, 1 layer, batch 1 ==")
        for name, row in memory.items():
            cells = "  ".join(f"{n}:{p / MiB:7.1f}MiB" for n, p in zip(row["lengths"], row["peak_bytes"], strict=True))
            exps = " ".join(f"{e:.2f}" for e in row.get("growth_exponent", []))
            print(f"{name:<28}{cells}  growth exponents {exps}")
    print("\n== targets (time: the encoding's faster kernel) ==")
    for kind, entries in results.get("targets", {}).items():
        for name, entry in entries.items():
            cells = entry.items() if kind in ("time", "compiled_time", "ahead_of_x_transformers") else [("", entry)]
            for length, cell in cells:
                value = cell.get("ratio", cell.get("growth_exponent_last"))
                where = f" L={length}" if length else ""
                print(f"{kind:<24}{name:<20}{where:<8}{value:7.3f}  {'met' if cell['met'] else 'MISSED'}")


def markdown_report(results: dict) -> str:
    """The tables of `print_report` in Markdown (docs/PERFORMANCE.md copies them), written beside the JSON."""
    lines = []

    def table(header: list[str], rows: list[list[str]]) -> None:
        lines.extend(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
        lines.extend("| " + " | ".join(row) + " |" for row in rows)
        lines.append("")

    for part in results["meta"].get("parts", [results["meta"]]):
        lines.append(f"- `{part['command']}`: {part['date']}, torch {part['torch']}, transformers "
                     f"{part['transformers']}, {part.get('device', 'cpu')}, {part['threads']} thread(s), "
                     f"{part.get('total_s', '?')} s")
    lines.append("")
    train = results.get("train", {})
    if train:
        lengths = list(train)
        lines.append("Training step (forward + backward): time ratio to the faster `BertModel`, peak-memory ratio to "
                     "`BertModel` of the same kernel, time ratio to transformers' model of the same encoding.")
        lines.append("")
        header = ["model", "encoding", "kernel"]
        for length in lengths:
            header += [f"L={length} time", f"L={length} mem", f"L={length} vs-own"]
        rows = []
        for name in train[lengths[0]]["rows"]:
            first = train[lengths[0]]["rows"][name]
            row = [first["model"], first.get("encoding", ""), first.get("kernel", "")]
            for length in lengths:
                cell = train[length]["rows"].get(name, {"skipped": "not run"})
                if "time_ratio" not in cell:
                    row += ["decoder only" if "decoder" in cell.get("skipped", "") else "not run", "", ""]
                else:
                    row += [fmt(cell["time_ratio"]), fmt(cell["mem_ratio"]), fmt(cell.get("time_vs_anchor"))]
            rows.append(row)
        table(header, rows)
        for length in lengths:
            block = train[length]
            base = block["rows"][block["baseline"]]
            lines.append(f"L={length}: baseline `{block['baseline']}` {base['median_s'] * 1e3:.0f} ms/step (median), "
                         f"peak {base['peak_bytes'] / MiB:.1f} MiB; {block['reps']} paired rounds.")
        lines.append("")
    generation = results.get("generation")
    if generation:
        size = generation.get("size", {})
        lines.append(f"Generation: greedy, batch 1, prompt {generation['prompt']}, {generation['new_tokens']} new "
                     f"tokens, sdpa, KV cache; hidden {size.get('hidden')}, {size.get('heads')} heads, "
                     f"{size.get('layers')} layers. Ratio: tokens/s to GPT-2's, median of paired runs.")
        lines.append("")
        table(["model", "encoding", "tokens/s", "ratio"],
              [[row["model"], row["encoding"], f"{row['tokens_per_s']:.1f}", fmt(row["ratio"])]
               for row in generation["rows"].values()])
    memory = results.get("memory")
    if memory:
        lengths = next(iter(memory.values()))["lengths"]
        lines.append("Inference (no_grad) peak memory, 1 layer, batch 1; `p`: growth exponent between lengths.")
        lines.append("")
        table(["encoding:kernel", *[f"L={length} MiB" for length in lengths], "p"],
              [[name, *[f"{peak / MiB:.1f}" for peak in row["peak_bytes"]],
                ", ".join(f"{e:.2f}" for e in row.get("growth_exponent", []))] for name, row in memory.items()])
    rows = []
    for kind, entries in results.get("targets", {}).items():
        for name, entry in entries.items():
            cells = entry.items() if kind in ("time", "compiled_time", "ahead_of_x_transformers") else [("", entry)]
            for length, cell in cells:
                value = cell.get("ratio", cell.get("growth_exponent_last"))
                limit = cell.get("target", "< 1" if kind == "ahead_of_x_transformers" else "")
                rows.append([kind, name, str(length), f"{value:.2f}", str(limit), "yes" if cell["met"] else "**no**"])
    if rows:
        lines.append("Targets (time: the encoding's faster kernel; ahead_of_x_transformers: that kernel's time over "
                     "x-transformers').")
        lines.append("")
        table(["target", "encoding", "L", "measured", "limit", "met"], rows)
    return "\n".join(lines)


def write_report(results: dict, out: str) -> None:
    """`results` as JSON at `out`, and its Markdown tables beside it (`.md`)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as handle:
        handle.write(markdown_report(results))


def encoding_list(text: str) -> list[str]:
    names = text.split(",")
    unknown = [name for name in names if name not in POSITION_ENCODINGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown encodings {unknown}; choose from {sorted(POSITION_ENCODINGS)}")
    return names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="lengths 128/512, 2 rounds, relpos eager rows at 128 only, memory for alibi at 256/512 "
                        "(a few minutes, most of it flex compilation)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"))
    parser.add_argument("--sections", default="train,generation,memory",
                        help="comma-separated subset of train,generation,memory,llama")
    parser.add_argument("--lengths", type=lambda text: [int(x) for x in text.split(",")], default=None,
                        help="train lengths, comma-separated (default 512,2048; --quick 128,512)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--eager-max-len", type=int, default=None,
                        help="leave the relpos eager rows out above this length (saves time on a slow machine)")
    parser.add_argument("--generation-size", choices=["default", *GENERATION_SIZES], default="default",
                        help="model size of the generation section: the default size, or GPT-2 small's widths")
    parser.add_argument("--encodings", type=encoding_list, default=None,
                        help="comma-separated subset of the encodings (relpos rows only; every anchor still runs)")
    parser.add_argument("--kernels", default="sdpa,eager",
                        help="relpos kernels of the train section, comma-separated (default sdpa,eager)")
    parser.add_argument("--compiled", action="store_true",
                        help="train section: add torch.compile(model) rows (sdpa) for BertModel and every encoding; "
                        "each compiles on its first step (minutes on CPU, recorded as compile_s)")
    parser.add_argument("--peers", action="store_true",
                        help="train section: add x-transformers' Encoder for absolute, rope, alibi and t5 "
                        "(pip install -e .[bench])")
    parser.add_argument("--anchors", type=lambda text: tuple(filter(None, text.split(","))),
                        default=tuple(ANCHOR_OF.values()),
                        help="transformers' models of the same encoding to run beside BertModel, comma-separated "
                        "('' for none; default all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the models run (default: cuda when torch sees a GPU, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the models' weights and activations (default float32)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="model widths: small (hidden 256, 4 heads, 2 layers; the CPU default) or base "
                        "(BERT-base: 768, 12, 12; for a GPU)")
    parser.add_argument("--batch", type=int, default=1, help="batch of the train section (default 1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="paired rounds of the train section at every length (default 5 at 512, 3 otherwise)")
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="no measuring: merge these results files (sections of separate runs) into --out, print")
    args = parser.parse_args(argv)
    if args.report:
        results = {}
        for path in args.report:
            with open(path) as handle:
                part = json.load(handle)
            results.setdefault("meta", {"parts": []})["parts"].append(part.pop("meta"))
            part.pop("targets", None)
            results.setdefault("train", {}).update(part.pop("train", {}))
            results.update(part)
        results["targets"] = targets(results.get("train", {}), results.get("generation"), results.get("memory"),
                                     results.get("llama"))
        write_report(results, args.out)
        print_report(results)
        return
    sections = set(args.sections.split(","))
    configure(args.size, args.device, args.dtype, args.batch)
    # Each encoding's `score_mod` is its own flex-attention graph: one process compiles more than dynamo's default
    # eight before it would fall back to the uncompiled kernel.
    torch._dynamo.config.recompile_limit = 256
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        train_lengths, reps = [128, 512], {128: 2, 512: 2}
        gen_encodings, new_tokens, gen_reps = ["absolute", "rope", "alibi", "t5"], 32, 2
        memory_lengths, memory_encodings = [256, 512], ("alibi",)
        if args.eager_max_len is None:
            args.eager_max_len = 128
    else:
        train_lengths, reps = [512, 2048], {512: 5, 2048: 3}
        gen_encodings, new_tokens, gen_reps = list(POSITION_ENCODINGS), 128, 5
        memory_lengths, memory_encodings = [1024, 2048, 4096, 8192], ("alibi", "relative_key")
    results = {"meta": {
        "command": "python " + shlex.join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads or torch.get_num_threads(),
        "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu", "dtype": args.dtype,
        "size": {"hidden": HIDDEN, "heads": HEADS, "layers": LAYERS, "intermediate": FFN, "vocab": VOCAB,
                 "batch": BATCH},
        "quick": args.quick}}

    def save():
        results["targets"] = targets(results.get("train", {}), results.get("generation"), results.get("memory"),
                                     results.get("llama"))
        write_report(results, args.out)

    start = time.perf_counter()
    if args.lengths:
        train_lengths = args.lengths
        reps = {length: reps.get(length, 3) for length in train_lengths}
    if args.rounds:
        reps = {length: args.rounds for length in train_lengths}
    if "train" in sections:
        def save_train(partial):
            results["train"] = partial
            save()

        results["train"] = bench_train(train_lengths, reps, args.eager_max_len, args.encodings,
                                       tuple(args.kernels.split(",")), args.compiled, args.peers, args.anchors,
                                       save=save_train)
        save()
    if args.encodings:
        gen_encodings = args.encodings
    if "generation" in sections:
        generation_size = GENERATION_SIZES.get(args.generation_size, (HIDDEN, HEADS, LAYERS))
        results["generation"] = bench_generation(gen_encodings, new_tokens, gen_reps, size=generation_size)
        results["generation"]["size"] = dict(zip(("hidden", "heads", "layers"), generation_size, strict=True))
        save()
    if "memory" in sections:
        def save_memory(partial):
            results["memory"] = partial
            save()

        results["memory"] = bench_memory(memory_lengths, memory_encodings, save=save_memory)
        save()
    if "llama" in sections:
        llama_encodings = list(dict.fromkeys([*LLAMA_TIMED_ENCODINGS, *(args.encodings or [])]))
        results["llama"] = bench_llama(llama_encodings, new_tokens, gen_reps,
                                       train_length=min(train_lengths[-1], 512))
        save()
    results["meta"]["total_s"] = round(time.perf_counter() - start, 1)
    save()
    print_report(results)
    print(f"\nwrote {args.out} in {results['meta']['total_s']:.0f} s")


if __name__ == "__main__":
    main()
