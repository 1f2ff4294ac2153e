"""`examples/demo.py`'s arguments: how many steps each encoding adapts for."""

import os
import sys

import pytest


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.demo import parse_args  # noqa: E402


def test_by_default_alibi_adapts_for_1400_steps_and_the_others_for_1100():
    assert parse_args([]).adapt_steps == {"alibi": 1400, "rope": 1100, "t5": 1100}
    assert parse_args(["--position_embedding_type", "rope"]).adapt_steps == {"rope": 1100}


def test_one_count_applies_to_every_encoding_and_an_encoding_count_overrides_it():
    assert parse_args(["--adapt_steps", "900"]).adapt_steps == {"alibi": 900, "rope": 900, "t5": 900}
    assert parse_args(["--adapt_steps", "900", "t5=5"]).adapt_steps == {"alibi": 900, "rope": 900, "t5": 5}


@pytest.mark.parametrize("values, message", [
    (["0"], "--adapt_steps takes N or ENCODING=N with N >= 1"),
    (["alibi=many"], "--adapt_steps takes N or ENCODING=N with N >= 1"),
    (["900", "kerple=5"], "ENCODING one of ['alibi', 'rope', 't5'], got 'kerple=5'"),
    (["alibi=5"], "--adapt_steps gives no count for ['rope', 't5']"),
])
def test_a_bad_adapt_steps_value_is_an_error_that_names_the_field(values, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--adapt_steps", *values])
    assert message in capsys.readouterr().err
