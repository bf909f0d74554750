"""Bad input: one line on stderr, exit code 2, no traceback."""

import sys

import pytest

from conftest import run_cli


def one_line_error(capsys, code):
    """Exit code 2 and one line of error (warnings about the data, such as copied splits, may come first)."""
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("icot: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("icot: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_missing_and_empty_and_malformed_data_files(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    assert "no such file" in one_line_error(capsys, run_cli("data", "stats", missing))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty file" in one_line_error(capsys, run_cli("data", "stats", empty))
    no_bars = tmp_path / "nobars.txt"
    no_bars.write_text("1 2 * 3 4||1 #### 2\n1 2 * 3 4 #### 2\n")
    assert f"{no_bars}:2: no '||'" in one_line_error(capsys, run_cli("data", "stats", no_bars))
    no_hash = tmp_path / "nohash.txt"
    no_hash.write_text("1 2 * 3 4||1 2\n")
    assert f"{no_hash}:1: no '####'" in one_line_error(capsys, run_cli("data", "stats", no_hash))


def test_training_data_errors(tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.txt").write_text("1 * 2||2 #### 2\n1 * 3 #### 3\n")
    line = one_line_error(capsys, run_cli("train", "--data", folder, "--out", tmp_path / "run"))
    assert f"{folder / 'train.txt'}:2:" in line
    assert "not a directory" in one_line_error(capsys, run_cli("train", "--data", tmp_path / "none", "--out", tmp_path / "r"))


def test_unknown_config_key_lists_valid_keys(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: explicit\nlearning_rate: 0.1\n")
    line = one_line_error(capsys, run_cli("train", "--config", config, "--out", tmp_path / "r"))
    assert "unknown key 'learning_rate'" in line and "valid keys:" in line and "lr" in line
    line = one_line_error(capsys, run_cli("train", "--method", "stepwise", "--data", tmp_path, "--remove-per-epok", "3"))
    assert "unknown key 'remove_per_epok'" in line


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "fast"], "lr: expected a number, got 'fast'"),
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--precision", "fp8"], "'fp8' is not one of fp32, bf16"),
    (["--epochs", "2.5"], "epochs: expected an integer"),
    (["--method", "magic"], "method 'magic' is unknown"),
    (["--method", "stepwise", "--removal-side", "middle"], "'middle' is not one of left, right"),
])
def test_invalid_values(tmp_path, capsys, args, fragment):
    (tmp_path / "train.txt").write_text("1 * 2||2 #### 2\n")
    line = one_line_error(capsys, run_cli("train", "--data", tmp_path, "--out", tmp_path / "r", *args))
    assert fragment in line


def test_invalid_yaml_and_missing_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    assert "invalid YAML" in one_line_error(capsys, run_cli("train", "--config", bad))
    assert "no such config file" in one_line_error(capsys, run_cli("train", "--config", tmp_path / "none.yaml"))


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("1 * 2||2 #### 2\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    line = one_line_error(capsys, run_cli("train", "--data", tmp_path, "--out", run))
    assert "--overwrite" in line and (run / "notes.txt").read_text() == "mine"


def test_predict_and_eval_bad_input(explicit_run, tmp_path, capsys):
    best = explicit_run / "best"
    assert "vocabulary has no 'hello'" in one_line_error(capsys, run_cli("predict", "--model", best, "hello world"))
    assert "empty input" in one_line_error(capsys, run_cli("predict", "--model", best, "  "))
    assert "nomodel: no such directory" in one_line_error(capsys, run_cli("predict", "--model", tmp_path / "nomodel", "1*2"))
    assert "no such file" in one_line_error(capsys, run_cli("eval", "--model", best, "--data", tmp_path / "x.txt"))
    assert "unrecognized arguments" in one_line_error(capsys, run_cli("eval", "--model", best, "--data", "x", "--bogus"))


def test_lm_eval_without_the_extra_says_how_to_install_it(monkeypatch, capsys):
    # every lm_eval module (a submodule already imported would be found without its package) fails to
    # import, as when it is not installed
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "icot.lm_eval", raising=False)
    message = one_line_error(capsys, run_cli("lm-eval", "--model", "icot", "--tasks", "icot_mult_4x4"))
    assert "pip install 'implicit-cot[lmeval]'" in message
