"""The task examples run end to end in-process on tiny generated data that needs word order, and learn.

Tiny random BERT-layout and GPT-2-layout checkpoints (transformers' own `BertForMaskedLM` / `GPT2LMHeadModel`) are
saved to a temporary folder with a tiny word-level tokenizer, and each example converts them to another encoding.
Each test trains to a result well past what a model blind to word order reaches (stated next to each bound, with the
values seen over seeds 0-2), on one torch thread so that the figures do not depend on the machine's core count.
"""

import collections
import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DIGITS = [str(d) for d in range(10)]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORDS = ["the", "key", "is", "what", "comes", "after", "?", "a", "b", "c", "d", "e", "f", "g", "h"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A word-level tokenizer with BERT's special tokens and templates: tiny, offline, with offsets and word ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + DIGITS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]", model_max_length=128,
    )


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, tokenizer) -> str:
    """A random two-layer BERT (transformers' own class, absolute positions) saved with the tiny tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tokenizer) -> str:
    """A random two-layer GPT-2 (transformers' own class) over the tiny vocabulary, saved with it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def common_args(output_dir: Path, max_steps: int, lr: float = 1e-3, batch_size: int = 16) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--use_cpu", "--report_to", "none", "--seed", "0", "--data_seed", "0",
        "--max_steps", str(max_steps), "--learning_rate", str(lr), "--per_device_train_batch_size", str(batch_size),
        "--per_device_eval_batch_size", "32", "--logging_steps", "5", "--save_strategy", "no",
        "--warmup_steps", "0", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
    ]


def logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def assert_loss_went_down(output_dir: Path, factor: float = 0.9) -> list[float]:
    losses = logged_losses(output_dir)
    assert len(losses) >= 2, losses
    assert losses[-1] < factor * losses[0], losses
    return losses


def test_run_mlm_adapts_converted_bert(tmp_path, tiny_bert):
    rng = random.Random(0)
    # Ascending runs: a masked digit is predictable from its neighbours only by their order.
    lines = []
    for _ in range(300):
        start = rng.randrange(0, 5)
        lines.append({"text": " ".join(DIGITS[start: start + rng.randrange(4, 6)])})
    train = write_jsonl(tmp_path / "train.jsonl", lines[:260])
    valid = write_jsonl(tmp_path / "valid.jsonl", lines[260:])
    out = tmp_path / "out"
    results = load_example("run_mlm").main([
        "--model_name_or_path", tiny_bert, "--position_embedding_type", "alibi", "--train_file", train,
        "--validation_file", valid, "--max_seq_length", "32", "--do_train", "--do_eval",
        *common_args(out, max_steps=120, lr=3e-3),
    ])
    assert_loss_went_down(out, factor=0.8)
    # Ignoring the context, the best guess for a masked digit is its frequency: perplexity 7.8 on this data. Seen
    # after 120 steps, seeds 0-2: 2.9-4.5 (after 40 steps: 8.2, the frequencies only).
    counts = collections.Counter(word for line in lines[:260] for word in line["text"].split())
    frequency_only = math.exp(-sum(n / counts.total() * math.log(n / counts.total()) for n in counts.values()))
    assert results["perplexity"] < 0.8 * frequency_only, (results, frequency_only)
    config = json.loads((out / "config.json").read_text())
    assert config["position_embedding_type"] == "alibi"


@pytest.mark.slow
def test_run_clm_learns_repeating_pattern(tmp_path, tiny_gpt2):
    rng = random.Random(0)
    pattern = "1 2 3 4 5 6 7 8 9 0 " * 8
    rows = [{"text": pattern[2 * rng.randrange(10):]} for _ in range(120)]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:100])
    valid = write_jsonl(tmp_path / "valid.jsonl", rows[100:])
    out = tmp_path / "out"
    results = load_example("run_clm").main([
        "--model_name_or_path", tiny_gpt2, "--position_embedding_type", "rope", "--train_file", train,
        "--validation_file", valid, "--block_size", "32", "--do_train", "--do_eval",
        *common_args(out, max_steps=60, lr=3e-3),
    ])
    assert_loss_went_down(out, factor=0.5)
    # Uniform over the vocabulary is perplexity 30, the digits' frequencies alone 10; the next digit follows from the
    # previous one only by order. Seen: 1.14 for seeds 0-2 (2.4 at the former learning rate 1e-3).
    assert results["perplexity"] < 3.0, results


@pytest.mark.slow
def test_run_token_classification_tags_rises(tmp_path, tiny_bert):
    """Tag each digit `B-UP` when it is greater than the previous one: the label depends on the left neighbour."""
    rng = random.Random(0)
    rows = []
    for _ in range(400):
        tokens = [rng.choice(DIGITS) for _ in range(rng.randrange(5, 9))]
        tags = ["O"] + ["B-UP" if int(b) > int(a) else "O" for a, b in zip(tokens, tokens[1:], strict=False)]
        rows.append({"tokens": tokens, "tags": tags})
    train = write_jsonl(tmp_path / "train.jsonl", rows[:340])
    valid = write_jsonl(tmp_path / "valid.jsonl", rows[340:])
    out = tmp_path / "out"
    results = load_example("run_token_classification").main([
        "--model_name_or_path", tiny_bert, "--position_embedding_type", "rope", "--train_file", train,
        "--validation_file", valid, "--do_train", "--do_eval", *common_args(out, max_steps=150, lr=3e-3),
    ])
    assert_loss_went_down(out)
    # Blind to order, a model can only tag by the digit itself (a 9 usually rises, a 0 never): accuracy 0.77 and
    # F1 0.67 here. Seen with rope, seeds 0 and 1: 1.0 and 1.0. (alibi's bias is the same for the left and the
    # right neighbour in an encoder: it reached only 0.84-0.87 and 0.79-0.82, thinly above the blind guess.)
    blind_accuracy, blind_f1 = digit_only_tagging(rows[:340], rows[340:])
    assert results["eval_accuracy"] > blind_accuracy + 0.15, (results, blind_accuracy)
    assert results["eval_f1"] > blind_f1 + 0.2, (results, blind_f1)


def digit_only_tagging(train: list[dict], valid: list[dict]) -> tuple[float, float]:
    """Token accuracy and B-UP F1 on `valid` of tagging each digit with its most frequent tag in `train`."""
    counts = collections.defaultdict(collections.Counter)
    for row in train:
        for token, tag in zip(row["tokens"], row["tags"], strict=True):
            counts[token][tag] += 1
    pairs = [(counts[token].most_common(1)[0][0], tag)
             for row in valid for token, tag in zip(row["tokens"], row["tags"], strict=True)]
    hits = sum(guess == "B-UP" and tag == "B-UP" for guess, tag in pairs)
    guessed, actual = sum(guess == "B-UP" for guess, _ in pairs), sum(tag == "B-UP" for _, tag in pairs)
    return sum(guess == tag for guess, tag in pairs) / len(pairs), 2 * hits / (guessed + actual)


@pytest.mark.slow
def test_run_translation_learns_reversal(tmp_path, tiny_bert, tiny_gpt2):
    """Target = source reversed: only a model that knows positions on both sides can produce it."""
    rng = random.Random(0)
    rows = []
    for _ in range(600):
        words = [rng.choice(DIGITS) for _ in range(rng.randrange(3, 5))]
        rows.append({"source": " ".join(words), "target": " ".join(reversed(words))})
    train = write_jsonl(tmp_path / "train.jsonl", rows[:560])
    valid = write_jsonl(tmp_path / "valid.jsonl", rows[560:])
    out = tmp_path / "out"
    results = load_example("run_translation").main([
        "--encoder_name_or_path", tiny_bert, "--decoder_name_or_path", tiny_gpt2,
        "--encoder_position_embedding_type", "t5", "--decoder_position_embedding_type", "rope",
        "--train_file", train, "--validation_file", valid, "--max_target_length", "8",
        "--do_train", "--do_eval", "--predict_with_generate", *common_args(out, max_steps=400, lr=3e-3),
    ])
    assert_loss_went_down(out, factor=0.5)
    # Outputting the source unreversed scores about 10 BLEU on this data; chance is lower still. Learning is abrupt:
    # after 200 steps seeds 0 and 1 stood at 33 and 22 BLEU, after 400 at 100 and 94.
    assert results["eval_bleu"] > 60.0, results
    assert (out / "config.json").exists()


@pytest.mark.slow
def test_run_translation_bert2bert_from_one_checkpoint_learns_reversal(tmp_path, tiny_bert):
    """BERT2BERT: both halves warm-started from the one tiny BERT, t5 encoder and alibi decoder; the test file is
    scored per source length, next to copying the source."""
    rng = random.Random(0)
    rows = []
    for _ in range(640):
        words = [rng.choice(DIGITS) for _ in range(rng.randrange(3, 5))]
        rows.append({"source": " ".join(words), "target": " ".join(reversed(words))})
    train = write_jsonl(tmp_path / "train.jsonl", rows[:560])
    valid = write_jsonl(tmp_path / "valid.jsonl", rows[560:600])
    test = write_jsonl(tmp_path / "test.jsonl", rows[600:])
    out = tmp_path / "out"
    results = load_example("run_translation").main([
        "--model_name_or_path", tiny_bert, "--encoder_position_embedding_type", "t5",
        "--decoder_position_embedding_type", "alibi", "--train_file", train, "--validation_file", valid,
        "--test_file", test, "--length_bins", "3", "--max_target_length", "8", "--test_max_target_length", "8",
        "--do_train", "--do_eval", "--do_predict", "--predict_with_generate",
        *common_args(out, max_steps=200, lr=3e-3),
    ])
    assert_loss_went_down(out, factor=0.5)
    assert results["eval_bleu"] > 30.0, results  # seen: 42, 63 and 49 BLEU for seeds 0-2; copying the source: 10
    assert set(results["test_by_source_length"]) == {"<=3", ">3"}
    assert (out / "test_predictions.jsonl").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["decoder"]["model_type"] == "relpos_bert" and config["decoder"]["is_decoder"]


@pytest.mark.slow
def test_run_qa_finds_word_after_marker(tmp_path, tiny_bert):
    """The answer is the word right after `key` in the context: a span that only positions can locate."""
    rng = random.Random(0)
    fillers = DIGITS + ["a", "b", "c", "d", "e", "f", "g", "h"]
    rows = []
    for i in range(500):
        words = [rng.choice(fillers) for _ in range(rng.randrange(6, 10))]
        at = rng.randrange(0, len(words) - 1)
        words[at] = "key"
        context = " ".join(words)
        answer = words[at + 1]
        start = len(" ".join(words[: at + 1])) + 1
        assert context[start: start + len(answer)] == answer
        rows.append({"id": str(i), "question": "what comes after key ?", "context": context,
                     "answers": {"text": [answer], "answer_start": [start]}})
    train = write_jsonl(tmp_path / "train.jsonl", rows[:440])
    valid = write_jsonl(tmp_path / "valid.jsonl", rows[440:])
    out = tmp_path / "out"
    results = load_example("run_qa").main([
        "--model_name_or_path", tiny_bert, "--position_embedding_type", "rope", "--train_file", train,
        "--validation_file", valid, "--max_seq_length", "24", "--doc_stride", "8", "--max_answer_length", "3",
        "--do_train", "--do_eval", *common_args(out, max_steps=400, lr=3e-3),
    ])
    assert_loss_went_down(out, factor=0.5)
    # Chance is one of about 8 context words (12.5%). Learning this task is abrupt: the loss sits on a plateau near
    # chance, then falls within some 40 steps. With rope it fell near steps 60, 115 and 195 for seeds 0-2 (100%
    # after 300 steps), so 400 leave room. (alibi's bias cannot tell the word after `key` from the word before it in an
    # encoder: seed 0 escaped the plateau at step 100, seed 1 never did in 300 steps.)
    assert results["eval_exact_match"] > 90.0, results
