"""Direct tests of data/layout.py and data/format.py, written for their mutants (issue 50; data/batching.py's:
tests/test_mutants_batching.py): each calls a function with values whose expected result is written out here
by hand. They import only what they test (no model, no CLI), so that one mutant is judged in a second or two."""

from __future__ import annotations

import codecs
import io
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

from icot.data.format import (
    Example,
    check_fits_in_memory,
    format_line,
    is_hub_name,
    is_jsonl,
    parse_json_record,
    parse_line,
    read_examples,
    read_text,
    write_examples,
    write_to,
)
from icot.data.layout import EncodedSet, Layout, check_fits, encode, token_lists, whitespace_vocab
from icot.errors import UserError

# ----- data/layout.py --------------------------------------------------------------------------------

VOCAB = {"<eos>": 0, "<unk>": 1, "<bos>": 2, "####": 3, "1": 4, "2": 5, "3": 6, "*": 7, "=": 8, ";": 9}


def word_level(pre=pre_tokenizers.WhitespaceSplit(), normalizer=None, bos_template: bool = False, model=None):
    """A transformers tokenizer over VOCAB: word-level and split on whitespace unless told otherwise;
    bos_template adds `<bos>` in front of every text, as Llama's tokenizer does."""
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(model or models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    if pre is not None:
        core.pre_tokenizer = pre
    if normalizer is not None:
        core.normalizer = normalizer
    if bos_template:
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


# the longest row is the second, so that an error must name example 2
EXAMPLES = [Example("3", "", "3"), Example("1 * 2", "2 * 1 = 2", "2"), Example("2 * 3", "6", "6")]
# [BOS] input SEP cot SEP #### answer SEP, by hand from VOCAB ("6" is unknown: 1); SEP = <eos> = 0
ROWS = [[6, 0, 0, 3, 6, 0], [4, 7, 5, 0, 5, 7, 4, 8, 5, 0, 3, 5, 0], [5, 7, 6, 0, 1, 0, 3, 1, 0]]


def test_a_layout_takes_sep_and_pad_from_eos_and_bos_only_where_it_differs_from_eos():
    def tok(eos, bos, pad):
        return SimpleNamespace(eos_token_id=eos, bos_token_id=bos, pad_token_id=pad)

    assert Layout.for_tokenizer(tok(0, 0, None)) == Layout(sep_id=0, bos_id=None, pad_id=0)  # GPT-2
    assert Layout.for_tokenizer(tok(2, 1, 0)) == Layout(sep_id=2, bos_id=1, pad_id=0)  # Llama with a pad token
    assert Layout.for_tokenizer(tok(2, None, None)) == Layout(sep_id=2, bos_id=None, pad_id=2)
    assert Layout(sep_id=2, bos_id=1, pad_id=0).prefix == [1] and Layout(2, None, 0).prefix == []


def test_whitespace_vocab_is_the_vocabulary_of_word_level_tokenizers_that_split_on_whitespace():
    assert whitespace_vocab(SimpleNamespace()) is None  # a slow tokenizer: no backend
    assert whitespace_vocab(word_level()) == (VOCAB, 1, {})
    # the one normalizer such a tokenizer may have: a string replaced by a word of its vocabulary
    assert whitespace_vocab(word_level(normalizer=normalizers.Replace("||", ";"))) == (VOCAB, 1, {"||": " ; "})


@pytest.mark.parametrize("tokenizer", [
    dict(normalizer=normalizers.Replace("||", "@")),  # replaced by a word outside the vocabulary
    dict(normalizer=normalizers.Replace(Regex("[|]+"), ";")),  # a regex, which a dict look-up cannot apply
    dict(normalizer=normalizers.Lowercase()),
    dict(pre=pre_tokenizers.Whitespace()),  # splits "1*2" too
    dict(pre=None),
    dict(model=models.BPE(vocab=VOCAB, merges=[], unk_token="<unk>")),
])
def test_whitespace_vocab_is_none_for_any_other_tokenizer(tokenizer):
    assert whitespace_vocab(word_level(**tokenizer)) is None


def test_token_lists_by_dict_look_up_and_by_the_tokenizer_without_special_tokens():
    words = (VOCAB, 1, {"||": " ; "})
    assert token_lists(None, ["1 || 2", "3 @ 1", ""], words) == [[4, 9, 5], [6, 1, 4], []]
    llama_like = word_level(pre=pre_tokenizers.Whitespace(), bos_template=True)
    assert llama_like(["1 * 2"])["input_ids"] == [[2, 4, 7, 5]]  # the tokenizer call adds <bos> by default
    assert token_lists(llama_like, ["1 * 2", "3 @"], None) == [[4, 7, 5], [6, 1]]


def test_encode_lays_out_each_example_and_keeps_the_examples():
    data = encode(word_level(), Layout(sep_id=0, bos_id=None, pad_id=0), EXAMPLES)
    assert data.tokens.tolist() == sum(ROWS, []) and data.tokens.dtype == np.int32
    assert data.offsets.tolist() == [0, 6, 19, 28] and data.offsets.dtype == np.int64
    assert data.n_prompt.tolist() == [2, 4, 4] and data.n_cot.tolist() == [0, 5, 1]
    assert data.examples is EXAMPLES and len(data) == 3 and data.lengths.tolist() == [6, 13, 9]
    assert data.row(1).tolist() == ROWS[1] and data.row(2).tolist() == ROWS[2]
    assert data.prompt(1) == [4, 7, 5, 0] and data.target(1).tolist() == [5, 7, 4, 8, 5, 0, 3, 5, 0]


def test_encode_looks_words_up_without_calling_a_word_level_tokenizer():
    """The fast path: only the vocabulary of the backend is read (this tokenizer cannot be called)."""
    backend = word_level().backend_tokenizer
    uncallable = SimpleNamespace(backend_tokenizer=backend, unk_token_id=1)
    data = encode(uncallable, Layout(sep_id=0, bos_id=None, pad_id=0), EXAMPLES)
    assert data.tokens.tolist() == sum(ROWS, [])


def test_encode_through_the_tokenizer_call_in_chunks_with_a_bos_prefix():
    """The tokenizer's own call (not a word-level look-up), one example a chunk, and a BOS that
    differs from EOS (Llama): the same rows with BOS in front, and examples not kept."""
    llama_like = word_level(pre=pre_tokenizers.Whitespace(), bos_template=True)
    for chunk in (1, 2):
        data = encode(llama_like, Layout(sep_id=0, bos_id=2, pad_id=0), EXAMPLES, keep_examples=False, chunk=chunk)
        assert data.tokens.tolist() == sum(([2] + row for row in ROWS), [])
        assert data.offsets.tolist() == [0, 7, 21, 31] and data.n_prompt.tolist() == [3, 5, 5]
        assert data.n_cot.tolist() == [0, 5, 1] and data.examples is None


def test_encode_of_no_examples_is_an_empty_set():
    data = encode(word_level(), Layout(0, None, 0), [])
    assert data.tokens.tolist() == [] and data.tokens.dtype == np.int32
    assert data.offsets.tolist() == [0] and len(data) == 0 and data.n_cot.tolist() == []


def test_encode_shows_a_transient_progress_bar_from_two_chunks_on(capsys):
    tokenizer, layout = word_level(), Layout(0, None, 0)
    encode(tokenizer, layout, EXAMPLES, chunk=2)  # 3 examples: fewer than two chunks of 2
    assert capsys.readouterr().err == ""
    encode(tokenizer, layout, EXAMPLES + EXAMPLES[:1], chunk=2)
    err = capsys.readouterr().err
    assert "tokenizing:" in err and "0/4" in err and "ex/s" in err
    assert "100%" not in err and not err.endswith("\n")  # leave=False: the bar is erased when done
    encode(tokenizer, layout, EXAMPLES + EXAMPLES[:1], chunk=2, desc="reading")
    assert "reading:" in capsys.readouterr().err


def test_check_fits_names_the_longest_example_only_when_it_exceeds_the_positions():
    data = EncodedSet(np.zeros(28, np.int32), np.array([0, 6, 19, 28]), np.array([2, 4, 4]), np.array([0, 5, 1]))
    check_fits(data, None, "train")
    check_fits(data, 13, "train")
    with pytest.raises(UserError) as e:
        check_fits(data, 12, "train")
    assert str(e.value) == ("train: example 2 is 13 tokens long but the model has only 12 positions; use a model with "
                            "more positions or shorter examples (max_len_drop: true drops them)")
    empty = EncodedSet(np.zeros(0, np.int32), np.array([0]), np.zeros(0, np.int64), np.zeros(0, np.int64))
    check_fits(empty, 5, "val")


# ----- data/format.py --------------------------------------------------------------------------------

LINE = "'input||cot #### answer'"


def error_of(call, *args) -> str:
    with pytest.raises(UserError) as e:
        call(*args)
    return str(e.value)


def test_parse_line_strips_each_part_and_keeps_an_empty_cot():
    assert parse_line("  2 * 3 ||  2 * 3 = 6  ####  6 ", "d.txt", 1) == Example("2 * 3", "2 * 3 = 6", "6")
    assert parse_line("q|| #### a", "d.txt", 1) == Example("q", "", "a")
    assert format_line(Example("q", "", "a")) == "q|| #### a"


@pytest.mark.parametrize("line, message", [
    ("q cot #### a", f"no '||' between input and CoT; expected {LINE}"),
    ("q||c||d #### a", f"more than one '||'; expected {LINE}"),
    ("q||c ### a", f"no '####' before the answer; expected {LINE}"),
    ("  ||c #### a", f"empty input before '||'; expected {LINE}"),
    ("q||c ####  ", f"empty answer after '####'; expected {LINE}"),
    ("q||c #### a #### b", f"more than one '####'; expected {LINE}"),
])
def test_parse_line_errors_name_the_file_and_line(line, message):
    assert error_of(parse_line, line, "d.txt", 7) == f"d.txt:7: {message}"


def test_parse_json_record_fields_numbers_and_cot_lists():
    parse = parse_json_record
    assert parse('{"question": " q ", "cot": " c ", "answer": " a "}', "d.jsonl", 1) == Example("q", "c", "a")
    assert parse('{"question": "q", "answer": 42}', "d.jsonl", 1) == Example("q", "", "42")  # no CoT: empty
    assert parse('{"question": 1.5, "cot": [" x = 1 ", "y = 2"], "answer": "a"}', "d.jsonl", 1) == \
        Example("1.5", "x = 1 y = 2", "a")


@pytest.mark.parametrize("line, message", [
    ('{"question": "q"', "invalid JSON (Expecting ',' delimiter); expected an object with question, cot, answer"),
    ('["q", "c", "a"]', "expected a JSON object with fields question, cot, answer"),
    ('{"cot": "c"}', "missing field question, answer; expected question, cot, answer"),
    ('{"question": "q"}', "missing field answer; expected question, cot, answer"),
    ('{"question": "q", "cot": ["a", 1], "answer": "a"}', "field 'cot' must be a string or a list of strings"),
    ('{"question": true, "answer": "a"}', "field 'question' must be a string"),
    ('{"question": "q", "cot": null, "answer": "a"}', "field 'cot' must be a string"),
    ('{"question": "q", "cot": {"x": 1}, "answer": "a"}', "field 'cot' must be a string"),
    ('{"question": "q", "answer": ["a"]}', "field 'answer' must be a string"),
    ('{"question": " ", "answer": "a"}', "empty field 'question'"),
    ('{"question": "q", "answer": ""}', "empty field 'answer'"),
])
def test_parse_json_record_errors_name_the_file_and_line(line, message):
    assert error_of(parse_json_record, line, "d.jsonl", 3) == f"d.jsonl:3: {message}"


def test_read_text_refuses_what_is_not_a_utf8_data_file(tmp_path):
    assert error_of(read_text, tmp_path / "none.txt") == f"{tmp_path / 'none.txt'}: no such file"
    assert error_of(read_text, tmp_path) == f"{tmp_path}: is a directory, expected a data file"
    binary = f"binary file, expected UTF-8 text in {LINE} or JSONL format"
    (tmp_path / "early.txt").write_bytes(b"q||c #### \0")
    assert error_of(read_text, tmp_path / "early.txt") == f"{tmp_path / 'early.txt'}: {binary}"
    (tmp_path / "late.txt").write_bytes(b"q||c #### a\n" * 100_000 + b"\0")  # past the first megabyte
    assert error_of(read_text, tmp_path / "late.txt") == f"{tmp_path / 'late.txt'}: {binary}"
    (tmp_path / "latin1.txt").write_bytes(b"q||c #### a\nq||c #### a\nq||caf\xe9 #### a\n")
    assert error_of(read_text, tmp_path / "latin1.txt") == f"{tmp_path / 'latin1.txt'}:3: not valid UTF-8 text"
    os.mkfifo(tmp_path / "pipe")  # last: were it opened, reading it would wait forever
    assert error_of(read_text, tmp_path / "pipe") == \
        f"{tmp_path / 'pipe'}: not a regular file (a pipe or a device); expected a data file"


def test_read_text_drops_a_byte_order_mark(tmp_path):
    (tmp_path / "bom.txt").write_bytes(codecs.BOM_UTF8 + "q||caf\u00e9 #### a\n".encode())
    assert read_text(tmp_path / "bom.txt") == "q||caf\u00e9 #### a\n"


def fake_memory(monkeypatch, page_size: int, pages: int):
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": page_size, "SC_PHYS_PAGES": pages}[name])


def no_sysconf(name):
    raise ValueError(f"unknown name {name}")  # what os.sysconf raises for a name this system lacks


def test_a_file_of_more_than_a_quarter_of_the_memory_is_refused(tmp_path, monkeypatch):
    fake_memory(monkeypatch, 4, 2_125_000_001)  # 8.500000004 GB, shown as 9; a quarter is 2,125,000,001 bytes
    path = tmp_path / "big.txt"
    with open(path, "wb") as f:  # sparse: no disk space taken
        f.truncate(2_125_000_001)
    check_fits_in_memory(path)
    with open(path, "r+b") as f:
        f.truncate(3_050_000_001)  # 3.050000001 GB, shown as 3.1
    assert error_of(check_fits_in_memory, path) == (
        f"{path}: 3.1 GB, more than a quarter of this machine's 9 GB of memory, which reading it needs several times "
        "over; expected a smaller file (split it)")
    with open(path, "r+b") as f:
        f.truncate(1_800_000_000)
    check_fits_in_memory(path)  # under a quarter, over a fifth
    monkeypatch.setattr(os, "sysconf", no_sysconf)
    with open(path, "r+b") as f:
        f.truncate(3_050_000_001)
    check_fits_in_memory(path)  # no memory size known: no limit


def test_a_binary_file_is_refused_as_binary_before_its_size_is_checked(tmp_path, monkeypatch):
    fake_memory(monkeypatch, 1, 400)  # a quarter: 100 bytes
    (tmp_path / "b.txt").write_bytes(b"\0" * 200)
    assert error_of(read_text, tmp_path / "b.txt") == \
        f"{tmp_path / 'b.txt'}: binary file, expected UTF-8 text in {LINE} or JSONL format"
    (tmp_path / "t.txt").write_bytes(b"q||c #### a\n" * 20)
    assert "more than a quarter" in error_of(read_text, tmp_path / "t.txt")


def test_read_examples_reads_lines_and_jsonl_and_ends_lines_at_newlines_only(tmp_path):
    (tmp_path / "d.txt").write_text("q\u2028x||c #### 1\r\nr||d #### 2\r\n\r\n  \n", encoding="utf-8")
    assert read_examples(str(tmp_path / "d.txt")) == [Example("q\u2028x", "c", "1"), Example("r", "d", "2")]
    (tmp_path / "d.jsonl").write_text('{"question": "q", "cot": "c", "answer": "1"}\n', encoding="utf-8")
    assert read_examples(tmp_path / "d.jsonl") == [Example("q", "c", "1")]
    (tmp_path / "one.txt").write_text("q||c #### 1", encoding="utf-8")  # no final newline
    assert read_examples(tmp_path / "one.txt") == [Example("q", "c", "1")]


def test_read_examples_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "blank.txt").write_text("q||c #### 1\n\nr||d #### 2\n", encoding="utf-8")
    assert error_of(read_examples, tmp_path / "blank.txt") == f"{tmp_path / 'blank.txt'}:2: blank line; expected {LINE}"
    (tmp_path / "empty.txt").write_text("\n \r\n", encoding="utf-8")
    assert error_of(read_examples, tmp_path / "empty.txt") == \
        f"{tmp_path / 'empty.txt'}: empty file, expected at least one example"
    (tmp_path / "bad.txt").write_text("q||c #### 1\nr||d 2\n", encoding="utf-8")
    assert error_of(read_examples, tmp_path / "bad.txt") == \
        f"{tmp_path / 'bad.txt'}:2: no '####' before the answer; expected {LINE}"
    (tmp_path / "bad.json").write_text('{"question": "q", "answer": "1"}\n[]\n', encoding="utf-8")
    assert error_of(read_examples, tmp_path / "bad.json") == \
        f"{tmp_path / 'bad.json'}:2: expected a JSON object with fields question, cot, answer"


def test_hub_names_are_refused_unless_a_file_of_that_name_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_name("hf:openai/gsm8k") and not is_hub_name(None) and not is_hub_name("gsm8k.txt")
    assert error_of(read_examples, "hf:openai/gsm8k") == (
        "hf:openai/gsm8k: hub datasets are read by 'icot data gsm8k' (and 'icot train --data hf:NAME', "
        "'icot eval --data hf:NAME'); convert it to a file first: icot data gsm8k --input hf:openai/gsm8k --out FILE.txt")
    Path("hf:local.txt").write_text("q||c #### 1\n", encoding="utf-8")
    assert not is_hub_name("hf:local.txt") and read_examples("hf:local.txt") == [Example("q", "c", "1")]


def test_is_jsonl_by_the_file_name_ending():
    assert is_jsonl("a.jsonl") and is_jsonl(Path("a.json")) and not is_jsonl("a.txt") and not is_jsonl("a.JSONL")


def test_write_examples_in_the_line_format_or_as_jsonl_records(tmp_path):
    examples = [Example("q", "", "1"), Example("caf\u00e9", "c d", "2")]
    write_examples(str(tmp_path / "out.txt"), examples)
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "q|| #### 1\ncaf\u00e9||c d #### 2\n"
    write_examples(tmp_path / "out.jsonl", examples)
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == (
        '{"question": "q", "cot": "", "answer": "1"}\n{"question": "caf\u00e9", "cot": "c d", "answer": "2"}\n')
    text = io.StringIO()
    write_to(text, examples[:1], jsonl=False)
    assert text.getvalue() == "q|| #### 1\n"
