"""Direct tests of data/mult.py and data/tokenizers.py, written for their mutants (issue 50): each calls a
function with values whose expected result is written out here by hand or computed independently (the
running column values from a digit-by-digit long multiplication). No model and no CLI, so that one mutant
is judged in a second or two."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import icot.data.tokenizers as tokenizers_module
from icot.data.format import Example
from icot.data.mult import (
    MultTask,
    _digits,
    _draw_distinct,
    describe_task,
    mult_example,
    operand_digits,
    parse_number,
    parse_operands,
    running_values,
    sample_splits,
    task_label,
)
from icot.data.tokenizers import (
    ARITHMETIC_WORDS,
    EOS,
    MAX_VOCAB,
    UNK,
    ensure_special_tokens,
    load_tokenizer,
    portable_config,
    save_tokenizer,
    train_bpe,
    word_tokenizer,
)
from icot.errors import UserError

# ----- data/mult.py ----------------------------------------------------------------------------------


def test_digits_pads_with_zeros_and_writes_the_least_significant_digit_first():
    assert _digits(5, 3) == "5 0 0"
    assert _digits(1234, 2) == "4 3 2 1"
    assert _digits(0, 1) == "0"


def test_mult_example_two_by_two_has_no_running_sum():
    # 12 * 34: partial 0 = 12*4 = 48 (3 digits), partial 1 = 12*3*10 = 360 (4 digits), answer 408 (4 digits)
    assert mult_example(12, 34) == Example("2 1 * 4 3", "8 4 0 + 0 6 3 0", "8 0 4 0")


def test_mult_example_writes_the_running_sum_between_partials_but_not_after_the_last():
    # 12 * 345: partials 60, 480, 3600; running sum after partial 1 = 540; answer 4140
    assert mult_example(12, 345) == Example("2 1 * 5 4 3", "0 6 0 + 0 8 4 0 ( 0 4 5 0 ) + 0 0 6 3 0", "0 4 1 4 0")


def test_mult_example_one_digit_multiplier_is_partial_zero_alone():
    assert mult_example(7, 8) == Example("7 * 8", "6 5", "6 5")
    assert mult_example(905, 3) == Example("5 0 9 * 3", "5 1 7 2", "5 1 7 2")


def reference_column_values(a_digits, b_digits, rows, width):
    """ĉ_k for k < width by long multiplication: S_k = the column products of columns <= k, each times
    10^column; ĉ_k = S_k // 10^k."""
    products = [0] * (width + len(a_digits) + len(b_digits))
    for j in rows:
        for i, digit in enumerate(a_digits):
            products[i + j] += digit * b_digits[j]
    return [sum(products[c] * 10**c for c in range(k + 1)) // 10**k for k in range(width)]


def reference_running_values(a, b):
    """The CoT and answer values, word by word along mult_example(a, b): NaN for '+', '(' and ')'."""
    a_digits, b_digits = [int(d) for d in reversed(str(a))], [int(d) for d in reversed(str(b))]
    n, m = len(a_digits), len(b_digits)
    cot = []
    for i in range(m):
        width = n + 1 + i
        if i > 0:
            cot.append(np.nan)
        cot += reference_column_values(a_digits, b_digits, [i], width)
        if 0 < i < m - 1:
            cot += [np.nan] + reference_column_values(a_digits, b_digits, range(i + 1), width) + [np.nan]
    return cot, reference_column_values(a_digits, b_digits, range(m), n + m)


def test_running_values_by_hand_for_12_times_34():
    cot, answer = running_values([2, 1], [4, 3])
    np.testing.assert_array_equal(cot, [[8, 4, 0, np.nan, 0, 6, 3, 0]])
    np.testing.assert_array_equal(answer, [[8, 10, 4, 0]])  # column 1: 4 + 6 = 10, carry 1 into column 2
    assert cot.dtype == np.float32 and answer.dtype == np.float32


@pytest.mark.parametrize("pairs", [[(99, 99), (10, 10), (57, 86)], [(999, 9999), (123, 4567)],
                                   [(9999, 999), (1000, 100)], [(9, 9), (3, 7)], [(98765, 98765)]])
def test_running_values_match_long_multiplication_and_the_words_of_the_example(pairs):
    a_digits = [[int(d) for d in reversed(str(a))] for a, _ in pairs]
    b_digits = [[int(d) for d in reversed(str(b))] for _, b in pairs]
    cot, answer = running_values(np.array(a_digits), np.array(b_digits))
    assert cot.shape[0] == answer.shape[0] == len(pairs)
    for row, (a, b) in enumerate(pairs):
        want_cot, want_answer = reference_running_values(a, b)
        np.testing.assert_array_equal(cot[row], np.array(want_cot, dtype=np.float32))
        np.testing.assert_array_equal(answer[row], np.array(want_answer, dtype=np.float32))
        example = mult_example(a, b)
        words = example.cot.split()
        assert len(words) == cot.shape[1]
        for word, value in zip(words, cot[row]):
            assert np.isnan(value) if not word.isdigit() else int(value) % 10 == int(word)
        assert [int(v) % 10 for v in answer[row]] == [int(w) for w in example.answer.split()]


def test_running_values_takes_one_pair_as_flat_lists():
    cot, answer = running_values([2, 1], [5, 4, 3])
    want_cot, want_answer = reference_running_values(12, 345)
    np.testing.assert_array_equal(cot, [want_cot])
    np.testing.assert_array_equal(answer, [want_answer])


def test_operand_digits_and_parse_operands_read_least_significant_first():
    assert operand_digits("9 1 7 3 * 9 4 3 3") == ([9, 1, 7, 3], [9, 4, 3, 3])
    assert parse_operands("9 1 7 3 * 9 4 3 3") == (3719, 3349)
    assert parse_operands("5 * 0 1") == (5, 10)
    assert parse_operands("0 1 * 7") == (10, 7)


@pytest.mark.parametrize("question, message", [
    ("1 2", "expected 'DIGITS \\* DIGITS'"),
    ("1 * 2 * 3", "expected 'DIGITS \\* DIGITS'"),
    ("12 * 3", "operands must be single digits separated by spaces"),
    ("1 a * 3", "operands must be single digits separated by spaces"),
    ("1  2 * 3", "operands must be single digits separated by spaces"),
    ("1 * ", "operands must be single digits separated by spaces"),
])
def test_operand_digits_refuses_anything_else(question, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        operand_digits(question)
    with pytest.raises(ValueError, match=f"^{message}$"):
        parse_operands(question)


def test_parse_number():
    assert parse_number(" 3719\n") == 3719
    assert parse_number("007") == 7
    for bad, shown in [("-3", "-3"), ("3.5", "3.5"), ("", ""), (" x ", "x"), ("١٢", "١٢")]:
        with pytest.raises(ValueError, match=f"^'{shown}' is not a non-negative whole number$"):
            parse_number(bad)


def test_mult_task_parse():
    assert MultTask.parse("4x4") == MultTask(4, 4)
    assert MultTask.parse("3X5") == MultTask(3, 5)
    assert MultTask.parse("1x12") == MultTask(1, 12)
    for bad in ["4", "4x4x4", "0x3", "3x0", "ax3", "", "x", "-1x3"]:
        with pytest.raises(UserError, match=r"^--digits '.*': expected AxB with whole numbers A, B >= 1, e\.g\. "
                                            r"4x4 or 3x5$") as caught:
            MultTask.parse(bad)
        assert repr(bad) in str(caught.value)


def test_mult_task_contains_pair_and_index():
    two = MultTask(2, 3)  # a in [10, 100), b in [100, 1000): 900 b values per a
    assert two.contains(10, 100) and two.contains(99, 999)
    assert not two.contains(9, 100) and not two.contains(100, 100)
    assert not two.contains(10, 99) and not two.contains(10, 1000)
    assert two.pair(0) == (10, 100)
    assert two.pair(901) == (11, 101)
    assert two.pair(899) == (10, 999)
    assert two.index(10, 100) == 0 and two.index(11, 101) == 901 and two.index(99, 999) == two.num_pairs - 1
    one = MultTask(1, 1)  # 1..9 times 1..9
    assert one.pair(9) == (2, 1) and one.index(2, 1) == 9 and one.contains(1, 9) and not one.contains(0, 5)
    assert all(one.index(*one.pair(i)) == i for i in range(one.num_pairs))


def test_sample_splits_draws_disjoint_pairs_in_sizes_order_from_the_seed():
    task = MultTask(1, 1)  # 81 pairs
    splits = sample_splits(task, {"train": 5, "test": 3}, seed=7)
    drawn = random.Random(7).sample(range(81), 8)
    assert list(splits) == ["train", "test"]
    assert splits["train"] == [task.pair(i) for i in drawn[:5]]
    assert splits["test"] == [task.pair(i) for i in drawn[5:]]
    assert sample_splits(task, {"train": 5, "test": 3}, seed=7) == splits
    assert sample_splits(task, {"train": 5, "test": 3}, seed=8) != splits
    three = sample_splits(task, {"a": 2, "b": 3, "c": 1}, seed=7)
    assert three == {"a": [task.pair(i) for i in drawn[:2]], "b": [task.pair(i) for i in drawn[2:5]],
                     "c": [task.pair(drawn[5])]}


def test_sample_splits_leaves_out_the_excluded_pairs_and_ignores_ones_outside_the_task():
    task = MultTask(1, 1)
    exclude = [task.pair(i) for i in range(0, 81, 2)] + [(10, 10), (0, 3)]  # 41 inside, 2 outside
    splits = sample_splits(task, {"a": 20, "b": 20}, seed=3, exclude=exclude)
    drawn = random.Random(3).sample(range(81), 40 + 41)
    assert splits["a"] + splits["b"] == [task.pair(i) for i in drawn if i % 2 == 1]
    with pytest.raises(UserError, match=r"^asked for 41 examples but only 40 distinct 1x1 operand pairs exist "
                                        r"outside the 41 excluded ones$"):
        sample_splits(task, {"a": 20, "b": 21}, seed=3, exclude=exclude)
    with pytest.raises(UserError, match=r"^asked for 82 examples but only 81 distinct 1x1 operand pairs exist$"):
        sample_splits(task, {"a": 82}, seed=3, exclude=[(10, 10)])
    everything = sample_splits(task, {"all": 81}, seed=1)["all"]
    assert sorted(everything) == [(a, b) for a in range(1, 10) for b in range(1, 10)]


def test_sample_splits_past_sys_maxsize_draws_distinct_indices_one_at_a_time():
    task = MultTask(10, 10)
    assert task.num_pairs > sys.maxsize
    splits = sample_splits(task, {"train": 3, "test": 2}, seed=5, exclude=[task.pair(0)])
    rng = random.Random(5)
    indices = [rng.randrange(task.num_pairs) for _ in range(5)]
    assert splits == {"train": [task.pair(i) for i in indices[:3]], "test": [task.pair(i) for i in indices[3:]]}


def test_draw_distinct_never_repeats_and_never_takes_an_excluded_index():
    chosen = _draw_distinct(random.Random(0), 5, 3, {0, 1})
    assert sorted(chosen) == [2, 3, 4]
    assert _draw_distinct(random.Random(0), 5, 0, set()) == []
    chosen = _draw_distinct(random.Random(2), 4, 4, set())
    assert sorted(chosen) == [0, 1, 2, 3]


def test_describe_task_and_task_label():
    mult = [mult_example(12, 34), mult_example(56, 78)]
    assert describe_task(mult) == {"task": "mult", "digits": "2x2"}
    assert describe_task(mult + [mult_example(123, 4)]) == {"task": "mult", "digits": "mixed"}
    assert describe_task(mult + [Example("hello", "", "1")]) == {"task": "text"}
    assert describe_task(mult + [Example("hello", "", "1")], sample=2) == {"task": "mult", "digits": "2x2"}
    many = [mult_example(12, 345)] * 1000 + [Example("hello", "", "1")]
    assert describe_task(many) == {"task": "mult", "digits": "2x3"}
    assert describe_task(many[:1000] + [mult_example(1, 2)]) == {"task": "mult", "digits": "2x3"}
    assert task_label({"task": "mult", "digits": "2x2"}) == "2x2 multiplication"
    assert task_label({"task": "text"}) == "non-multiplication text"
    assert task_label({}) is None and task_label({"task": "other"}) is None


# ----- data/tokenizers.py ----------------------------------------------------------------------------


def test_word_tokenizer_vocabulary_is_eos_unk_then_every_word_sorted():
    tokenizer = word_tokenizer(["cat dog", "dog  emu\tcat"])
    words = sorted(set(ARITHMETIC_WORDS) | {"cat", "dog", "emu"})
    assert tokenizer.get_vocab() == {EOS: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(words)}}
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (EOS, EOS, UNK)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 0, 1)
    assert tokenizer.model_max_length == 1_000_000
    ids = tokenizer("cat  yak\t7")["input_ids"]
    assert ids == [words.index("cat") + 2, 1, words.index("7") + 2]
    assert tokenizer.decode(ids) == f"cat {UNK} 7"


def test_word_tokenizer_keeps_eos_first_when_the_texts_hold_it():
    tokenizer = word_tokenizer([f"1 {EOS} 2"])
    assert tokenizer.get_vocab()[EOS] == 0 and len(tokenizer.get_vocab()) == len(ARITHMETIC_WORDS) + 2


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_train_bpe_learns_from_question_cot_and_answer(tmp_path, capsys):
    data = write_lines(tmp_path / "a.txt", ["qqqq || wwww #### zzzz", "qqqq || wwww #### zzzz"])
    other = write_lines(tmp_path / "b.txt", ["kkkk || 1 #### 2"])
    tokenizer = train_bpe([data, other], vocab_size=300)
    vocab = tokenizer.get_vocab()
    assert vocab[EOS] == 0 and tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 0
    assert tokenizer.unk_token is None and tokenizer.model_max_length == 1_000_000
    assert {"qq", "ww", "zz", "kk", "##"} <= set(vocab)  # each pair 3 times at least
    assert len(vocab) == 267  # fewer than 300: training stops when no pair has 2 uses left
    text = "#### zzzz qq wé"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.tokenize("qq")[0] == "qq"  # no prefix space added


def test_train_bpe_min_frequency_leaves_out_rarer_pairs(tmp_path):
    data = write_lines(tmp_path / "a.txt", ["xy || ab ab #### 1"])
    vocab = train_bpe([data], vocab_size=400).get_vocab()  # min_frequency 2: `ab` twice, `xy` once
    assert "ab" in vocab and "xy" not in vocab
    assert len(vocab) < 400
    assert "xy" in train_bpe([data], vocab_size=400, min_frequency=1).get_vocab()


def test_train_bpe_stops_at_the_vocabulary_size(tmp_path):
    pairs = " ".join(a + b for a in "abcdefghij" for b in "klmnopqrst")  # 100 words, each its own merge
    data = write_lines(tmp_path / "a.txt", [f"{pairs} || {pairs} #### 1"])
    assert len(train_bpe([data], vocab_size=300).get_vocab()) == 300
    assert len(train_bpe([data], vocab_size=320).get_vocab()) == 320


def test_train_bpe_takes_the_largest_vocabulary_size(tmp_path):
    data = write_lines(tmp_path / "a.txt", ["ab || ab #### 1"])
    vocab = train_bpe([data], vocab_size=MAX_VOCAB).get_vocab()
    assert {"ab", "##"} <= set(vocab) and len(vocab) < 300


@pytest.mark.parametrize("size", [299, MAX_VOCAB + 1, 0])
def test_train_bpe_refuses_a_vocabulary_size_out_of_range(tmp_path, size):
    data = write_lines(tmp_path / "a.txt", ["1 || 2 #### 3"])
    with pytest.raises(UserError, match=f"^--vocab-size {size}: expected 300 \\(256 bytes plus merges\\) to "
                                        "1,000,000$"):
        train_bpe([data], vocab_size=size)


def test_save_tokenizer_then_load_tokenizer_round_trip(tmp_path):
    tokenizer = word_tokenizer(["cat dog"])
    out = tmp_path / "deep" / "tok"
    save_tokenizer(tokenizer, out)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in tmp_path.joinpath("deep").iterdir()) == ["tok"]  # no scratch folder left
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not set(config) & {"is_local", "local_files_only"}
    loaded = load_tokenizer(str(out))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (0, 0, 1)
    # saving again replaces the files and keeps a file that save_pretrained does not write
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    save_tokenizer(word_tokenizer(["emu"]), out)
    assert "emu" in load_tokenizer(str(out)).get_vocab() and "cat" not in load_tokenizer(str(out)).get_vocab()
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in tmp_path.joinpath("deep").iterdir()) == ["tok"]


class SavesThenFails:
    """A tokenizer whose save_pretrained writes one file, notes its directory, then fails as a full disk does."""

    def __init__(self, error=None):
        self.error, self.saved_in = error, None

    def save_pretrained(self, directory):
        self.saved_in = Path(directory)
        (self.saved_in / "tokenizer.json").write_text("new", encoding="utf-8")
        if self.error is not None:
            raise self.error


def test_save_tokenizer_writes_beside_out_in_a_hidden_scratch_folder(tmp_path):
    tokenizer = SavesThenFails()
    save_tokenizer(tokenizer, tmp_path / "tok")
    assert tokenizer.saved_in.parent == tmp_path and tokenizer.saved_in.name.startswith(".tok.")
    assert (tmp_path / "tok" / "tokenizer.json").read_text(encoding="utf-8") == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]


def test_save_tokenizer_that_fails_leaves_the_old_tokenizer_and_says_so(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer.json").write_text("old", encoding="utf-8")
    with pytest.raises(UserError, match=f"^tokenizer {out}: cannot write it \\(No space left\\); the tokenizer there "
                                        "before, if any, is left as it was$"):
        save_tokenizer(SavesThenFails(OSError("No space left\nmore")), out)
    assert (out / "tokenizer.json").read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]


def test_load_tokenizer_refuses_tokenizer_json_without_its_config(tmp_path):
    save_tokenizer(word_tokenizer(["cat"]), tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").unlink()
    with pytest.raises(UserError, match=r"^tokenizer .*tok: tokenizer\.json without its tokenizer_config\.json "
                                        r"\(the EOS, padding and unknown tokens\); expected both files as "
                                        r"save_pretrained writes them$"):
        load_tokenizer(str(tmp_path / "tok"))
    (tmp_path / "tok" / "tokenizer.json").unlink()  # neither file: transformers says what is missing
    with pytest.raises(UserError, match=r"^cannot load tokenizer from directory '.*tok': "):
        load_tokenizer(str(tmp_path / "tok"))


def test_load_tokenizer_refuses_a_tokenizer_without_eos_and_names_it(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={"a": 0, UNK: 1}, unk_token=UNK))
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK).save_pretrained(tmp_path / "tok")
    with pytest.raises(UserError, match=f"^tokenizer '{tmp_path / 'tok'}' has no EOS token; "):
        load_tokenizer(str(tmp_path / "tok"))


def test_load_tokenizer_refuses_a_missing_directory(tmp_path):
    with pytest.raises(UserError, match=r"^tokenizer .*nowhere: no such directory"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_load_tokenizer_names_a_hub_id_and_the_first_line_of_the_error(monkeypatch):
    def refuse(error):
        def from_pretrained(name):
            raise error
        return SimpleNamespace(from_pretrained=from_pretrained)

    monkeypatch.setattr(tokenizers_module, "AutoTokenizer", refuse(OSError("  first line\nsecond line  ")))
    with pytest.raises(UserError, match=r"^cannot load tokenizer from hub id 'someone/tok': first line$"):
        load_tokenizer("someone/tok")
    monkeypatch.setattr(tokenizers_module, "AutoTokenizer", refuse(ValueError("  ")))
    with pytest.raises(UserError, match=r"^cannot load tokenizer from hub id 'someone/tok': ValueError$"):
        load_tokenizer("someone/tok")
    monkeypatch.setattr(tokenizers_module, "AutoTokenizer", refuse(KeyError("x")))
    with pytest.raises(KeyError):
        load_tokenizer("someone/tok")


def test_ensure_special_tokens():
    with pytest.raises(UserError, match=r"^tokenizer 'mine' has no EOS token; icot uses EOS as the separator and "
                                        r"needs one$"):
        ensure_special_tokens(SimpleNamespace(eos_token_id=None, pad_token_id=None), "mine")
    tokenizer = SimpleNamespace(eos_token_id=3, eos_token="</s>", pad_token_id=None, pad_token=None)
    assert ensure_special_tokens(tokenizer, "mine") is tokenizer and tokenizer.pad_token == "</s>"
    tokenizer = SimpleNamespace(eos_token_id=3, eos_token="</s>", pad_token_id=4, pad_token="<pad>")
    assert ensure_special_tokens(tokenizer, "mine") is tokenizer and tokenizer.pad_token == "<pad>"


def test_portable_config_rewrites_the_class_and_drops_the_load_flags(tmp_path):
    portable_config(tmp_path)  # no tokenizer_config.json: nothing to do
    assert list(tmp_path.iterdir()) == []
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "is_local": True, "local_files_only": False,
                                "eos_token": "é", "b": 1}), encoding="utf-8")
    portable_config(tmp_path)
    assert path.read_text(encoding="utf-8") == (
        '{\n  "b": 1,\n  "eos_token": "é",\n  "tokenizer_class": "PreTrainedTokenizerFast"\n}\n')
    path.write_text(json.dumps({"tokenizer_class": "GPT2TokenizerFast", "is_local": True}), encoding="utf-8")
    portable_config(tmp_path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"tokenizer_class": "GPT2TokenizerFast"}
    path.write_text(json.dumps({"local_files_only": True, "x": 2}), encoding="utf-8")
    portable_config(tmp_path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"tokenizer_class": None, "x": 2}
