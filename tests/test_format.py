import json

import pytest

from icot.data.format import Example, format_line, read_examples, write_examples
from icot.errors import UserError


def write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def test_reads_every_reference_file_as_it_is(reference):
    counts = {p.name: len(read_examples(p)) for p in sorted(reference.glob("*/*.txt"))}
    assert counts["4x4_test.txt"] == 1000
    assert counts["test.txt"] == 1319
    assert counts["train_no_aug.txt"] == 6973  # has U+2028 inside questions: not a line break
    assert counts["valid.txt"] == 500


def test_fields_crlf_and_empty_cot(tmp_path):
    path = write(tmp_path, "a.txt", "1 2 * 3 4||5 6 #### 7 8\r\nq||#### 9\r\nq2|| #### 10\n\n")
    assert read_examples(path) == [Example("1 2 * 3 4", "5 6", "7 8"), Example("q", "", "9"), Example("q2", "", "10")]


def test_write_then_read_round_trip(tmp_path):
    examples = [Example("9 1 * 2", "1 8", "8 1"), Example("what?", "", "42")]
    for name in ("x.txt", "x.jsonl"):
        write_examples(tmp_path / name, examples)
        assert read_examples(tmp_path / name) == examples
    assert format_line(examples[1]) == "what?|| #### 42"  # empty CoT as in data/reference/gsm8k


@pytest.mark.parametrize("content, line, fragment", [
    ("a||b #### c\nno separator #### 1\n", 2, "no '||'"),
    ("a||b #### c\na||b c\n", 2, "no '####'"),
    ("a||b #### \n", 1, "empty answer"),
    ("||b #### 1\n", 1, "empty input"),
    ("a||b||c #### 1\n", 1, "more than one '||'"),
    ("a||b #### 1\n\na||b #### 2\n", 2, "blank line"),
    ("a||b #### 1 #### 2\n", 1, "more than one '####'"),
])
def test_malformed_lines_name_file_and_line(tmp_path, content, line, fragment):
    path = write(tmp_path, "bad.txt", content)
    with pytest.raises(UserError) as error:
        read_examples(path)
    assert str(error.value).startswith(f"{path}:{line}: ")
    assert fragment in str(error.value)


@pytest.mark.parametrize("content, fragment", [
    ("", "empty file"),
    ("\n\n", "empty file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "binary file"),
    (b"a||b #### 1\n\xff\xfe||x #### 2\n", ":2: not valid UTF-8"),
])
def test_unreadable_files(tmp_path, content, fragment):
    path = write(tmp_path, "f.txt", content)
    with pytest.raises(UserError, match=fragment):
        read_examples(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_examples(tmp_path / "nope.txt")


def test_jsonl_cot_as_list_and_errors(tmp_path):
    good = write(tmp_path, "g.jsonl", json.dumps({"question": "2+2*3", "cot": ["2*3=6", "2+6=8"], "answer": 8}) + "\n")
    assert read_examples(good) == [Example("2+2*3", "2*3=6 2+6=8", "8")]
    bad = write(tmp_path, "b.jsonl", '{"question": "q", "answer": "1"}\n{"question": "q"}\n')
    with pytest.raises(UserError, match=r"b.jsonl:2: missing field answer"):
        read_examples(bad)
    broken = write(tmp_path, "c.jsonl", '{"question": \n')
    with pytest.raises(UserError, match=r"c.jsonl:1: invalid JSON"):
        read_examples(broken)
