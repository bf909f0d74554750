"""`icot data gsm8k`: official GSM8K records to the papers' line format, byte for byte."""

import json
import os
import subprocess
import sys

import pytest

from icot.data.gsm8k import final_answer, is_number, solution_cot
from conftest import ROOT, run_cli
from test_cli_errors import one_line_error

# Official-shape records (question, worked solution ending in '#### N') whose converted lines
# are in the papers' files: (file, line number) -> record.
OFFICIAL = {
    ("test.txt", 1): {
        "question": "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
                    "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
                    "per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
        "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day "
                  "at the farmer’s market.\n#### 18",
    },
    ("test.txt", 2): {
        "question": "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?",
        "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts "
                  "of fabric\n#### 3",
    },
    ("test.txt", 3): {
        "question": "Josh decides to try flipping a house.  He buys a house for $80,000 and then puts in $50,000 in "
                    "repairs.  This increased the value of the house by 150%.  How much profit did he make?",
        "answer": "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\nHe "
                  "increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\nSo the new value of the "
                  "house is 120,000+80,000=$<<120000+80000=200000>>200,000\nSo he made a profit of "
                  "200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000",
    },
    ("test.txt", 25): {  # no calculator annotations: an empty CoT in the papers' file
        "question": "Kyle bought last year's best-selling book for $19.50. This is with a 25% discount from the "
                    "original price. What was the original price of the book? ",
        "answer": "The book's original price is $19.50 / 0.75 = $26.\n#### 26",
    },
    ("test.txt", 147): {  # the answer keeps its thousands separator in the papers' file
        "question": "Johnny is picking up the toys on the floor of his room.  He'd dumped a lego boxed set with 500 "
                    "pieces on the floor, and another one that had 3 times more pieces than the 500 piece one, and "
                    "another one that had 1/4 the number of pieces.  How many blocks does Johnny pick up if he picks "
                    "up all the legos?",
        "answer": "The second set had 500*3=<<500*3=1500>>1500 pieces\nThe third set had 500*.25=<<500*.25=125>>125 "
                  "pieces\nSo in total there were 500+1500+125=<<500+1500+125=2125>>2125 pieces\n#### 2,125",
    },
    ("valid.txt", 1): {
        "question": "John cuts his grass to 2 inches.  It grows .5 inches per month.  When it gets to 4 inches he cuts "
                    "it back down to 2 inches.  It cost $100 to get his grass cut.  How much does he pay per year?",
        "answer": "He cuts his grass 4-2=<<4-2=2>>2 inches at a time\nIt grows back in 2/.5=<<2/.5=4>>4 months\nSo he "
                  "cuts it 12/4=<<12/4=3>>3 times a year\nThat costs 100*3=$<<100*3=300>>300\n#### 300",
    },
}


def write_jsonl(path, records, ensure_ascii=True):
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records), encoding="utf-8")
    return path


def reference_lines(reference) -> list[bytes]:
    lines = []
    for name, number in OFFICIAL:
        lines.append((reference / "gsm8k" / name).read_bytes().split(b"\n")[number - 1])
    return lines


@pytest.fixture
def official(tmp_path):
    return write_jsonl(tmp_path / "official.jsonl", OFFICIAL.values())


def test_matches_the_papers_files_byte_for_byte(official, tmp_path, reference, capsys):
    out = tmp_path / "gsm8k.txt"
    assert run_cli("data", "gsm8k", "--input", official, "--out", out, "--keep-commas") == 0
    assert out.read_bytes() == b"\n".join(reference_lines(reference)) + b"\n"
    printed = capsys.readouterr().out
    assert f"{out}: 6 examples from 6 records" in printed
    assert "1 record without <<...>> annotations: kept with an empty CoT (line 4)" in printed


def test_default_removes_thousands_separators(official, tmp_path, reference, capsys):
    out = tmp_path / "gsm8k.txt"
    assert run_cli("data", "gsm8k", "--input", official, "--out", out) == 0
    expected = [line.replace(b"#### 2,125", b"#### 2125") for line in reference_lines(reference)]
    assert out.read_bytes().split(b"\n")[:-1] == expected
    assert "thousands separators removed from 1 answer" in capsys.readouterr().out


def test_jsonl_output_and_unescaped_input_give_the_same_examples(tmp_path):
    from icot.data.format import read_examples

    ascii_in = write_jsonl(tmp_path / "a.jsonl", OFFICIAL.values())
    utf8_in = write_jsonl(tmp_path / "u.jsonl", OFFICIAL.values(), ensure_ascii=False)
    assert run_cli("data", "gsm8k", "--input", ascii_in, "--out", tmp_path / "a.txt") == 0
    assert run_cli("data", "gsm8k", "--input", utf8_in, "--out", tmp_path / "converted.jsonl") == 0
    assert read_examples(tmp_path / "a.txt") == read_examples(tmp_path / "converted.jsonl")


def test_incomplete_records_kept_or_dropped(tmp_path, capsys):
    records = [
        {"question": "Q1?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
        {"question": "Q2?", "answer": "Just 5.\n#### 5"},                # no annotations
        {"question": "Q3?", "answer": "3/6=<<3/6=0.5>>0.5\n#### 1/2"},   # answer not a number
        {"question": "Q4?", "answer": "No final answer line"},           # no answer: always dropped
        {"question": "Q5?", "answer": "1-4=<<1-4=-3>>-3\n#### -3"},
    ]
    source = write_jsonl(tmp_path / "r.jsonl", records)
    kept, dropped = tmp_path / "kept.txt", tmp_path / "dropped.txt"
    assert run_cli("data", "gsm8k", "--input", source, "--out", kept) == 0
    printed = capsys.readouterr().out
    assert kept.read_text().splitlines() == ["Q1?||<<2+2=4>> #### 4", "Q2?|| #### 5", "Q3?||<<3/6=0.5>> #### 1/2",
                                             "Q5?||<<1-4=-3>> #### -3"]
    assert "1 record whose answer is not a number: kept as written (line 3)" in printed
    assert "1 record without a '#### N' answer: dropped (line 4)" in printed
    assert run_cli("data", "gsm8k", "--input", source, "--out", dropped, "--incomplete", "drop") == 0
    printed = capsys.readouterr().out
    assert dropped.read_text().splitlines() == ["Q1?||<<2+2=4>> #### 4", "Q5?||<<1-4=-3>> #### -3"]
    assert f"{dropped}: 2 examples from 5 records" in printed
    assert "1 record without <<...>> annotations: dropped (line 2)" in printed


def test_line_breaks_in_questions_are_joined(tmp_path, capsys):
    source = write_jsonl(tmp_path / "r.jsonl", [{"question": "Line one.\nLine two?", "answer": "<<1+1=2>>2\n#### 2"}])
    assert run_cli("data", "gsm8k", "--input", source, "--out", tmp_path / "o.txt") == 0
    assert (tmp_path / "o.txt").read_text() == "Line one. Line two?||<<1+1=2>> #### 2\n"
    assert "with line breaks in the question: joined with single spaces (line 1)" in capsys.readouterr().out


@pytest.mark.parametrize("content, fragment", [
    ('{"question": "Q?", "answer": "#### 1"}\n{"question": "Q?", "answer": \n', ":2: invalid JSON"),
    ('["Q?", "#### 1"]\n', ":1: expected a GSM8K record"),
    ('{"question": "Q?"}\n', ":1: missing field 'answer'"),
    ('{"question": "Q?", "answer": 12}\n', ":1: field 'answer' must be a string"),
    ('{"question": "  ", "answer": "#### 1"}\n', ":1: empty field 'question'"),
    ('{"question": "a||b?", "answer": "#### 1"}\n', ":1: its text contains '||' or '####'"),
    ('{"question": "Q?", "answer": "no answer"}\n', "no example to write from its 1 records (1 record without a '#### N'"),
    ("\n\n", "empty file"),
])
def test_bad_records_are_one_line_errors(tmp_path, capsys, content, fragment):
    source = tmp_path / "bad.jsonl"
    source.write_text(content)
    line = one_line_error(capsys, run_cli("data", "gsm8k", "--input", source, "--out", tmp_path / "o.txt"))
    assert fragment in line
    assert not (tmp_path / "o.txt").exists()


def test_unwritable_as_a_line_is_fine_as_jsonl(tmp_path):
    from icot.data.format import read_examples

    source = write_jsonl(tmp_path / "r.jsonl", [{"question": "a||b?", "answer": "<<1+1=2>>\n#### 2"}])
    assert run_cli("data", "gsm8k", "--input", source, "--out", tmp_path / "o.jsonl") == 0
    assert read_examples(tmp_path / "o.jsonl")[0].question == "a||b?"


def test_never_overwrites(official, tmp_path, capsys):
    out = tmp_path / "mine.txt"
    out.write_text("my notes\n")
    assert "--overwrite" in one_line_error(capsys, run_cli("data", "gsm8k", "--input", official, "--out", out))
    assert out.read_text() == "my notes\n"
    line = one_line_error(capsys, run_cli("data", "gsm8k", "--input", official, "--out", official, "--overwrite"))
    assert "is the input file" in line and official.read_text().startswith("{")
    assert run_cli("data", "gsm8k", "--input", official, "--out", out, "--overwrite") == 0
    assert out.read_text().startswith("Janet’s ducks")


def test_solution_parts():
    assert solution_cot("a <<1+1=2>>2 b <<2*3=6>>6\n#### 6") == "<<1+1=2>> <<2*3=6>>"
    assert solution_cot("no annotations\n#### 6") == ""
    assert final_answer("x\n#### 1,000 ") == "1,000" and final_answer("x") is None and final_answer("x ####") is None
    assert all(map(is_number, ["18", "-3", "1,000", "1,450,000", "2.5"]))
    assert not any(map(is_number, ["1/2", "$5", "1,00", "five", "1 000"]))


# ----- hf:NAME ------------------------------------------------------------------------------

def test_hub_without_datasets_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    line = one_line_error(capsys, run_cli("data", "gsm8k", "--input", "hf:openai/gsm8k:main:test", "--out", tmp_path / "o.txt"))
    assert "needs the optional 'datasets' library" in line and "implicit-cot[hub]" in line


@pytest.mark.parametrize("spec", ["hf:", "hf:a:b:c:d"])
def test_bad_hub_spec(tmp_path, capsys, spec):
    line = one_line_error(capsys, run_cli("data", "gsm8k", "--input", spec, "--out", tmp_path / "o.txt"))
    assert "expected hf:NAME[:CONFIG[:SPLIT]]" in line


def test_hub_dataset_goes_through_the_same_converter(official, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = list(OFFICIAL.values())
    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert run_cli("data", "gsm8k", "--input", "hf:openai/gsm8k:main:test", "--out", tmp_path / "hub.txt") == 0
    assert run_cli("data", "gsm8k", "--input", official, "--out", tmp_path / "file.txt") == 0
    assert (tmp_path / "hub.txt").read_bytes() == (tmp_path / "file.txt").read_bytes()
    assert calls == [("openai/gsm8k", "main", "test")]


def test_hub_dataset_with_several_splits_asks_for_one(tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    both = datasets.DatasetDict({split: datasets.Dataset.from_list(list(OFFICIAL.values())) for split in ("train", "test")})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None: both)
    line = one_line_error(capsys, run_cli("data", "gsm8k", "--input", "hf:openai/gsm8k:main", "--out", tmp_path / "o.txt"))
    assert "has splits train, test; name one, e.g. hf:openai/gsm8k:main:train" in line


def test_hub_offline_is_a_one_line_error(tmp_path):
    pytest.importorskip("datasets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"),
           "HF_HOME": str(tmp_path / "hf")}  # an empty cache: nothing to fall back on
    done = subprocess.run([sys.executable, "-m", "icot.cli", "data", "gsm8k", "--input", "hf:openai/gsm8k:main:test",
                           "--out", str(tmp_path / "o.txt")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icot: error: cannot load hf:openai/gsm8k:main:test with datasets")


def test_exclude_drops_questions_of_other_files(official, tmp_path, reference, capsys):
    out = tmp_path / "train.txt"
    assert run_cli("data", "gsm8k", "--input", official, "--out", out, "--exclude", reference / "gsm8k" / "valid.txt") == 0
    assert len(out.read_text().splitlines()) == 5 and "John cuts his grass" not in out.read_text()
    assert "1 record whose question is in an --exclude file: dropped (line 6)" in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    ["train", "--train-file", "hf:openai/gsm8k:main:train", "--out", "{tmp}/run"],
    ["data", "stats", "hf:openai/gsm8k:main:test"],
])
def test_other_commands_point_hub_names_to_the_converter(tmp_path, capsys, args):
    line = one_line_error(capsys, run_cli(*[a.format(tmp=tmp_path) for a in args]))
    assert "hub datasets are read by 'icot data gsm8k'" in line and "--input hf:openai/gsm8k" in line


def test_training_on_a_hub_dataset_converts_its_splits_into_the_run(official, tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    rows = list(OFFICIAL.values())
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:3])})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None: splits)
    run = tmp_path / "run"
    assert run_cli("train", "--data", "hf:openai/gsm8k:main", "--model", "micro", "--max-steps", "2",
                   "--out", run) == 0
    assert run_cli("data", "gsm8k", "--input", official, "--out", tmp_path / "file.txt") == 0
    assert (run / "data" / "train.txt").read_bytes() == (tmp_path / "file.txt").read_bytes()
    assert len((run / "data" / "test.txt").read_text().splitlines()) == 3 and not (run / "data" / "valid.txt").exists()
    end = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and "test_accuracy" in end
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("icot: warning: ")]
    assert any("data hf:openai/gsm8k:main: no validation split" in w and "--valid-file" in w for w in warnings)


def test_training_on_a_hub_split_asks_for_the_dataset(tmp_path, capsys):
    line = one_line_error(capsys, run_cli("train", "--data", "hf:openai/gsm8k:main:train", "--out", tmp_path / "run"))
    assert "give the dataset without a split (hf:NAME[:CONFIG])" in line
