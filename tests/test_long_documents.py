"""`examples/long_documents.py`: held-out passages never overlap training text, the absolute original reads at most
512 tokens, the converted models read the whole passage."""

import json
import os
import sys

import pytest


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.long_documents import main, split_passages  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_other_block_is_held_out_and_the_tail_is_dropped():
    tokens = list(range(7 * 6 + 3))
    train, held_out = split_passages(tokens, passage_length=8)  # blocks of 6 word pieces, room for [CLS] + [SEP]
    blocks = [tokens[start:start + 6] for start in range(0, 42, 6)]
    assert held_out == [blocks[1], blocks[3], blocks[5]]
    assert train == [blocks[0], blocks[2], blocks[4], blocks[6]]
    assert not {token for block in train for token in block} & {token for block in held_out for token in block}


@pytest.mark.slow
def test_the_original_truncates_to_512_and_the_converted_model_reads_the_whole_passage(tmp_path):
    summary = main(["--books", "Genesis", "Exodus", "--passage_length", "640", "--eval_lengths", "256", "640",
                    "--train_length", "128", "--train_windows_per_book", "2", "--num_train_epochs", "1",
                    "--adapt_steps", "2", "--adapt_length", "32", "--position_embedding_type", "alibi",
                    "--output_dir", str(tmp_path)])
    original, alibi = summary["results"]["absolute (original)"], summary["results"]["alibi (converted + adapted)"]
    assert (original["reads_at_most"], alibi["reads_at_most"]) == (512, 640)
    assert summary["adaptation"]["alibi"]["after"]["distance"] < summary["adaptation"]["alibi"]["before"]["distance"]
    saved = json.loads((tmp_path / "long_documents.json").read_text())
    assert set(saved["results"]) == set(summary["results"])
    assert all(0.0 <= value <= 1.0 for result in saved["results"].values()
               for value in result["accuracy_by_length"].values())
    assert (tmp_path / "long_documents.png").stat().st_size > 0
    assert "| absolute (original) | 512 |" in (tmp_path / "long_documents.md").read_text()
