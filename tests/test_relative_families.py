"""Checkpoints of relative-position families load exactly into the encoding they use, and convert to any other.

Each reference is the real thing: transformers' `RoFormerModel` and `DebertaV2Model` (and their heads) with random
weights saved as checkpoints, and for BERT's v4 `relative_key(_query)` (removed in transformers v5) the v4 formula
re-implemented here around transformers' own BERT modules. Outputs are compared on every real token of a padded
batch, in fp32, to 1e-5.
"""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import WITHOUT_HF_RELPOS, clean_env, tiny_bert_config
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DebertaV2ForQuestionAnswering,
    DebertaV2ForSequenceClassification,
    DebertaV2Model,
    RoFormerConfig,
    RoFormerForMaskedLM,
    RoFormerForQuestionAnswering,
    RoFormerForSequenceClassification,
    RoFormerModel,
)
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position as hf_make_log_bucket_position

from hf_relpos import (
    RelPosBertForMaskedLM,
    RelPosBertForQuestionAnswering,
    RelPosBertForSequenceClassification,
    RelPosBertModel,
)
from hf_relpos.cli import main as cli_main
from hf_relpos.convert import load_converted
from hf_relpos.encodings import DisentangledEncoding, make_log_bucket_position


TOLERANCE = 1e-5
SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# (reference head, relpos head, outputs compared)
HEADS = {
    "base": (RelPosBertModel, ("last_hidden_state",)),
    "masked-lm": (RelPosBertForMaskedLM, ("logits",)),
    "sequence-classification": (RelPosBertForSequenceClassification, ("logits",)),
    "question-answering": (RelPosBertForQuestionAnswering, ("start_logits", "end_logits")),
}
ROFORMER_HEADS = {"base": RoFormerModel, "masked-lm": RoFormerForMaskedLM,
                  "sequence-classification": RoFormerForSequenceClassification,
                  "question-answering": RoFormerForQuestionAnswering}
DEBERTA_HEADS = {"base": DebertaV2Model, "masked-lm": DebertaV2ForMaskedLM,
                 "sequence-classification": DebertaV2ForSequenceClassification,
                 "question-answering": DebertaV2ForQuestionAnswering}
BERT_HEADS = {"base": BertModel, "masked-lm": BertForMaskedLM,
              "sequence-classification": BertForSequenceClassification,
              "question-answering": BertForQuestionAnswering}
# DeBERTa-v2 as released (separate position projections, no LayerNorm on r, token types) and v3 (shared keys,
# LayerNorm on r, no token types, few log buckets). Inputs run past position_buckets.
DEBERTA_STYLES = {
    "v2": dict(relative_attention=True, position_biased_input=False, pos_att_type="p2c|c2p", share_att_key=False,
               norm_rel_ebd="none", position_buckets=-1, max_relative_positions=-1, max_position_embeddings=64,
               type_vocab_size=2),
    "v3": dict(relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"], share_att_key=True,
               norm_rel_ebd="layer_norm", position_buckets=8, max_relative_positions=-1, max_position_embeddings=24,
               type_vocab_size=0, legacy=False),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from their init (std 0.02 hides position terms), deterministic per seed; frozen tables (RoFormer's
    sinusoids) keep their values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def padded_batch(lengths=(21, 14, 3), vocab_size=99, pad_id=0, seed=0):
    """Right-padded ids `[batch, max(lengths)]` (token ids >= 1) and their mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad_id), mask


def max_diff(ours, theirs, key: str, mask: torch.Tensor) -> float:
    a, b = ours[key], theirs[key]
    if a.dim() >= 2 and a.shape[1] == mask.shape[1]:  # per token: real tokens only
        keep = mask.bool()
        a, b = a[keep], b[keep]
    return (a - b).abs().max().item()


def save_reference(cls, config, folder, seed: int):
    model = cls(config).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    return model


def assert_loads_exactly(reference, folder, head: str, **inputs):
    relpos_class, keys = HEADS[head]
    model = load_converted(relpos_class, folder, attn_implementation="eager").eval()
    assert model.conversion_report.newly_initialized == [] or head == "base"
    assert model.conversion_report.unused_checkpoint_weights == []
    with torch.no_grad():
        theirs, ours = reference(**inputs), model(**inputs)
    for key in keys:
        assert max_diff(ours, theirs, key, inputs["attention_mask"]) <= TOLERANCE, key
    return model


# ---------------------------------------------------------------------------------------------------------------
# RoFormer -> rope
# ---------------------------------------------------------------------------------------------------------------


def roformer_config(**overrides) -> RoFormerConfig:
    return RoFormerConfig(**{**SMALL, "embedding_size": SMALL["hidden_size"], "max_position_embeddings": 64,
                             "num_labels": 2, **overrides})


@pytest.mark.parametrize("head", list(HEADS))
def test_roformer_loads_exactly_into_rope(tmp_path, head):
    reference = save_reference(ROFORMER_HEADS[head], roformer_config(), tmp_path, seed=1)
    ids, mask = padded_batch()
    model = assert_loads_exactly(reference, tmp_path, head, input_ids=ids, attention_mask=mask)
    assert model.config.position_embedding_type == "rope"
    assert model.conversion_report.dropped_position_weights == []
    assert any("permuted" in line for line in model.conversion_report.mapped_weights)


def test_roformer_without_the_channel_permutation_would_be_wrong(tmp_path):
    # The permutation is what makes it exact: a plain copy of the same weights is far off.
    reference = save_reference(RoFormerModel, roformer_config(), tmp_path, seed=2)
    ids, mask = padded_batch()
    model = load_converted(RelPosBertModel, tmp_path).eval()
    plain = RelPosBertModel(model.config).eval()
    plain.load_state_dict(reference.state_dict(), strict=False)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask)
        wrong = plain(input_ids=ids, attention_mask=mask)
    assert max_diff(wrong, theirs, "last_hidden_state", mask) > 1e-2


@pytest.mark.parametrize("field,value", [("rotary_value", True), ("embedding_size", 16)])
def test_roformer_configs_the_encoder_cannot_reproduce_are_refused(tmp_path, field, value):
    save_reference(RoFormerModel, roformer_config(**{field: value}), tmp_path, seed=3)
    with pytest.raises(ValueError, match=field):
        load_converted(RelPosBertModel, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# DeBERTa-v2 / v3 -> deberta
# ---------------------------------------------------------------------------------------------------------------


def deberta_config(style: str, **overrides) -> DebertaV2Config:
    return DebertaV2Config(**{**SMALL, **DEBERTA_STYLES[style], "num_labels": 2, "pooler_dropout": 0.0,
                              **overrides})


@pytest.mark.parametrize("style", list(DEBERTA_STYLES))
@pytest.mark.parametrize("head", list(HEADS))
def test_deberta_loads_exactly_into_deberta(tmp_path, style, head):
    reference = save_reference(DEBERTA_HEADS[head], deberta_config(style), tmp_path, seed=4)
    ids, mask = padded_batch()
    model = assert_loads_exactly(reference, tmp_path, head, input_ids=ids, attention_mask=mask)
    config = model.config
    assert config.position_embedding_type == "deberta"
    assert (config.share_att_key, config.norm_rel_ebd) == (
        DEBERTA_STYLES[style]["share_att_key"], DEBERTA_STYLES[style]["norm_rel_ebd"])
    assert model.conversion_report.dropped_position_weights == []


def test_deberta_v3_shares_the_layers_query_and_key_projections(tmp_path):
    save_reference(DebertaV2Model, deberta_config("v3"), tmp_path, seed=5)
    model = load_converted(RelPosBertModel, tmp_path)
    encoding = model.position_encoding
    assert not any("pos_key_proj" in name or "pos_query_proj" in name for name, _ in model.named_parameters())
    key_proj, query_proj = encoding.projection_modules(1)
    assert key_proj is model.encoder.layer[1].attention.self.key
    assert query_proj is model.encoder.layer[1].attention.self.query


def test_deberta_absolute_table_beside_relative_attention_is_reported_as_dropped(tmp_path):
    # position_biased_input=True adds an absolute table too: the relpos encoder has one encoding, so it is dropped.
    save_reference(DebertaV2Model, deberta_config("v2", position_biased_input=True), tmp_path, seed=6)
    model = load_converted(RelPosBertModel, tmp_path)
    assert model.conversion_report.dropped_position_weights == ["embeddings.position_embeddings.weight"]
    assert not model.conversion_report.is_lossless


def test_deberta_with_a_convolution_layer_is_refused(tmp_path):
    save_reference(DebertaV2Model, deberta_config("v2", conv_kernel_size=3), tmp_path, seed=6)
    with pytest.raises(ValueError, match="conv_kernel_size"):
        load_converted(RelPosBertModel, tmp_path)


def test_deberta_c2p_only_matches_transformers(tmp_path):
    reference = save_reference(DebertaV2Model, deberta_config("v2", pos_att_type=["c2p"]), tmp_path, seed=7)
    ids, mask = padded_batch()
    model = assert_loads_exactly(reference, tmp_path, "base", input_ids=ids, attention_mask=mask)
    assert model.position_encoding.scaling(8) == pytest.approx((2 * 8) ** -0.5)


def test_deberta_log_buckets_equal_transformers_over_every_config():
    # Issue 13: fp64 logs (math.log) read another row than DebertaV2Model's fp32 torch.log in 1,442 of these 14,400
    # configs, wherever the ratio of logs rounds differently.
    mismatched = []
    for position_buckets in range(2, 66):
        mid = position_buckets // 2
        for max_relative_positions in range(mid + 2, mid + 227):
            relative = torch.arange(-max_relative_positions - 2, max_relative_positions + 3)
            ours = make_log_bucket_position(relative, position_buckets, max_relative_positions)
            theirs = hf_make_log_bucket_position(relative, position_buckets, max_relative_positions).long()
            if not torch.equal(ours, theirs):
                mismatched.append((position_buckets, max_relative_positions))
    assert mismatched == []


# ---------------------------------------------------------------------------------------------------------------
# The DeBERTa projection cache (issue 13)
# ---------------------------------------------------------------------------------------------------------------


def test_deberta_cache_follows_writes_through_data(tmp_path):
    save_reference(DebertaV2Model, deberta_config("v2"), tmp_path, seed=8)
    model = load_converted(RelPosBertModel, tmp_path).eval()
    ids, mask = padded_batch()
    projection = model.position_encoding.pos_key_proj[0].weight
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
        version, pointer = projection._version, projection.data_ptr()
        projection.data.mul_(-1.0)  # bumps no version counter, keeps the pointer
        assert (projection._version, projection.data_ptr()) == (version, pointer)
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.position_encoding._projections.clear()
        fresh = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh, atol=0, rtol=0)


def test_deberta_step_that_continues_a_kv_cache_reuses_the_kept_projections_unchecked(tmp_path):
    save_reference(DebertaV2Model, deberta_config("v2"), tmp_path, seed=8)
    encoding = load_converted(RelPosBertModel, tmp_path).eval().position_encoding
    with torch.no_grad():
        kept = encoding.position_projections(0, torch.float32)
        encoding.pos_key_proj[0].weight.data.mul_(-1.0)
        assert encoding.position_projections(0, torch.float32, continues_cache=True) is kept
        recomputed = encoding.position_projections(0, torch.float32)
    assert recomputed is not kept and not torch.equal(recomputed[0], kept[0])


# ---------------------------------------------------------------------------------------------------------------
# BERT v4 relative_key / relative_key_query -> ours
# ---------------------------------------------------------------------------------------------------------------


def v4_encoder(bert: BertModel, tables: list[torch.Tensor], kind: str, input_ids, attention_mask) -> torch.Tensor:
    """BERT's encoder with transformers v4's relative attention (Huang et al. 2020), independent of hf_relpos:
    `scores = (q k^T + einsum("bhld,lrd->bhlr", q, E[l - r + max_pos - 1]) [+ einsum("bhrd,lrd->bhlr", k, E)])
    / sqrt(d)`, and no absolute positions in the embeddings."""
    config = bert.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    embeddings = bert.embeddings
    hidden = embeddings.word_embeddings(input_ids) + embeddings.token_type_embeddings(torch.zeros_like(input_ids))
    hidden = embeddings.LayerNorm(hidden)
    length = input_ids.shape[1]
    distance = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    additive = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for layer, table in zip(bert.encoder.layer, tables, strict=True):
        attention = layer.attention.self

        def split(x):
            return x.view(*x.shape[:2], heads, head_dim).transpose(1, 2)

        q, k, v = split(attention.query(hidden)), split(attention.key(hidden)), split(attention.value(hidden))
        positional = table[distance + config.max_position_embeddings - 1]
        scores = q @ k.transpose(-1, -2) + torch.einsum("bhld,lrd->bhlr", q, positional)
        if kind == "relative_key_query":
            scores = scores + torch.einsum("bhrd,lrd->bhlr", k, positional)
        probabilities = (scores / math.sqrt(head_dim) + additive).softmax(-1)
        context = (probabilities @ v).transpose(1, 2).reshape(hidden.shape)
        attention_output = layer.attention.output(context, hidden)
        hidden = layer.output(layer.intermediate(attention_output), attention_output)
    return hidden


def v4_outputs(reference, head: str, hidden: torch.Tensor) -> dict:
    if head == "base":
        return {"last_hidden_state": hidden}
    if head == "masked-lm":
        return {"logits": reference.cls(hidden)}
    if head == "sequence-classification":
        return {"logits": reference.classifier(reference.bert.pooler(hidden))}
    start, end = reference.qa_outputs(hidden).split(1, dim=-1)
    return {"start_logits": start.squeeze(-1), "end_logits": end.squeeze(-1)}


def save_v4_checkpoint(folder, kind: str, head: str, seed: int):
    """A BERT checkpoint as transformers v4 wrote it with `position_embedding_type=kind`: BERT's weights (the unused
    absolute table included) plus `distance_embedding` `[2 max_pos - 1, head_dim]` in every layer."""
    config = BertConfig(**SMALL, max_position_embeddings=32, position_embedding_type=kind, num_labels=2)
    reference = save_reference(BERT_HEADS[head], config, folder, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    head_dim = config.hidden_size // config.num_attention_heads
    tables = [torch.randn(2 * config.max_position_embeddings - 1, head_dim, generator=generator)
              for _ in range(config.num_hidden_layers)]
    weights = load_file(folder / "model.safetensors")
    prefix = "" if head == "base" else "bert."
    for layer, table in enumerate(tables):
        weights[f"{prefix}encoder.layer.{layer}.attention.self.distance_embedding.weight"] = table
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return reference, tables


@pytest.mark.parametrize("kind", ["relative_key", "relative_key_query"])
@pytest.mark.parametrize("head", list(HEADS))
def test_v4_relative_bert_loads_exactly(tmp_path, kind, head):
    reference, tables = save_v4_checkpoint(tmp_path, kind, head, seed=9)
    ids, mask = padded_batch()
    model = load_converted(HEADS[head][0], tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        bert = reference if head == "base" else reference.bert
        theirs = v4_outputs(reference, head, v4_encoder(bert, tables, kind, ids, mask))
        ours = model(input_ids=ids, attention_mask=mask)
    for key in HEADS[head][1]:
        assert max_diff(ours, theirs, key, mask) <= TOLERANCE, key
    report = model.conversion_report
    assert model.config.position_embedding_type == kind and model.config.max_relative_positions == 31
    assert report.dropped_position_weights == [f"{'' if head == 'base' else 'bert.'}embeddings.position_embeddings"
                                               ".weight"]
    assert report.unused_checkpoint_weights == [] and report.added_position_weights == []


# ---------------------------------------------------------------------------------------------------------------
# Plain from_pretrained never loads them silently wrong
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["roformer", "deberta-v2", "bert-relative_key"])
def test_plain_from_pretrained_of_a_relative_family_points_to_convert(tmp_path, family):
    if family == "roformer":
        save_reference(RoFormerModel, roformer_config(), tmp_path, seed=10)
    elif family == "deberta-v2":
        save_reference(DebertaV2Model, deberta_config("v3"), tmp_path, seed=10)
    else:
        save_v4_checkpoint(tmp_path, "relative_key", "base", seed=10)
    with pytest.raises(ValueError, match="hf-relpos convert"):
        RelPosBertForSequenceClassification.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# ... and convert to any other encoding, with the usual report
# ---------------------------------------------------------------------------------------------------------------


def test_deberta_v3_converts_to_alibi(tmp_path):
    save_reference(DebertaV2ForSequenceClassification, deberta_config("v3"), tmp_path, seed=11)
    model = load_converted(RelPosBertForSequenceClassification, tmp_path, "alibi")
    report = model.conversion_report
    assert model.config.position_embedding_type == "alibi"
    assert report.config_changes["position_embedding_type"] == "deberta -> alibi"
    assert report.dropped_position_weights == [
        "bert.embeddings.position_embeddings.LayerNorm.bias", "bert.embeddings.position_embeddings.LayerNorm.weight",
        "bert.embeddings.position_embeddings.rel_embeddings.weight",
    ]
    assert report.newly_initialized == [] and report.unused_checkpoint_weights == []
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()


def test_roformer_converts_to_t5(tmp_path):
    reference = save_reference(RoFormerForMaskedLM, roformer_config(), tmp_path, seed=12)
    model = load_converted(RelPosBertForMaskedLM, tmp_path, "t5")
    report = model.conversion_report
    assert report.config_changes["position_embedding_type"] == "rope -> t5"
    assert report.added_position_weights == ["bert.embeddings.position_embeddings.relative_attention_bias"]
    assert report.dropped_position_weights == [] and report.newly_initialized == []
    assert report.ignored_buffers == ["bert.encoder.embed_positions.weight"]
    # Every other weight is the checkpoint's (query/key rows in the rotate-half order).
    ours, theirs = model.bert.encoder.layer[1].output.dense, reference.roformer.encoder.layer[1].output.dense
    assert torch.equal(ours.weight, theirs.weight)


# ---------------------------------------------------------------------------------------------------------------
# hf-relpos convert on each family: a folder that loads anywhere with trust_remote_code
# ---------------------------------------------------------------------------------------------------------------

LOADER = WITHOUT_HF_RELPOS + textwrap.dedent(
    """
    import json, sys

    import torch
    import transformers

    results = {}
    for case in json.load(open(sys.argv[1])):
        saved = torch.load(case["folder"] + "/reference.pt")
        auto_class = getattr(transformers, case["auto_class"])
        model = auto_class.from_pretrained(case["folder"], trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(**saved["inputs"])
        keep = saved["inputs"]["attention_mask"].bool()
        results[case["folder"]] = max((out[key][keep] - value[keep]).abs().max().item()
                                      for key, value in saved["outputs"].items())
    print("RESULTS" + json.dumps(results))
    print("BLOCKED" + str("hf_relpos" not in sys.modules))
    """
)


@pytest.mark.slow
def test_cli_convert_of_each_family_loads_with_remote_code(tmp_path):
    ids, mask = padded_batch()
    references = {
        "roformer": (save_reference(RoFormerForMaskedLM, roformer_config(), tmp_path / "roformer", 13), "rope",
                     "AutoModelForMaskedLM", "logits"),
        "deberta": (save_reference(DebertaV2ForMaskedLM, deberta_config("v3"), tmp_path / "deberta", 13),
                    "deberta", "AutoModelForMaskedLM", "logits"),
        "v4": (None, "relative_key_query", "AutoModel", "last_hidden_state"),
    }
    v4_reference, v4_tables = save_v4_checkpoint(tmp_path / "v4", "relative_key_query", "base", seed=13)
    manifest = []
    for name, (reference, encoding, auto_class, key) in references.items():
        destination = tmp_path / f"{name}-converted"
        assert cli_main(["convert", str(tmp_path / name), str(destination), "--position-embedding-type",
                         encoding]) == 0
        with torch.no_grad():
            if reference is None:
                expected = v4_encoder(v4_reference, v4_tables, encoding, ids, mask)
            else:
                expected = getattr(reference(input_ids=ids, attention_mask=mask), key)
        torch.save({"inputs": {"input_ids": ids, "attention_mask": mask}, "outputs": {key: expected}},
                   destination / "reference.pt")
        manifest.append({"folder": str(destination), "auto_class": auto_class})
    report = json.loads((tmp_path / "roformer-converted" / "conversion_report.json").read_text())
    assert "permuted" in " ".join(report["mapped_weights"])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    env = clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules_cache"))
    run = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "manifest.json")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULTS"))[7:])
    assert "BLOCKEDTrue" in run.stdout
    assert set(results) == {case["folder"] for case in manifest}
    assert max(results.values()) <= TOLERANCE, results


def test_disentangled_encoding_default_is_todays_deberta():
    # Configs that set none of DeBERTa's options keep the encoding they had: both terms, separate projections, r
    # layer-normed.
    encoding = DisentangledEncoding(tiny_bert_config(position_embedding_type="deberta"), causal=False)
    assert encoding.terms == ["c2p", "p2c"] and not encoding.share_att_key and encoding.LayerNorm is not None
    assert len(encoding.pos_key_proj) == len(encoding.pos_query_proj) == 2
