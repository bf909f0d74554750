"""Direct tests of data/gsm8k.py and data/sources.py, written for their mutants (issue 50): each calls a
function with values whose expected result is written out here by hand. Nothing is downloaded: the hub
is a stand-in `datasets` module or `load_hub` replaced in the test; no model, no CLI."""

from __future__ import annotations

import sys
import types

import pytest

from icot.data import gsm8k
from icot.data.format import Example
from icot.data.gsm8k import (
    Conversion,
    HubSpec,
    Record,
    convert_records,
    final_answer,
    hub_dataset_spec,
    is_number,
    read_jsonl_records,
    read_records,
    solution_cot,
    summary,
)
from icot.errors import UserError

# ----- data/gsm8k.py ---------------------------------------------------------------------------------


def rec(question, answer, number=1, source="f.jsonl"):
    return Record(source, number, {"question": question, "answer": answer})


def test_solution_cot_joins_each_annotation_with_one_space_and_keeps_a_gt_inside_one():
    assert solution_cot("He has <<2*3=6>>6 and <<6+1=7>>7.\n#### 7") == "<<2*3=6>> <<6+1=7>>"
    assert solution_cot("a <<3>2=1>> b") == "<<3>2=1>>"
    assert solution_cot("no annotations #### 3") == ""


def test_final_answer_is_the_stripped_text_after_the_last_mark():
    assert final_answer("steps\n#### 42 ") == "42"
    assert final_answer("#### 1 #### 2") == "2"
    assert final_answer("steps, no mark") is None
    assert final_answer("steps ####   ") is None
    assert final_answer("#### 1\n2") is None
    assert final_answer("####x") == "x"


@pytest.mark.parametrize("text, expected", [
    ("2,125", True), ("-3.5", True), ("1,000.25", True), ("7", True), ("0012", True), ("-1,234,567", True),
    ("12,34", False), ("1.2.3", False), ("abc", False), ("", False), ("1,0000", False), ("3.", False),
    ("+3", False), ("1 2", False), ("1234,567", False)])
def test_is_number(text, expected):
    assert is_number(text) is expected


def test_convert_records_counts_every_record_and_groups_the_unclean_ones():
    records = [
        rec("  Q1  ", "a <<1+1=2>> b\n#### 2,000", 1),        # clean, comma removed
        rec("Q2", "no annotations\n#### 5", 2),                # no annotations
        rec("Q3", "<<2*2=4>>\n#### four", 3),                  # non-numeric answer
        rec("Q4", "<<2*2=4>> and no answer", 4),               # no answer: dropped
        rec("Q5\n  part two", "<<3*3=9>>\n#### 9", 5),         # line break joined
        rec("excluded q", "<<1*1=1>>\n#### 1", 6),             # excluded
        rec("Q7", "<<1*1=1>>\n#### -1,5", 7),                  # '-1,5' is not a number: kept as written
    ]
    result = convert_records(records, 7, exclude=frozenset({"excluded q"}))
    assert result.records == 7
    assert result.examples == [Example("Q1", "<<1+1=2>>", "2000"), Example("Q2", "", "5"),
                               Example("Q3", "<<2*2=4>>", "four"), Example("Q5 part two", "<<3*3=9>>", "9"),
                               Example("Q7", "<<1*1=1>>", "-1,5")]
    assert result.no_annotations == [2]
    assert result.non_numeric_answers == [3, 7]
    assert result.no_answers == [4]
    assert result.joined_line_breaks == [5]
    assert result.excluded == [6]
    assert result.commas_removed == 1


def test_convert_records_drops_incomplete_and_keeps_commas_when_told():
    records = [rec("Q1", "<<1+1=2>>\n#### 2,000", 1), rec("Q2", "none\n#### 5", 2), rec("Q3", "<<1=1>>\n#### x", 3),
               rec("Q4", "<<4=4>>\n#### 1,234", 4)]
    result = convert_records(records, 4, keep_incomplete=False, keep_commas=True)
    assert result.examples == [Example("Q1", "<<1+1=2>>", "2,000"), Example("Q4", "<<4=4>>", "1,234")]
    assert result.no_annotations == [2] and result.non_numeric_answers == [3]
    assert result.commas_removed == 0
    assert result.records == 4


def test_convert_records_without_a_total_and_the_defaults():
    result = convert_records(iter([rec("Q", "<<1=1>>\n#### 1,000"), rec("R", "x\n#### y", 2)]))
    assert result.examples == [Example("Q", "<<1=1>>", "1000"), Example("R", "", "y")]
    assert result.excluded == [] and result.records == 2


def test_every_comma_answer_counts():
    records = [rec("Q1", "<<1=1>>\n#### 1,000", 1), rec("Q2", "<<1=1>>\n#### 2,000,000", 2)]
    result = convert_records(records, 2)
    assert result.commas_removed == 2 and [e.answer for e in result.examples] == ["1000", "2000000"]


def test_the_progress_bar_shows_for_an_unknown_or_a_large_total_only_and_is_cleared(capsys):
    records = [rec("Q", "<<1=1>>\n#### 1")]
    for total in (1, 49_999):
        convert_records(records, total)
        assert capsys.readouterr().err == ""
    for total in (50_000, None):
        convert_records(iter(records), total)
        err = capsys.readouterr().err
        assert "converting: " in err and "rec/s" in err and not err.endswith("\n"), err
        assert ("/50000" in err) is (total is not None), err  # the bar knows an iterator's total from `total`


def test_a_line_break_of_any_kind_becomes_one_space_and_the_question_is_then_matched_against_exclude():
    result = convert_records([rec("a \r\n\n  b\rc", "<<1=1>>\n#### 1", 3)], 1, exclude=frozenset({"a b c"}))
    assert result.joined_line_breaks == [3] and result.excluded == [3] and result.examples == []
    result = convert_records([rec("a  b", "<<1=1>>\n#### 1", 3)], 1)
    assert result.joined_line_breaks == [] and result.examples == [Example("a  b", "<<1=1>>", "1")]


def test_a_text_the_line_format_cannot_hold_is_an_error_only_for_the_line_format():
    records = [rec("a || b", "<<1=1>>\n#### 1", 9, "in.jsonl")]
    with pytest.raises(UserError) as error:
        convert_records(records, 1)
    assert str(error.value) == ("in.jsonl:9: its text contains '||' or '####', which the line format cannot hold; "
                                "write JSONL instead (--out FILE.jsonl)")
    assert convert_records(records, 1, line_format=False).examples == [Example("a || b", "<<1=1>>", "1")]
    with pytest.raises(UserError, match="line format cannot hold"):
        convert_records([rec("q", "<<a####b=1>>\n#### 1", 2)], 1)


@pytest.mark.parametrize("fields, message", [
    ({"answer": "#### 1"}, "f.jsonl:4: missing field 'question'; expected " + gsm8k.RECORD_SHAPE),
    ({"question": "q"}, "f.jsonl:4: missing field 'answer'; expected " + gsm8k.RECORD_SHAPE),
    ({"question": 3, "answer": "#### 1"},
     "f.jsonl:4: field 'question' must be a string, got int; expected " + gsm8k.RECORD_SHAPE),
    ({"question": "q", "answer": ["#### 1"]},
     "f.jsonl:4: field 'answer' must be a string, got list; expected " + gsm8k.RECORD_SHAPE),
    ({"question": "  ", "answer": "#### 1"}, "f.jsonl:4: empty field 'question'; expected " + gsm8k.RECORD_SHAPE)])
def test_bad_fields_are_errors_naming_the_line(fields, message):
    with pytest.raises(UserError) as error:
        convert_records([Record("f.jsonl", 4, fields)], 1)
    assert str(error.value) == message


def test_an_empty_answer_field_is_a_record_without_an_answer():
    result = convert_records([rec("q", "  ", 2)], 1)
    assert result.no_answers == [2] and result.examples == []


def test_a_hub_record_error_names_the_row():
    with pytest.raises(UserError) as error:
        convert_records([Record("hf:a/b:main", 12, {"question": None, "answer": "#### 1"})], 1)
    assert str(error.value) == f"hf:a/b:main row 12: missing field 'question'; expected {gsm8k.RECORD_SHAPE}"


def test_read_jsonl_records_numbers_the_lines_and_refuses_an_empty_file(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"question": "q1", "answer": "#### 1"}\n\n{"question": "q2", "answer": "#### 2"}\n')
    records, count = read_jsonl_records(path)
    assert count == 2
    assert records == [Record(str(path), 1, {"question": "q1", "answer": "#### 1"}),
                       Record(str(path), 3, {"question": "q2", "answer": "#### 2"})]
    assert read_records(str(path)) == (records, 2)
    path.write_text("\n \n")
    with pytest.raises(UserError) as error:
        read_jsonl_records(str(path))
    assert str(error.value) == f"{path}: empty file, expected GSM8K records, one JSON object per line"
    path.write_text("[1]\n")
    with pytest.raises(UserError) as error:
        read_jsonl_records(path)
    assert str(error.value) == f"{path}:1: expected {gsm8k.RECORD_SHAPE}, got a JSON list"


@pytest.mark.parametrize("text, name, config, split, back", [
    ("hf:openai/gsm8k", "openai/gsm8k", None, None, "hf:openai/gsm8k"),
    ("hf:openai/gsm8k:main", "openai/gsm8k", "main", None, "hf:openai/gsm8k:main"),
    ("hf:openai/gsm8k:main:test", "openai/gsm8k", "main", "test", "hf:openai/gsm8k:main:test"),
    ("hf:d::test", "d", None, "test", "hf:d::test"),
    ("hf:d:main:", "d", "main", None, "hf:d:main"),
    ("hf:dX:mainX:X", "dX", "mainX", "X", "hf:dX:mainX:X")])
def test_hub_spec_parse_and_str(text, name, config, split, back):
    spec = HubSpec.parse(text)
    assert (spec.name, spec.config, spec.split) == (name, config, split)
    assert str(spec) == back


@pytest.mark.parametrize("text", ["hf:", "hf::main", "hf:a:b:c:d"])
def test_a_bad_hub_spec_is_one_error(text):
    with pytest.raises(UserError) as error:
        HubSpec.parse(text)
    assert str(error.value) == f"'{text}': expected hf:NAME[:CONFIG[:SPLIT]], e.g. hf:openai/gsm8k:main:test"


def test_hub_dataset_spec_refuses_a_split():
    assert hub_dataset_spec("hf:a/b:main") == HubSpec("a/b", "main", None)
    with pytest.raises(UserError) as error:
        hub_dataset_spec("hf:a/b:main:test")
    assert str(error.value) == ("data: hf:a/b:main:test: give the dataset without a split (hf:NAME[:CONFIG]); "
                                "its train, validation and test splits are all used")


class Table(list):
    """A stand-in for a `datasets.Dataset`: its rows as dicts, and its column names."""

    def __init__(self, rows, column_names=("question", "answer")):
        super().__init__(rows)
        self.column_names = list(column_names)


ROWS = [{"question": "q1", "answer": "<<1=1>>\n#### 1"}, {"question": "q2", "answer": "<<2=2>>\n#### 2"}]


def test_hub_records_are_numbered_rows_of_the_one_split(monkeypatch):
    calls = []

    def load(spec):
        calls.append(spec)
        return {"test": Table(ROWS)}

    monkeypatch.setattr(gsm8k, "load_hub", load)
    records, count = read_records("hf:a/b:main")
    assert calls == [HubSpec("a/b", "main", None)]
    assert count == 2
    assert list(records) == [Record("hf:a/b:main", 1, ROWS[0]), Record("hf:a/b:main", 2, ROWS[1])]
    monkeypatch.setattr(gsm8k, "load_hub", lambda spec: Table(ROWS))
    assert list(read_records("hf:a/b:main:test")[0])[1] == Record("hf:a/b:main:test", 2, ROWS[1])


def test_hub_records_with_several_splits_or_missing_columns_are_errors(monkeypatch):
    monkeypatch.setattr(gsm8k, "load_hub", lambda spec: {"train": Table(ROWS), "test": Table(ROWS)})
    with pytest.raises(UserError) as error:
        read_records("hf:a/b:main")
    assert str(error.value) == "hf:a/b:main has splits train, test; name one, e.g. hf:a/b:main:train"
    monkeypatch.setattr(gsm8k, "load_hub", lambda spec: Table([], ["text", "label"]))
    with pytest.raises(UserError) as error:
        read_records("hf:a/b:main:test")
    assert str(error.value) == ("hf:a/b:main:test: no column 'question', 'answer' (columns: text, label); "
                                "expected GSM8K's question and answer")
    monkeypatch.setattr(gsm8k, "load_hub", lambda spec: Table([], ["question", "text"]))
    with pytest.raises(UserError, match=r"no column 'answer' \(columns: question, text\)"):
        read_records("hf:d")


def fake_datasets(monkeypatch, load_dataset):
    """A stand-in `datasets` module whose load_dataset is given; it records the quieting calls."""
    module = types.ModuleType("datasets")
    module.calls = []
    module.load_dataset = load_dataset
    module.disable_progress_bars = lambda: module.calls.append("no bars")
    module.utils = types.SimpleNamespace(logging=types.SimpleNamespace(
        set_verbosity_error=lambda: module.calls.append("errors only")))
    monkeypatch.setitem(sys.modules, "datasets", module)
    return module


def test_load_hub_passes_name_config_and_split_and_quiets_the_library(monkeypatch):
    seen = []
    module = fake_datasets(monkeypatch, lambda name, config, split: seen.append((name, config, split)) or "loaded")
    assert gsm8k.load_hub(HubSpec("a/b", "main", "test")) == "loaded"
    assert seen == [("a/b", "main", "test")]
    assert module.calls == ["errors only", "no bars"]


@pytest.mark.parametrize("raised, first", [(ConnectionError("offline\nretry details"), "offline"),
                                           (ValueError("  "), "ValueError")])
def test_load_hub_failure_is_one_line(monkeypatch, raised, first):
    def load(name, config, split):
        raise raised

    fake_datasets(monkeypatch, load)
    with pytest.raises(UserError) as error:
        gsm8k.load_hub(HubSpec("a/b", None, "test"))
    assert str(error.value) == (f"cannot load hf:a/b::test with datasets: {first}; without a reachable hub, download "
                                "its records elsewhere and pass the file (JSONL, CSV or parquet)")
    assert error.value.__suppress_context__


def test_load_hub_without_datasets_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError) as error:
        gsm8k.load_hub(HubSpec("a/b"))
    assert str(error.value) == ("hf:a/b: reading from the Hugging Face hub needs the optional 'datasets' library "
                                "(pip install 'implicit-cot[hub]'); or download the JSONL and pass --input FILE.jsonl")
    assert error.value.__suppress_context__


def test_summary_names_every_group_with_its_first_rows():
    conversion = Conversion(records=20, examples=[Example("q", "", "1")] * 12, no_annotations=[1, 2, 3, 4, 5, 6],
                            non_numeric_answers=[7], no_answers=[8, 9], joined_line_breaks=[10, 11, 12, 13, 14],
                            excluded=[15], commas_removed=3)
    assert summary(conversion, "in.jsonl", "out.txt", True) == [
        "out.txt: 12 examples from 20 records of in.jsonl",
        "  6 records without <<...>> annotations: kept with an empty CoT (line 1, 2, 3, 4, 5, ...)",
        "  1 record whose answer is not a number: kept as written (line 7)",
        "  2 records without a '#### N' answer: dropped (line 8, 9)",
        "  5 records with line breaks in the question: joined with single spaces (line 10, 11, 12, 13, 14)",
        "  1 record whose question is in an --exclude file: dropped (line 15)",
        "  thousands separators removed from 3 answers (--keep-commas keeps them)",
        "  --incomplete drop drops records without annotations or with a non-numeric answer",
    ]
    assert summary(conversion, "hf:a/b:main:test", "out.txt", False)[1:3] == [
        "  6 records without <<...>> annotations: dropped (row 1, 2, 3, 4, 5, ...)",
        "  1 record whose answer is not a number: dropped (row 7)"]


def test_summary_of_a_clean_conversion_is_one_line_and_one_comma_is_one_answer():
    clean = Conversion(records=1, examples=[Example("q", "c", "1")])
    assert summary(clean, "in.jsonl", "o.txt", True) == ["o.txt: 1 examples from 1 records of in.jsonl"]
    assert summary(Conversion(records=1, commas_removed=1), "s", "o", False)[1] == (
        "  thousands separators removed from 1 answer (--keep-commas keeps them)")
    only_non_numeric = summary(Conversion(records=1, non_numeric_answers=[1]), "s", "o", True)
    assert only_non_numeric[-1].startswith("  --incomplete drop")
    assert summary(Conversion(records=1, no_annotations=[1]), "s", "o", False)[-1].startswith("  1 record without")


# ----- data/sources.py -------------------------------------------------------------------------------

from icot.data import sources  # noqa: E402
from icot.data.format import read_examples, write_examples  # noqa: E402
from icot.data.sources import (  # noqa: E402
    Columns,
    Split,
    is_hub,
    is_saved_dataset,
    read_file,
    read_run_data,
    read_split,
    read_splits,
    split_files,
    to_examples,
    write_splits,
)


class Data:
    """A stand-in for a `datasets.Dataset` built from columns: column_names, len, a column by name, select."""

    def __init__(self, **columns):
        self.columns = columns
        self.column_names = list(columns)

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, name):
        return self.columns[name]

    def select(self, indices):
        return Data(**{name: [values[i] for i in indices] for name, values in self.columns.items()})


def test_is_hub_and_is_saved_dataset(tmp_path, monkeypatch):
    assert is_hub("hf:a/b") and not is_hub("a/b") and not is_hub(None) and not is_hub("data/hf:a")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf:a").write_text("")
    assert not is_hub("hf:a")
    for marker in ("dataset_dict.json", "state.json"):
        folder = tmp_path / marker.split(".")[0]
        folder.mkdir()
        assert not is_saved_dataset(folder)
        (folder / marker).write_text("{}")
        assert is_saved_dataset(folder)
    assert not is_saved_dataset(tmp_path / "state" / "state.json")


def test_split_files_takes_the_first_suffix_and_any_name_of_a_split(tmp_path):
    for name in ("train.csv", "train.parquet", "valid.jsonl", "validation.txt", "other.txt", "test.tsv"):
        (tmp_path / name).write_text("")
    assert split_files(tmp_path) == {"train": tmp_path / "train.csv", "valid": tmp_path / "validation.txt",
                                     "test": None}
    (tmp_path / "test.parquet").write_text("")
    assert split_files(tmp_path)["test"] == tmp_path / "test.parquet"


QA = [Example("1 * 2", "1 * 2 = 2", "2"), Example("3 * 1", "", "3")]


def test_read_splits_of_a_line_format_file_and_of_a_directory(tmp_path):
    path = tmp_path / "all.txt"
    write_examples(path, QA)
    assert read_splits(path, Columns()) == {None: Split(str(path), QA, lines=True)}
    odd = tmp_path / "all.dat"
    write_examples(odd, QA)
    assert read_splits(str(odd), Columns()) == {None: Split(str(odd), QA, lines=True)}
    folder = tmp_path / "d"
    folder.mkdir()
    with pytest.raises(UserError) as error:
        read_splits(folder, Columns())
    assert str(error.value) == (f"{folder}: no data file in it (expected train, valid and test files ending in "
                                ".txt, .jsonl, .json, .csv, .parquet, or a directory written by datasets' save_to_disk)")
    write_examples(folder / "train.txt", QA)
    write_examples(folder / "test.txt", QA[:1])
    assert read_splits(folder, Columns()) == {"train": Split(str(folder / "train.txt"), QA, lines=True),
                                              "test": Split(str(folder / "test.txt"), QA[:1], lines=True)}


def test_read_splits_of_a_hub_dataset_a_saved_one_and_a_file_read_through_datasets(tmp_path, monkeypatch):
    loaded = {"train": Data(question=["q"], answer=["a"]), "dev": Data(question=["r"], answer=["b"])}
    monkeypatch.setattr(sources, "_load_hub", lambda source: loaded if source == "hf:x/y" else None)
    assert read_splits("hf:x/y", Columns()) == {"train": Split("hf:x/y (split train)", [Example("q", "", "a")])}
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    monkeypatch.setattr(sources, "_load_saved", lambda path: Data(question=["q"], answer=["a"]) if path == saved else 0)
    assert read_splits(saved, Columns()) == {None: Split(str(saved), [Example("q", "", "a")])}
    path = tmp_path / "d.csv"
    monkeypatch.setattr(sources, "_load_file", lambda p: Data(question=["q"], answer=["a"]) if p == path else 0)
    assert read_splits(path, Columns()) == {None: Split(str(path), [Example("q", "", "a")])}
    assert read_file(path, Columns()) == Split(str(path), [Example("q", "", "a")])


def test_a_directory_and_a_file_with_a_split_column_follow_the_mapping(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.csv").write_text("")
    path = tmp_path / "all.csv"
    tables = {folder / "train.csv": Data(q=["a"], answer=["1"]),
              path: Data(q=["a", "b"], answer=["1", "2"], part=["test", "train"])}
    monkeypatch.setattr(sources, "_load_file", lambda p: tables[p])
    mapped = Columns(question="q", split="part")
    assert read_splits(folder, mapped) == {"train": Split(str(folder / "train.csv"), [Example("a", "", "1")])}
    assert read_splits(path, mapped) == {"test": Split(f"{path} (split test)", [Example("a", "", "1")]),
                                         "train": Split(f"{path} (split train)", [Example("b", "", "2")])}


def test_an_error_in_a_file_read_through_datasets_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    monkeypatch.setattr(sources, "_load_file", lambda p: Data(question=["a"], answer=[" "]))
    with pytest.raises(UserError) as error:
        read_file(path, Columns())
    assert str(error.value) == f"{path} row 1: column 'answer' is empty; every example needs a question and an answer"


def test_read_split_by_any_name_and_the_test_split_by_default(tmp_path, monkeypatch):
    splits = {"train": Split("t", QA), "valid": Split("v", QA[:1])}
    mapped = Columns(question="q")
    monkeypatch.setattr(sources, "read_splits", lambda source, columns:
                        dict(splits) if (source, columns) == ("src", mapped) else {})
    assert read_split("src", mapped, "valid").label == "v"
    assert read_split("src", mapped, "validation").label == "v"
    assert read_split("src", mapped, "train").label == "t"
    with pytest.raises(UserError) as error:
        read_split("src", mapped, None)
    assert str(error.value) == "src: no 'test' split (splits: train, valid); name one that is there"
    with pytest.raises(UserError) as error:
        read_split("src", mapped, "dev")
    assert str(error.value) == "src: no 'dev' split (splits: train, valid); name one that is there"
    splits = {None: Split("whole", QA)}
    assert read_split("src", mapped, None).label == "whole"
    with pytest.raises(UserError) as error:
        read_split("src", mapped, "test")
    assert str(error.value) == "src: no 'test' split (splits: none (no split column)); name one that is there"
    with pytest.raises(UserError, match="^src: no 'dev' split"):
        read_split("src", mapped, "dev")
    splits = {"train": Split("t", QA), "test": Split("s", QA)}
    assert read_split("src", mapped, None).label == "s"


def test_read_run_data_takes_a_whole_source_as_train_and_files_in_place_of_splits(tmp_path):
    whole, other = tmp_path / "whole.txt", tmp_path / "other.txt"
    write_examples(whole, QA)
    write_examples(other, QA[:1])
    run = read_run_data(whole, {"valid": str(other), "test": None}, Columns())
    assert run == {"train": Split(str(whole), QA, lines=True), "valid": Split(str(other), QA[:1], lines=True),
                   "test": None}
    assert read_run_data(None, {"train": str(other)}, Columns())["train"].examples == QA[:1]
    with pytest.raises(UserError) as error:
        read_run_data(None, {"train": None, "test": str(other)}, Columns())
    assert str(error.value) == ("data: None: no training split (a train file, a dataset dict's 'train', or rows "
                                "whose split is train); give one, or train_file")


def test_read_run_data_reads_the_data_and_each_file_by_the_mapping(tmp_path, monkeypatch):
    data, test = tmp_path / "all.csv", tmp_path / "test.csv"
    tables = {data: Data(q=["a"], answer=["1"]), test: Data(q=["t"], answer=["2"])}
    monkeypatch.setattr(sources, "_load_file", lambda p: tables[p])
    run = read_run_data(data, {"test": str(test)}, Columns(question="q"))
    assert run == {"train": Split(str(data), [Example("a", "", "1")]), "valid": None,
                   "test": Split(str(test), [Example("t", "", "2")])}


def test_to_examples_maps_the_columns_and_reads_a_cot_of_steps():
    data = Data(problem=[" 2+2*3 ", "1+1"], steps=[["2*3=6 ", " 2+6=8"], None], solution=[8, "2"])
    mapped = Columns(question="problem", cot="steps", answer="solution")
    assert to_examples(data, mapped, "w") == [Example("2+2*3", "2*3=6 2+6=8", "8"), Example("1+1", "", "2")]
    data = Data(question=["q", "r"], answer=["a", "b"], cot=["c ", 3.5])
    assert to_examples(data, Columns(), "w") == [Example("q", "c", "a"), Example("r", "3.5", "b")]
    assert to_examples(Data(question=["q"], answer=["a"]), Columns(), "w") == [Example("q", "", "a")]


@pytest.mark.parametrize("columns, message", [
    (Columns(question="problem"),
     "w: no column 'problem' for the question (columns: question, answer); map it with --columns.question NAME"),
    (Columns(answer="sol"), "w: no column 'sol' for the answer (columns: question, answer); map it with --columns.answer NAME"),
    (Columns(cot="steps"), "w: no column 'steps' for the cot (columns: question, answer); map it with --columns.cot NAME")])
def test_a_column_that_is_not_there_is_named(columns, message):
    with pytest.raises(UserError) as error:
        to_examples(Data(question=["q"], answer=["a"]), columns, "w")
    assert str(error.value) == message


@pytest.mark.parametrize("question, answer, cot, message", [
    ("q", None, "", "w row 2: column 'answer' holds nothing (null); expected text"),
    ("q", True, "", "w row 2: column 'answer' holds a bool; expected text"),
    (["q"], "a", "", "w row 2: column 'question' holds a list; expected text"),
    ("  ", "a", "", "w row 2: column 'question' is empty; every example needs a question and an answer"),
    ("q", "a", {"x": 1}, "w row 2: column 'cot' holds a dict; expected text or a list of steps"),
    ("q", "a", True, "w row 2: column 'cot' holds a bool; expected text or a list of steps"),
    ("q", "a", ["s", 1], "w row 2: column 'cot' holds a list; expected text or a list of steps")])
def test_a_bad_value_is_an_error_naming_the_row(question, answer, cot, message):
    data = Data(question=["ok", question], answer=["ok", answer], cot=["", cot])
    with pytest.raises(UserError) as error:
        to_examples(data, Columns(), "w")
    assert str(error.value) == message


def test_numbers_are_text_and_rows_are_numbered_as_given():
    assert to_examples(Data(question=[7], answer=[0.5], cot=[0]), Columns(), "w") == [Example("7", "0", "0.5")]
    with pytest.raises(UserError, match="^w row 9: column 'answer' is empty"):
        to_examples(Data(question=["q", "r"], answer=["a", ""]), Columns(), "w", rows=[4, 9])


def test_gsm8k_answers_are_converted_when_told_or_when_the_first_holds_the_mark():
    gsm = Data(question=["q1", "q2"], answer=["<<2*3=6>>\n#### 6", "none\n#### 7"])
    expected = [Example("q1", "<<2*3=6>>", "6"), Example("q2", "", "7")]
    assert to_examples(gsm, Columns(), "w") == expected
    assert to_examples(gsm, Columns(answer_format="gsm8k"), "w") == expected
    assert to_examples(gsm, Columns(answer_format="plain"), "w")[0] == Example("q1", "", "<<2*3=6>>\n#### 6")
    late = Data(question=["q1", "q2"], answer=["6", "<<1=1>>\n#### 1"])
    assert to_examples(late, Columns(), "w") == [Example("q1", "", "6"), Example("q2", "", "<<1=1>>\n#### 1")]
    with_cot = Data(question=["q"], answer=["#### 1"], cot=["c"])
    assert to_examples(with_cot, Columns(), "w") == [Example("q", "c", "#### 1")]
    with pytest.raises(UserError) as error:
        to_examples(with_cot, Columns(answer_format="gsm8k"), "w")
    assert str(error.value) == ("w: columns.answer_format gsm8k takes the CoT from the answer's annotations, but "
                                "column 'cot' is mapped to the CoT; drop one of them")
    assert to_examples(Data(question=["q"], answer=[6]), Columns(), "w") == [Example("q", "", "6")]


def test_a_gsm8k_answer_without_the_mark_is_an_error_naming_its_row():
    gsm = Data(question=["q1", "q2", "q3"], answer=["<<1=1>>\n#### 1", "no mark", "also none"])
    with pytest.raises(UserError) as error:
        to_examples(gsm, Columns(answer_format="gsm8k"), "w", rows=[5, 6, 8])
    assert str(error.value) == ("w row 6: the answer has no '#### N' at its end (as GSM8K's worked solutions have); "
                                "2 of 3 records lack one")
    # a text the line format cannot hold is fine here: the run writes JSONL then
    assert to_examples(Data(question=["a || b"], answer=["<<1=1>>\n#### 1"]), Columns(), "w")[0].question == "a || b"


def test_gsm8k_answers_are_converted_without_a_progress_bar_and_a_missing_question_is_named(capsys):
    gsm = Data(question=["q", None], answer=["<<1=1>>\n#### 1", "#### 2"])
    assert to_examples(Data(question=["q"], answer=["<<1=1>>\n#### 1"]), Columns(), "w") == [Example("q", "<<1=1>>", "1")]
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError) as error:
        to_examples(gsm, Columns(), "w", rows=[3, 7])
    assert str(error.value) == f"w:7: missing field 'question'; expected {gsm8k.RECORD_SHAPE}"


def test_a_dataset_dict_gives_the_splits_it_knows_by_the_runs_names():
    loaded = {"train": Data(question=["q"], answer=["a"]), "validation": Data(question=["v"], answer=["b"]),
              "extra": Data(question=["x"], answer=["c"])}
    assert sources._dataset_splits("S", loaded, Columns()) == {
        "train": Split("S (split train)", [Example("q", "", "a")]),
        "valid": Split("S (split validation)", [Example("v", "", "b")])}
    with pytest.raises(UserError) as error:
        sources._dataset_splits("S", {"test": loaded["train"], "extra": loaded["extra"]}, Columns())
    assert str(error.value) == ("S: no 'train' split (splits: test, extra); expected train and, optionally, "
                                "validation and test")


def test_a_split_column_divides_the_rows_and_keeps_their_numbers():
    data = Data(question=["a", "b", "c", "d"], answer=["1", "2", "3", ""], part=["train", "test", "train", "valid"])
    with pytest.raises(UserError, match="^S \\(split valid\\) row 4: column 'answer' is empty"):
        sources._split_by_column("S", data, Columns(split="part"))
    data.columns["answer"][3] = "4"
    assert sources._split_by_column("S", data, Columns(split="part")) == {
        "train": Split("S (split train)", [Example("a", "", "1"), Example("c", "", "3")]),
        "test": Split("S (split test)", [Example("b", "", "2")]),
        "valid": Split("S (split valid)", [Example("d", "", "4")])}
    assert sources._split_by_column("S", data, Columns()) == {
        None: Split("S", [Example(q, "", a) for q, a in zip("abcd", "1234")], lines=False)}


def test_without_a_split_column_rows_are_lines_of_a_jsonl_file_and_errors_name_the_source(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n')
    data = Data(question=["a", "b"], answer=["1", "2"])
    assert sources._split_by_column(str(path), data, Columns()) == {
        None: Split(str(path), [Example("a", "", "1"), Example("b", "", "2")], lines=True)}
    with pytest.raises(UserError, match="^S row 2: column 'answer' is empty"):
        sources._split_by_column("S", Data(question=["a", "b"], answer=["1", ""]), Columns())
    with pytest.raises(UserError, match="^S \\(split train\\) row 1: column 'answer' is empty"):
        sources._dataset_splits("S", {"train": Data(question=["a"], answer=[""])}, Columns())


@pytest.mark.parametrize("part, message", [
    (["train", "dev"], "S row 2: column 'part' holds 'dev'; expected train, valid, validation or test "
                       "(set --columns.split to name another column)"),
    (["test", "validation"], "S: no row of split 'train' in column 'part'")])
def test_a_bad_split_column_is_an_error(part, message):
    with pytest.raises(UserError) as error:
        sources._split_by_column("S", Data(question=["a", "b"], answer=["1", "2"], part=part), Columns(split="part"))
    assert str(error.value) == message


@pytest.mark.parametrize("columns, message", [
    (Columns(question="x", split="part"), "S: no column 'x' for the question"),
    (Columns(answer="x", split="part"), "S: no column 'x' for the answer"),
    (Columns(cot="x", split="part"), "S: no column 'x' for the cot")])
def test_a_split_column_checks_the_mapping_first(columns, message):
    with pytest.raises(UserError) as error:
        sources._split_by_column("S", Data(question=["a"], answer=["1"], part=["dev"]), columns)
    assert str(error.value).startswith(message)


def test_one_record_a_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    assert sources._one_record_a_line(path, 2)
    assert not sources._one_record_a_line(path, 3)
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert not sources._one_record_a_line(path, 2)
    json = tmp_path / "d.json"
    json.write_text('{"a": 1}\n')
    assert sources._one_record_a_line(json, 1)
    csv = tmp_path / "d.csv"
    csv.write_text("a\n")
    assert not sources._one_record_a_line(csv, 1)
    assert not sources._one_record_a_line(tmp_path / "gone.jsonl", 0)


def test_default_jsonl_is_read_by_our_reader_without_datasets(tmp_path, monkeypatch):
    import importlib.util

    path = tmp_path / "d.jsonl"
    write_examples(path, QA)
    monkeypatch.setattr(sources, "_load_file", lambda p: pytest.fail("read through datasets"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "datasets" else 1)
    assert read_file(path, Columns()) == Split(str(path), QA, lines=True)
    assert sources._plain_jsonl_without_datasets(tmp_path / "d.json", Columns())
    assert not sources._plain_jsonl_without_datasets(tmp_path / "d.csv", Columns())
    assert not sources._plain_jsonl_without_datasets(path, Columns(question="q"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: 1)
    assert not sources._plain_jsonl_without_datasets(path, Columns())


def test_without_datasets_a_file_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError) as error:
        sources._datasets("d.csv")
    assert str(error.value) == ("d.csv: reading it needs the optional 'datasets' library (pip install "
                                "'implicit-cot[data]'); the line format (.txt) needs nothing")
    assert error.value.__suppress_context__


def test_without_datasets_a_csv_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq,a\n")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=f"^{path}: reading it needs the optional 'datasets' library"):
        read_file(path, Columns())
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    with pytest.raises(UserError, match=f"^{saved}: reading it needs the optional 'datasets' library"):
        read_splits(saved, Columns())


def test_first_line_and_check_file(tmp_path):
    assert sources._first_line(ValueError("  one\ntwo")) == "one"
    assert sources._first_line(ValueError("x" * 400)) == "x" * 300
    assert sources._first_line(KeyError()) == "KeyError"
    with pytest.raises(UserError) as error:
        sources._check_file(tmp_path / "no.parquet")
    assert str(error.value) == f"{tmp_path / 'no.parquet'}: no such file"
    with pytest.raises(UserError) as error:
        sources._check_file(tmp_path)
    assert str(error.value) == f"{tmp_path}: not a regular file; expected a data file"


def test_write_splits_writes_the_line_format_unless_a_text_cannot_be_one_line(tmp_path):
    splits = {"train": Split("t", QA), "valid": Split("v", [Example("a || b", "", "1")]),
              "test": Split("s", [Example("a\nb", "", "1")]), "more": Split("m", [Example("q", "c #### d", "1")])}
    folder = tmp_path / "new" / "data"
    written = write_splits(splits, folder)
    assert written == {"train": folder / "train.txt", "valid": folder / "valid.jsonl", "test": folder / "test.jsonl",
                       "more": folder / "more.jsonl"}
    assert {name: read_examples(path) for name, path in written.items()} == {
        name: split.examples for name, split in splits.items()}
    assert write_splits({"train": Split("t", QA[:1])}, folder) == {"train": folder / "train.txt"}
    assert read_examples(folder / "train.txt") == QA[:1]


def test_load_hub_takes_the_whole_dataset(monkeypatch):
    seen = []
    monkeypatch.setattr(gsm8k, "load_hub", lambda spec: seen.append(spec) or "all splits")
    assert sources._load_hub("hf:a/b:main") == "all splits"
    assert seen == [HubSpec("a/b", "main", None)]
    with pytest.raises(UserError, match="give the dataset without a split"):
        sources._load_hub("hf:a/b:main:test")


# these read real files through `datasets` (a few tenths of a second each)

def test_csv_is_read_as_text_with_empty_cells_kept(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "d.csv"
    path.write_text("\ufeffquestion,cot,answer\n0 0 7,,007\nNA,1,2\n")  # a byte-order mark is not a name
    assert read_file(path, Columns()) == Split(str(path), [Example("0 0 7", "", "007"), Example("NA", "1", "2")])
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(UserError) as error:
        read_file(empty, Columns())
    assert str(error.value) == f"{empty}: empty file, expected a header line naming the columns"


def test_jsonl_through_datasets_and_its_errors(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "a", "answer": "1"}\n{"q": "b", "answer": "2"}\n')
    assert read_file(path, Columns(question="q")) == Split(str(path), [Example("a", "", "1"), Example("b", "", "2")],
                                                           lines=True)
    path.write_text('{"q": "a", "answer": "1"}\n\n{"q": "b", "answer": "2"}\n')
    assert not read_file(path, Columns(question="q")).lines
    path.write_text('{"q": "a", "answer": "1"}\n{"q": "b", answer: 2}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: invalid JSON \(.+\); expected a JSON object, one per line$"):
        read_file(path, Columns(question="q"))
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"PAR1 broken")
    with pytest.raises(UserError, match=r"^.*d.parquet: not readable as parquet \(.+\)$") as error:
        read_file(parquet, Columns())
    assert not str(error.value).endswith("(None)")
    with pytest.raises(UserError, match="gone.csv: no such file"):
        read_file(tmp_path / "gone.csv", Columns())


def test_a_parquet_file_is_binary_and_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}).to_parquet(str(path))
    assert read_file(path, Columns()) == Split(str(path), [Example("q", "", "a")])


def test_a_file_read_through_datasets_is_held_in_memory_and_writes_no_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq,a\n")
    loaded = sources._load_file(path)
    assert loaded["question"] == ["q"] and loaded.cache_files == []
    assert not (tmp_path / "cache").exists()


def test_a_saved_dataset_is_read_and_a_damaged_one_is_one_error(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}).save_to_disk(str(saved))
    assert read_splits(saved, Columns()) == {None: Split(str(saved), [Example("q", "", "a")])}
    (saved / "state.json").write_text("{")
    with pytest.raises(UserError, match=r"saved: not readable as a saved dataset \(.+\)$") as error:
        read_splits(saved, Columns())
    assert not str(error.value).endswith("(None)")
