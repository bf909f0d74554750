"""Hostile input, what icot writes: a string stays the string the user typed, no output lands on
or inside an input, only regular files are read, one command writes a run at a time, and every
output is replaced whole (a full disk, Ctrl-C or a crash leaves the old file, never part of a
new one), checkpoints included."""

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from conftest import mult_examples, run_cli
from icot import paths
from icot.cli import build_train_config
from icot.data.format import write_examples
from test_hostile import one_line_error, refused, snapshot

TRAIN = ["--model", "micro", "--batch-size", "16", "--max-eval-examples", "8", "--log-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    examples = mult_examples(2, 2, 80, seed=1)
    write_examples(out / "train.txt", examples[:64])
    write_examples(out / "valid.txt", examples[64:72])
    write_examples(out / "test.txt", examples[72:])
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A finished 4-step run, checkpoints at steps 2 and 4 (tests change copies only)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert run_cli("train", "--data", data, "--out", out, *TRAIN, "--max-steps", "4", "--save-every", "2",
                   "--keep-checkpoints", "2") == 0
    return out


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


# ----- 1. strings stay as typed ------------------------------------------------------------------

@pytest.mark.parametrize("text", ["007", "0007", "1e3", "exp_run #2", "true", "1_000", "0x10", ".inf", "yes",
                                  "2026-12-07", "12:30", "[a]", "{b}"])
def test_a_string_field_keeps_the_text_typed(text, data):
    _, config = build_train_config(None, "explicit", ["--out", text, "--tokenizer", text, "--data", str(data)])
    assert (config.out, config.tokenizer) == (text, text)


@pytest.mark.parametrize("text", ["007", "1e3", "true", "1_000", "2026-12-07"])
def test_a_string_field_in_yaml_keeps_the_text_written(text, data, tmp_path):
    (tmp_path / "c.yaml").write_text(f"data: {data}\nout: {text}\ntokenizer: {text}\nmax_steps: 3\n")
    _, config = build_train_config(str(tmp_path / "c.yaml"), None, [])
    assert (config.out, config.tokenizer, config.max_steps) == (text, text, 3)


@pytest.mark.parametrize("argv, field, value", [
    (["--max-steps", "007"], "max_steps", 7), (["--lr", "1e-3"], "lr", 1e-3), (["--lr", "2"], "lr", 2.0),
    (["--keep-position"], "keep_position", True), (["--no-keep-position"], "keep_position", False),
    (["--tokenizer", "null"], "tokenizer", None), (["--max-steps", "null"], "max_steps", None),
])
def test_other_fields_take_yamls_reading(argv, field, value, data):
    _, config = build_train_config(None, "stepwise", ["--data", str(data), "--out", "r", *argv])
    assert getattr(config, field) == value


@pytest.mark.parametrize("argv", [["--max-steps="], ["--out="], ["--lr", " "], ["--seed="]])
def test_an_empty_value_is_an_error(argv, capsys, tmp_path):
    line = one_line_error(capsys, run_cli("train", "--data", tmp_path, *argv))
    assert "a value is required" in line and argv[0].split("=")[0] in line


def test_a_comment_sign_in_out_does_not_replace_another_run(run, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run, tmp_path / "exp_run")
    shutil.copytree(run, tmp_path / "7")
    before = snapshot(tmp_path / "exp_run"), snapshot(tmp_path / "7")
    for out in ("exp_run #2", "0007"):
        assert run_cli("train", "--data", data, "--out", out, *TRAIN, "--max-steps", "1", "--overwrite") == 0
        assert (tmp_path / out / "best" / "icot.json").is_file()
    assert (snapshot(tmp_path / "exp_run"), snapshot(tmp_path / "7")) == before


# ----- 2. no output on or inside an input --------------------------------------------------------

@pytest.mark.parametrize("target", ["best/icot.json", "best/model.safetensors", "config.yaml", "best/new.json",
                                    "metrics.jsonl", "checkpoints/latest"])
def test_eval_json_never_lands_in_the_model_or_its_run(run_copy, data, tmp_path, capsys, target):
    refused(capsys, ["eval", "--model", run_copy / "best", "--data", data / "test.txt", "--json", run_copy / target,
                     "--overwrite"], "--json", tmp_path)


def test_eval_json_may_not_replace_a_file_of_a_saved_model(run_copy, data, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(run_copy / "best", model)
    refused(capsys, ["eval", "--model", run_copy / "best", "--data", data / "test.txt", "--json", model / "icot.json",
                     "--overwrite"], "which icot wrote", tmp_path)


def test_a_tokenizer_never_replaces_a_models(run_copy, data, tmp_path, capsys):
    refused(capsys, ["tokenizer", "train", "--data", data / "train.txt", "--vocab-size", "300", "--out", run_copy / "best",
                     "--overwrite"], "which icot wrote", tmp_path)


def test_probe_output_never_lands_in_the_model(run_copy, data, tmp_path, capsys):
    refused(capsys, ["probe", "--model", run_copy / "best", "--data", data / "test.txt", "--out", run_copy / "best",
                     "--overwrite"], "an input of this command", tmp_path)


# ----- 3. only regular files are read ------------------------------------------------------------

@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo.txt"
    os.mkfifo(path)
    return path


@pytest.fixture
def alarm():
    """A command that blocks fails the test after 20 s instead of hanging the suite."""
    def ring(signum, frame):
        raise TimeoutError("the command blocked")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("source", ["/dev/zero", "fifo"])
@pytest.mark.parametrize("command", ["stats", "eval", "train", "tokenizer", "config", "gsm8k"])
def test_what_is_not_a_regular_file_is_refused_at_once(run, data, tmp_path, capsys, fifo, alarm, source, command):
    path = fifo if source == "fifo" else Path(source)
    args = {"stats": ["data", "stats", path],
            "eval": ["eval", "--model", run / "best", "--data", path],
            "train": ["train", "--train-file", path, "--valid-file", data / "valid.txt", "--out", tmp_path / "r", *TRAIN],
            "tokenizer": ["tokenizer", "train", "--data", path, "--out", tmp_path / "tok"],
            "config": ["train", "--config", path, "--out", tmp_path / "r"],
            "gsm8k": ["data", "gsm8k", "--input", path, "--out", tmp_path / "g.txt"]}[command]
    if command == "gsm8k" and source == "fifo":
        fifo.rename(path := tmp_path / "fifo.jsonl")
        args[3] = path
    line = one_line_error(capsys, run_cli(*args))
    assert str(path) in line and "regular file" in line, line


def test_a_byte_order_mark_is_not_part_of_the_first_example(data, tmp_path):
    from icot.data.format import read_examples

    text = (data / "test.txt").read_text()
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_examples(tmp_path / "bom.txt") == read_examples(data / "test.txt")


# ----- 4. one writer per run ---------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--overwrite"], ["--resume"]])
def test_a_run_in_use_is_refused(run_copy, data, tmp_path, capsys, argv):
    args = ["train", "--resume", run_copy] if argv == ["--resume"] else \
        ["train", "--data", data, "--out", run_copy, *TRAIN, "--max-steps", "1", "--overwrite"]
    with paths.one_writer(run_copy):
        before = snapshot(run_copy)
        line = one_line_error(capsys, run_cli(*args))
        assert f"in use by another icot command (process {os.getpid()})" in line
        assert snapshot(run_copy) == before
    assert not (tmp_path / ".run.lock").exists()  # released, and gone


def test_a_lock_left_by_a_killed_command_is_no_obstacle(run_copy, data, tmp_path):
    (tmp_path / ".run.lock").write_text("999999999\n")  # its process is gone: the system holds no lock
    assert run_cli("train", "--resume", run_copy, "--max-steps", "5") == 0
    assert not (tmp_path / ".run.lock").exists()


def test_a_demo_in_use_is_refused(tmp_path, capsys):
    with paths.one_writer(tmp_path / "demo"):
        line = one_line_error(capsys, run_cli("demo", "--quick", "--out", tmp_path / "demo"))
    assert "in use by another icot command" in line and not (tmp_path / "demo").exists()


# ----- 5, 6. outputs replaced whole --------------------------------------------------------------

def official(folder: Path) -> Path:
    """Two records in the official GSM8K JSONL shape."""
    records = [{"question": "Tom has 2 bags of 3 apples. How many apples?", "answer": "<<2*3=6>>6 apples\n#### 6"},
               {"question": "Ann buys 4 pens at $5. How much?", "answer": "<<4*5=20>>20\n#### 20"}]
    path = folder / "official.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def disk_full(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("command", ["eval", "mult", "gsm8k", "tokenizer", "report"])
def test_a_full_disk_leaves_the_old_output(run, data, tmp_path, capsys, monkeypatch, command):
    out = tmp_path / "out"
    args = {"eval": ["eval", "--model", run / "best", "--data", data / "test.txt", "--json", out / "r.json"],
            "mult": ["data", "mult", "--digits", "2x2", "--train", "50", "--valid", "5", "--test", "5", "--out", out],
            "gsm8k": ["data", "gsm8k", "--input", official(tmp_path), "--out", out / "g.txt"],
            "tokenizer": ["tokenizer", "train", "--data", data / "train.txt", "--vocab-size", "300", "--out", out],
            "report": ["report", run, "--out", out]}[command]
    assert run_cli(*args) == 0
    before = snapshot(out)
    monkeypatch.setattr(os, "fsync", disk_full)
    line = one_line_error(capsys, run_cli(*args, "--overwrite", *(["--seed", "5"] if command == "mult" else [])))
    assert "No space left on device" in line and str(out) in line
    assert snapshot(out) == before


class Interrupt:
    """A generator of examples that Ctrl-C stops after `after` of them."""

    def __init__(self, real, after: int):
        self.real, self.after, self.count = real, after, 0

    def __call__(self, *args):
        self.count += 1
        if self.count > self.after:
            raise KeyboardInterrupt
        return self.real(*args)


@pytest.mark.parametrize("after", [3, 150, 189])
def test_ctrl_c_while_writing_data_leaves_no_data_set(tmp_path, capsys, monkeypatch, after):
    import icot.data.mult

    out = tmp_path / "d"
    monkeypatch.setattr(icot.data.mult, "mult_example", Interrupt(icot.data.mult.mult_example, after))
    assert run_cli("data", "mult", "--digits", "2x2", "--train", "150", "--valid", "20", "--test", "20", "--out", out) == 130
    assert sorted(p.name for p in out.iterdir()) == []


def test_ctrl_c_while_replacing_data_leaves_the_old_set(tmp_path, capsys, monkeypatch):
    import icot.data.mult

    out = tmp_path / "d"
    args = ["data", "mult", "--digits", "2x2", "--train", "150", "--valid", "20", "--test", "20", "--out", out]
    assert run_cli(*args) == 0
    before = snapshot(out)
    monkeypatch.setattr(icot.data.mult, "mult_example", Interrupt(icot.data.mult.mult_example, 100))
    assert run_cli(*args, "--seed", "9", "--overwrite") == 130
    assert snapshot(out) == before


def test_a_split_no_longer_written_does_not_stay_beside_the_new_ones(tmp_path):
    out = tmp_path / "d"
    assert run_cli("data", "mult", "--digits", "2x2", "--train", "150", "--valid", "20", "--test", "20", "--out", out) == 0
    assert run_cli("data", "mult", "--digits", "2x2", "--train", "150", "--valid", "0", "--test", "20", "--out", out,
                   "--seed", "3", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["test.txt", "train.txt"]


# ----- 7. checkpoints --------------------------------------------------------------------------

def trainer_of(run_copy):
    from icot.api import trainer_for

    return trainer_for(None, {"max_steps": 6, "epochs": 2, "keep_checkpoints": 1}, resume=run_copy)


def checkpoints(run) -> tuple[list[str], str]:
    root = Path(run) / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir()), (root / "latest").read_text().strip()


def test_a_save_every_that_divides_the_last_step_saves_it_once(run):
    assert checkpoints(run) == (["step-00000002", "step-00000004"], "step-00000004")


def test_the_same_step_saved_again_keeps_the_first_until_the_second_is_in(run_copy, monkeypatch):
    trainer = trainer_of(run_copy)
    trainer.fit()  # to step 6, keep_checkpoints 1
    assert checkpoints(run_copy) == (["step-00000006"], "step-00000006")
    trainer.last_validated = None  # the state differs from the saved one: saved again, at the same step
    deleted = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):  # when the old one goes, `latest` already names the new one
        deleted.append((Path(path).name, checkpoints(run_copy)[1]))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    trainer.save_checkpoint()
    assert deleted == [("step-00000006", "step-00000006-2")]
    assert checkpoints(run_copy) == (["step-00000006-2"], "step-00000006-2")
    trainer.save_checkpoint()  # nothing changed since: not saved again
    assert checkpoints(run_copy) == (["step-00000006-2"], "step-00000006-2")


def test_a_crash_while_rotating_leaves_latest_whole(run_copy, monkeypatch):
    trainer = trainer_of(run_copy)
    monkeypatch.setattr(shutil, "rmtree", disk_full)
    with pytest.raises(OSError):
        trainer.fit()
    names, latest = checkpoints(run_copy)
    assert latest in names and (run_copy / "checkpoints" / latest / "model.safetensors").is_file()
    monkeypatch.undo()
    assert run_cli("train", "--resume", run_copy, "--max-steps", "6") == 0


def test_a_resume_from_an_earlier_checkpoint_supersedes_the_later_saves(run_copy):
    assert run_cli("train", "--resume", run_copy, "--max-steps", "6", "--epochs", "2", "--keep-checkpoints", "3") == 0
    assert checkpoints(run_copy) == (["step-00000002", "step-00000004", "step-00000006"], "step-00000006")
    (run_copy / "checkpoints" / "latest").write_text("step-00000002\n")  # back to step 2, then on to step 4
    assert run_cli("train", "--resume", run_copy, "--max-steps", "4", "--keep-checkpoints", "2") == 0
    assert checkpoints(run_copy) == (["step-00000002", "step-00000004-2"], "step-00000004-2")  # step 6 was abandoned
    assert run_cli("train", "--resume", run_copy, "--max-steps", "5", "--keep-checkpoints", "1") == 0
    assert checkpoints(run_copy) == (["step-00000005"], "step-00000005")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_replacing_data_leaves_the_old_set_and_no_temporary_file(tmp_path, signum):
    import subprocess
    import sys
    import time

    out = tmp_path / "d"
    assert run_cli("data", "mult", "--digits", "2x2", "--train", "150", "--valid", "20", "--test", "20", "--out", out) == 0
    before = snapshot(out)
    command = [sys.executable, "-m", "icot.cli", "data", "mult", "--digits", "6x6", "--train", "3000000", "--valid", "10",
               "--test", "10", "--out", str(out), "--overwrite"]
    # a job started in the background by a non-interactive shell ignores SIGINT, and so would this child
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(4)  # importing, then sampling or writing
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1] == ("icot: terminated" if signum == signal.SIGTERM else "icot: interrupted")
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["model", "checkpoint"])
def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing_half_written(data, tmp_path, capsys, monkeypatch,
                                                                               where):
    import accelerate
    import transformers

    def no_space(*args, **kwargs):  # as safetensors reports it
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    owner = transformers.PreTrainedModel if where == "model" else accelerate.Accelerator
    monkeypatch.setattr(owner, "save_pretrained" if where == "model" else "save_state", no_space)
    line = one_line_error(capsys, run_cli("train", "--data", data, "--out", tmp_path / "r", *TRAIN, "--max-steps", "2"))
    assert f"{where} {tmp_path / 'r'}" in line and "No space left on device" in line
    assert not list((tmp_path / "r").rglob("*.tmp"))


@pytest.mark.parametrize("args", [["data", "mult", "--digits", "2x2", "--train", "5", "--seed", "-1"],
                                  ["train", "--seed", "-1"], ["train", "--seed", str(2**32)]])
def test_a_seed_out_of_range_is_refused(data, tmp_path, capsys, args):
    args = [*args, "--out", tmp_path / "o"] + (["--data", data, *TRAIN] if args[0] == "train" else [])
    line = one_line_error(capsys, run_cli(*args))
    assert "seed" in line and not (tmp_path / "o").exists()


def test_an_error_quoting_a_line_break_stays_one_line(run, capsys):
    line = one_line_error(capsys, run_cli("predict", "--model", run / "best", "907*555\n123*456"))
    assert "'907*555\\n123*456'" in line


@pytest.mark.parametrize("argv", [["--out"], ["--out", "--overwrite"], ["--tokenizer", "--lr", "1e-3"],
                                  ["--max-steps"], ["--no-out"]])
def test_a_setting_given_without_a_value_is_an_error(data, tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    args = ["--out", "r", *argv] if argv[0] != "--out" else argv
    line = one_line_error(capsys, run_cli("train", "--data", data, *TRAIN, *args))
    assert "given without a value" in line and argv[0].lstrip("-").removeprefix("no-").replace("-", "_") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_overwrite_never_deletes_the_config_file_it_reads(run_copy, data, tmp_path, capsys):
    (run_copy / "exp.yaml").write_text(f"data: {data}\nmax_steps: 1\n")
    refused(capsys, ["train", "--config", run_copy / "exp.yaml", "--out", run_copy, "--overwrite"],
            "holds the input", tmp_path)


@pytest.mark.parametrize("spelling", ["link", "run/checkpoints/.."])
def test_a_run_in_use_is_refused_however_it_is_spelled(run_copy, data, tmp_path, capsys, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(run_copy)
    with paths.one_writer(run_copy):
        line = one_line_error(capsys, run_cli("train", "--resume", spelling))
    assert "in use by another icot command" in line


def test_overwrite_through_a_symbolic_link_is_refused(run_copy, data, tmp_path, capsys):
    (tmp_path / "link").symlink_to(run_copy)
    refused(capsys, ["train", "--data", data, "--out", tmp_path / "link", *TRAIN, "--overwrite"], "symbolic link",
            tmp_path)


def test_a_pipe_in_a_model_directory_is_refused_at_once(run_copy, data, tmp_path, capsys, alarm):
    (run_copy / "best" / "tokenizer.json").unlink()
    os.mkfifo(run_copy / "best" / "tokenizer.json")
    line = one_line_error(capsys, run_cli("data", "stats", "--tokenizer", run_copy / "best", data / "test.txt"))
    assert "tokenizer.json is not a regular file" in line


def test_a_huge_sparse_file_is_refused_without_reading_it(tmp_path, capsys, alarm):
    with open(tmp_path / "huge.txt", "wb") as f:
        f.truncate(40 * 2**30)
    assert "binary file" in one_line_error(capsys, run_cli("data", "stats", tmp_path / "huge.txt"))


@pytest.mark.parametrize("args, fragment", [
    (["--train", "0", "--valid", "0", "--test", "0"], "nothing to write"),
    (["--exclude", "OTHER"], "none 2x2, so it excludes nothing"),
])
def test_data_mult_refuses_what_cannot_act(tmp_path, capsys, args, fragment):
    other = tmp_path / "3x3.txt"
    write_examples(other, mult_examples(3, 3, 5, seed=0))
    args = [str(other) if a == "OTHER" else a for a in args]
    refused(capsys, ["data", "mult", "--digits", "2x2", "--out", tmp_path / "d", *args], fragment, tmp_path)


def test_held_out_words_the_training_data_lacks_are_warned_about(data, tmp_path, capsys):
    lines = (data / "test.txt").read_text().splitlines()
    lines[2] = lines[2].replace("1", "１")  # a fullwidth digit: in the vocabulary, never trained
    (tmp_path / "test.txt").write_text("\n".join(lines) + "\n")
    assert run_cli("train", "--train-file", data / "train.txt", "--valid-file", data / "valid.txt", "--test-file",
                   tmp_path / "test.txt", "--out", tmp_path / "r", *TRAIN, "--max-steps", "1") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("icot: warning: ")]
    assert any("test.txt:3: '" in w and "１" in w and "1 of 8 test examples" in w for w in warnings), warnings
