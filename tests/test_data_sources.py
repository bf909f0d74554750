"""Data through `datasets`: every format gives the examples of the equivalent line-format file; the
column mapping; the errors (one line, nothing written). Nothing is downloaded: datasets are built here."""

from __future__ import annotations

import json
import re
import sys

import pytest

from conftest import mult_examples, run_cli
from icot.data.format import Example, read_examples, write_examples
from icot.data.sources import Columns, read_run_data, read_split, read_splits
from icot.errors import UserError

datasets = pytest.importorskip("datasets")

EXAMPLES = mult_examples(2, 2, 12, seed=3)


def records(examples, **renamed) -> dict:
    """The examples as columns, under the names in `renamed` (question=..., cot=..., answer=...)."""
    names = {"question": "question", "cot": "cot", "answer": "answer", **renamed}
    return {names[field]: [getattr(e, field) for e in examples] for field in ("question", "cot", "answer")}


def write_as(path, dataset):
    {".jsonl": dataset.to_json, ".csv": lambda p: dataset.to_csv(p, index=False),
     ".parquet": dataset.to_parquet}[path.suffix](str(path))
    return path


def one_line_error(capsys, code) -> str:
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_each_format_gives_the_examples_of_the_text_file(tmp_path, suffix):
    text = tmp_path / "train.txt"
    write_examples(text, EXAMPLES)
    path = write_as(tmp_path / f"train{suffix}", datasets.Dataset.from_dict(records(EXAMPLES)))
    assert read_split(path, Columns(), None).examples == read_examples(text) == EXAMPLES


def test_csv_keeps_text_as_written(tmp_path):
    """pandas alone would read `007` as 7 and an empty cell as missing."""
    path = tmp_path / "d.csv"
    path.write_text("question,cot,answer\n0 0 7 * 1,,007\n")
    assert read_split(path, Columns(), None).examples == [Example("0 0 7 * 1", "", "007")]


def test_saved_dataset_dict_and_directory_of_files(tmp_path):
    train, valid, test = EXAMPLES[:8], EXAMPLES[8:10], EXAMPLES[10:]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(records(train)),
                          "validation": datasets.Dataset.from_dict(records(valid)),
                          "test": datasets.Dataset.from_dict(records(test))}).save_to_disk(str(saved))
    folder = tmp_path / "files"
    folder.mkdir()
    write_examples(folder / "train.txt", train)
    write_as(folder / "validation.parquet", datasets.Dataset.from_dict(records(valid)))
    write_as(folder / "test.csv", datasets.Dataset.from_dict(records(test)))
    for source in (saved, folder):
        splits = read_run_data(source, {"train": None, "valid": None, "test": None}, Columns())
        assert {name: split.examples for name, split in splits.items()} == {"train": train, "valid": valid, "test": test}
    assert read_split(saved, Columns(), "valid").examples == valid


def test_a_split_column_and_a_file_in_place_of_a_split(tmp_path):
    data = {**records(EXAMPLES), "split": ["train"] * 9 + ["validation"] * 2 + ["test"]}
    path = write_as(tmp_path / "all.parquet", datasets.Dataset.from_dict(data))
    splits = read_splits(path, Columns())
    assert [splits[s].examples for s in ("train", "valid", "test")] == [EXAMPLES[:9], EXAMPLES[9:11], EXAMPLES[11:]]
    other = tmp_path / "other.txt"
    write_examples(other, EXAMPLES[:1])
    run = read_run_data(path, {"train": None, "valid": None, "test": str(other)}, Columns())
    assert run["test"].examples == EXAMPLES[:1] and run["valid"].examples == EXAMPLES[9:11]


def test_column_mapping_and_cot_as_steps(tmp_path):
    data = {"problem": ["2+2*3"], "steps": [["2*3=6", "2+6=8"]], "solution": [8]}
    path = write_as(tmp_path / "d.parquet", datasets.Dataset.from_dict(data))
    mapped = Columns(question="problem", cot="steps", answer="solution")
    assert read_split(path, mapped, None).examples == [Example("2+2*3", "2*3=6 2+6=8", "8")]


def test_gsm8k_style_answer_field_is_found_and_converted(tmp_path):
    gsm = {"question": ["Tom has 2 bags of 3 apples. How many?"], "answer": ["2 bags <<2*3=6>>6 apples\n#### 6"]}
    path = write_as(tmp_path / "gsm.jsonl", datasets.Dataset.from_dict(gsm))
    expected = [Example("Tom has 2 bags of 3 apples. How many?", "<<2*3=6>>", "6")]
    assert read_split(path, Columns(), None).examples == expected
    plain = read_split(path, Columns(answer_format="plain"), None).examples
    assert plain[0].answer.endswith("#### 6") and plain[0].cot == ""


@pytest.mark.parametrize("columns, message", [
    (Columns(question="problem"), "no column 'problem' for the question (columns: question, cot, answer)"),
    (Columns(cot="steps"), "no column 'steps' for the cot (columns: question, cot, answer)"),
    (Columns(answer_format="gsm8k", cot="cot"), "answer_format gsm8k takes the CoT from the answer"),
])
def test_a_mapping_that_matches_nothing_names_the_columns(tmp_path, columns, message):
    path = write_as(tmp_path / "d.parquet", datasets.Dataset.from_dict(records(EXAMPLES)))
    with pytest.raises(UserError, match=re.escape(message)):
        read_split(path, columns, None)


def test_empty_values_are_errors_naming_the_row(tmp_path):
    rows = records(EXAMPLES[:3])
    rows["answer"][1] = None
    path = write_as(tmp_path / "d.jsonl", datasets.Dataset.from_dict(rows))
    with pytest.raises(UserError, match=r"d.jsonl row 2: column 'answer' holds nothing \(null\)"):
        read_split(path, Columns(), None)
    rows = records(EXAMPLES[:3])
    rows["question"][2] = "  "
    path = write_as(tmp_path / "e.csv", datasets.Dataset.from_dict(rows))
    with pytest.raises(UserError, match=r"e.csv row 3: column 'question' is empty"):
        read_split(path, Columns(), None)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="missing.parquet: no such file"):
        read_split(tmp_path / "missing.parquet", Columns(), None)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(UserError, match=r"broken.parquet: not readable as parquet \("):
        read_split(broken, Columns(), None)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "1 * 2", "answer": "2"}\n\n{"question": "1 * 3" "answer": "3"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:3: invalid JSON \(Expecting ',' delimiter\); expected a JSON object, one"):
        read_split(bad_json, Columns(), None)
    bad_json.write_text('{"question": "1 * 2", "answer": "2"}\r\n[1, 2]\n')  # lines end at \n, as JSONL's do
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected a JSON object, got a JSON list$"):
        read_split(bad_json, Columns(), None)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(records(EXAMPLES))}).save_to_disk(str(saved))
    with pytest.raises(UserError, match=r"saved: no 'test' split \(splits: train\)"):
        read_split(saved, Columns(), None)
    with pytest.raises(UserError, match=r"bad split column.*holds 'dev'"):
        read_splits(write_as(tmp_path / "bad split column.parquet",
                             datasets.Dataset.from_dict({**records(EXAMPLES[:1]), "split": ["dev"]})), Columns())


def test_import_icot_data_does_not_import_datasets():
    import subprocess

    code = "import sys, icot.data, icot.data.sources; print('datasets' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# ----- the commands ----------------------------------------------------------------------------

TRAIN = ["--model", "micro", "--max-steps", "3", "--batch-size", "4", "--eval-every", "3", "--log-every", "1"]


def test_train_from_parquet_with_a_split_column_and_renamed_question(tmp_path, capsys):
    data = {**records(EXAMPLES, question="q"), "split": ["train"] * 8 + ["valid"] * 2 + ["test"] * 2}
    path = write_as(tmp_path / "all.parquet", datasets.Dataset.from_dict(data))
    run = tmp_path / "run"
    line = one_line_error(capsys, run_cli("train", "--data", path, "--out", run, *TRAIN))
    assert "no column 'question' for the question (columns: q, cot, answer, split)" in line
    assert not run.exists()  # nothing written
    assert run_cli("train", "--data", path, "--columns.question", "q", "--out", run, *TRAIN) == 0
    end = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["test_examples"] == 2
    best = json.loads((run / "best" / "icot.json").read_text())
    assert best["train_examples"] == 8 and best["config"]["columns"]["question"] == "q"
    capsys.readouterr()
    assert run_cli("eval", "--model", run / "best", "--data", path, "--columns.question", "q", "--split", "valid") == 0
    assert "examples               2" in capsys.readouterr().out


def test_train_without_validation_warns_once_how_to_add_one(tmp_path, capsys):
    path = write_as(tmp_path / "train.csv", datasets.Dataset.from_dict(records(EXAMPLES)))
    assert run_cli("train", "--data", path, "--out", tmp_path / "run", *TRAIN) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "no validation split" in line]
    assert len(warnings) == 1 and "--valid-file" in warnings[0]


def test_data_stats_reads_every_format(tmp_path, capsys):
    text = tmp_path / "t.txt"
    write_examples(text, EXAMPLES)
    parquet = write_as(tmp_path / "t.parquet", datasets.Dataset.from_dict(records(EXAMPLES)))
    assert run_cli("data", "stats", text, parquet) == 0
    rows = [line.split(" | ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith(("| " + str(tmp_path)))]
    assert len(rows) == 2 and rows[0] == rows[1] and rows[0].startswith("12 |")


def test_hub_dataset_with_other_column_names_trains_through_the_mapping(tmp_path, monkeypatch, capsys):
    """Before, a hub dataset not shaped as GSM8K dropped every row; no download: load_dataset is replaced."""
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(records(EXAMPLES[:10], question="input")),
                                   "test": datasets.Dataset.from_dict(records(EXAMPLES[10:], question="input"))})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None: splits)
    run = tmp_path / "run"
    assert run_cli("train", "--data", "hf:someone/mult", "--columns.question", "input", "--out", run, *TRAIN) == 0
    assert read_examples(run / "data" / "train.txt") == EXAMPLES[:10]
    assert read_examples(run / "data" / "test.txt") == EXAMPLES[10:] and not (run / "data" / "valid.txt").exists()
    assert sum("no validation split" in line for line in capsys.readouterr().err.splitlines()) == 1
