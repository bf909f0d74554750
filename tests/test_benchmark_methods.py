"""benchmarks/methods.py: models of any method measured side by side on one test file."""

import json

import pytest

from benchmarks import methods


def test_a_run_and_a_model_directory_side_by_side(explicit_run, mult3_data, tmp_path, capsys):
    out = tmp_path / "methods.md"
    assert methods.main(["--test", str(mult3_data / "test.txt"), "--speed-examples", "4", "--out", str(out),
                         f"run={explicit_run}", f"model={explicit_run / 'best'}"]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    end = next(json.loads(line) for line in (explicit_run / "metrics.jsonl").read_text().splitlines()
               if '"end"' in line)
    run, model = saved["results"]["run"], saved["results"]["model"]
    assert run["accuracy"] == model["accuracy"] == end["test_accuracy"]  # the same best model, the same test file
    assert run["accuracy"] == 1.0  # a known answer: the model memorised these 32 examples (test = train)
    assert run["train_seconds"] == end["train_seconds"] and run["train_examples"] > 0
    assert model["train_seconds"] is None and run["examples_per_s_batch1"] > 0
    table = out.read_text()
    assert "| model | " in table and table.split("| model | ")[1].split("\n")[0].endswith("| – | – |")
    capsys.readouterr()


def test_bad_arguments_are_one_line_errors(mult3_data, tmp_path, capsys):
    test = str(mult3_data / "test.txt")
    (tmp_path / "mine.md").write_text("my notes")
    for argv, fragment in ((["--test", test, "nonsense"], "not NAME=DIRECTORY"),
                           (["--test", test, f"x={tmp_path / 'missing'}"], "not NAME=DIRECTORY"),
                           (["--test", str(tmp_path / "missing.txt"), f"x={tmp_path}"], "no such file"),
                           (["--test", test, "--out", str(tmp_path / "mine.md"), f"x={tmp_path}"], "pass --overwrite"),
                           (["--test", test, "--out", str(tmp_path / "mine.md" / "t.md"), f"x={tmp_path}"],
                            "is a file, not a directory"),
                           (["--test", test, "--out", test, "--overwrite", f"x={tmp_path}"], "is the input file")):
        with pytest.raises(SystemExit) as exit_:
            methods.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and fragment in err.splitlines()[-1]
    assert (tmp_path / "mine.md").read_text() == "my notes"


def test_a_run_resumed_after_its_end_costs_what_its_last_end_says(explicit_run, tmp_path):
    import shutil

    from conftest import run_cli
    from icot.report import training_cost

    run = tmp_path / "explicit"
    shutil.copytree(explicit_run, run)
    assert run_cli("train", "--resume", run, "--epochs", "202") == 0
    ends = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"end"' in line]
    assert len(ends) == 2 and ends[1]["step"] == 202
    cost = training_cost(run)
    assert cost["train_seconds"] == ends[1]["train_seconds"] and cost["train_examples"] == 202 * 32
    assert 0 < cost["train_cpu_seconds"] == ends[1]["train_cpu_seconds"]
