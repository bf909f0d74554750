"""Answer normalisation: numbers compare as numbers, other answers as text."""

import pytest

from icot.answers import AnswerMatcher, plain_number
from icot.cli import build_train_config
from icot.errors import UserError


@pytest.mark.parametrize("text, plain", [
    ("18", "18"), ("18.0", "18"), ("18.00", "18"), ("7.", "7"), (".5", "0.5"), ("0.50", "0.5"),
    ("1,000", "1000"), ("1,450,000", "1450000"), ("1,000.50", "1000.5"), ("$1,000.50", "1000.5"),
    ("-3", "-3"), ("-$5", "-5"), ("$-5", "-5"), ("+5", "5"), ("-0", "0"), ("-0.00", "0"), ("007", "7"),
    ("10.05", "10.05"), ("100", "100"),
])
def test_plain_numbers(text, plain):
    assert plain_number(text) == plain


@pytest.mark.parametrize("text", ["", "$", ".", "-", "1,00", "10,0000", "1 000", "1/2", "5%", "five", "+-5", "1.2.3",
                                  "1e3", "3 1"])
def test_not_one_number(text):
    assert plain_number(text) is None


@pytest.mark.parametrize("predicted, reference", [
    ("2125", "2,125"), (" 18 ", "18.00"), ("$18", "18"), ("-1,000.50", "-1000.5"), ("1200 apples", "1,200  apples"),
    ("1 3 9 4 5 4 2 1", "1 3 9 4 5 4 2 1"), ("0", "-0"),
])
def test_normalized_matches(predicted, reference):
    assert AnswerMatcher().same(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [
    ("18", "19"), ("1.8", "18"), ("-5", "5"), ("10,00", "1000"), ("1 3 9", "139"), ("0 1", "1"), ("12", "1 2"),
])
def test_normalized_mismatches(predicted, reference):
    assert not AnswerMatcher().same(predicted, reference)


def test_exact_mode_normalises_whitespace_only():
    exact = AnswerMatcher("exact")
    assert exact.same(" 1 3  9 ", "1 3 9")
    assert not exact.same("2125", "2,125") and not exact.same("18", "18.0") and not exact.same("$5", "5")


def test_unknown_mode():
    with pytest.raises(UserError, match="'fuzzy' is unknown; choose one of normalized, exact"):
        AnswerMatcher("fuzzy")


def test_training_config_chooses_the_matcher(tmp_path):
    (tmp_path / "train.txt").write_text("q||c #### 1\n")
    common = ["--data", str(tmp_path), "--out", str(tmp_path / "run")]
    trainer_cls, config = build_train_config(None, "explicit", common + ["--answer-match", "exact"])
    assert config.answer_match == "exact" and trainer_cls(config).matcher == AnswerMatcher("exact")
    _, default = build_train_config(None, "stepwise", common)
    assert default.answer_match == "normalized"
    with pytest.raises(UserError, match="answer_match: 'fuzzy' is not one of normalized, exact"):
        build_train_config(None, "explicit", common + ["--answer-match", "fuzzy"])
