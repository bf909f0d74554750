"""Hostile input: every bad input exits 2 with one line naming the file or flag and what is
expected (or warns, where the command may go on), no traceback, and the user's files unchanged;
--overwrite deletes nothing icot did not write; no silent wrong result."""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
import torch
from safetensors.torch import load_file

from conftest import mult_examples, run_cli
from icot import cli
from icot.data.format import write_examples
from icot.paths import is_local_path


def snapshot(root) -> dict:
    """Every path under `root` (itself included), files by the hash of their content."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in [root, *sorted(root.rglob("*"))]}


def one_line_error(capsys, code) -> str:
    """Exit code 2 and one error line of its own (progress bars may come before it), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("icot: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def refused(capsys, args, fragment, untouched) -> str:
    """icot `args` fails with one line holding `fragment`, and nothing under `untouched` changed."""
    before = snapshot(untouched)
    line = one_line_error(capsys, run_cli(*args))
    assert fragment in line, line
    assert snapshot(untouched) == before
    return line


def warned(capsys, args, fragment) -> str:
    """icot `args` succeeds with one warning line holding `fragment`."""
    assert run_cli(*args) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("icot: warning: ")]
    assert len(warnings) == 1 and fragment in warnings[0] and "Traceback" not in err, err
    return warnings[0]


def train_args(data, out, *extra):
    return ["train", "--data", data, "--model", "micro", "--out", out, "--batch-size", "16", "--lr", "1e-3",
            "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """2x2 multiplication: 64 training, 16 validation and 16 test examples."""
    out = tmp_path_factory.mktemp("data")
    examples = mult_examples(2, 2, 96, seed=0)
    write_examples(out / "train.txt", examples[:64])
    write_examples(out / "valid.txt", examples[64:80])
    write_examples(out / "test.txt", examples[80:])
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (tests change copies only)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert run_cli(*train_args(data, out, "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "2")) == 0
    return out


@pytest.fixture
def workspace(data, run, tmp_path, monkeypatch) -> Path:
    """The current directory: data/, a run of icot's (run/), and a directory of the user's (mine/)."""
    ws = tmp_path / "ws"
    shutil.copytree(data, ws / "data")
    shutil.copytree(run, ws / "run")
    (ws / "mine").mkdir()
    (ws / "mine" / "notes.txt").write_text("the user's")
    shutil.copytree(data, ws / "mine" / "data")
    monkeypatch.chdir(ws)
    return ws


# ----- --overwrite deletes only what icot wrote, and only after every input was checked --------------

OVERWRITE_REFUSED = {
    "out is the current directory": (train_args("data", ".", "--overwrite"), "--out .: holds the input data"),
    "out is the data": (train_args("data", "data", "--overwrite"), "--out data: is the input data"),
    "out holds the data": (train_args("mine/data", "mine", "--overwrite"), "--out mine: holds the input mine/data"),
    "out is not icot's": (train_args("data", "mine", "--overwrite"), "replaces only a directory icot wrote"),
    "typo in --data": (train_args("dta", "run", "--overwrite"), "data: dta is not a directory"),
    "typo in --model": (train_args("data", "run", "--overwrite", "--model", "run/bset"),
                        "model run/bset: no such directory"),
    "typo in --tokenizer": (train_args("data", "run", "--overwrite", "--tokenizer", "./tok"),
                            "tokenizer ./tok: no such directory"),
    "typo in --train-file": (["train", "--train-file", "data/trian.txt", "--out", "run", "--overwrite"],
                             "train_file data/trian.txt: no such file"),
    "out inside the model": (train_args("data", "run/best/more", "--overwrite", "--model", "run/best"),
                             "lies inside the input run/best"),
    "demo over the user's": (["demo", "--quick", "--out", "mine", "--overwrite"], "replaces only a directory icot wrote"),
    "data mult over its --exclude": (["data", "mult", "--digits", "2x2", "--train", "5", "--valid", "0", "--test", "0",
                                      "--out", "data", "--exclude", "data/train.txt", "--overwrite"],
                                     "--out data/train.txt: is the input file data/train.txt"),
    "eval --json over its data": (["eval", "--model", "run/best", "--data", "data/test.txt", "--json", "data/test.txt",
                                   "--overwrite"], "--json data/test.txt: is the input file"),
}


@pytest.mark.parametrize("case", OVERWRITE_REFUSED)
def test_overwrite_refused(workspace, capsys, case):
    args, fragment = OVERWRITE_REFUSED[case]
    refused(capsys, args, fragment, workspace)


def test_overwrite_reads_every_data_line_before_deleting(workspace, capsys):
    (workspace / "bad").mkdir()
    lines = (workspace / "data" / "train.txt").read_text().splitlines()
    (workspace / "bad" / "train.txt").write_text("\n".join([lines[0], "no separator here", *lines[1:]]) + "\n")
    refused(capsys, train_args("bad", "run", "--overwrite"), "bad/train.txt:2: ", workspace)


def test_overwrite_checks_the_model_weights_before_deleting(workspace, capsys):
    shutil.copytree(workspace / "run" / "best", workspace / "model")
    (workspace / "model" / "model.safetensors").write_bytes(b"\0" * 100)
    refused(capsys, train_args("data", "run", "--overwrite", "--model", "model"), "damaged weights file", workspace)


def test_overwrite_never_deletes_the_current_directory(workspace, data, capsys, monkeypatch):
    monkeypatch.chdir(workspace / "run")  # a run of icot's, but where the user stands
    refused(capsys, train_args(data, ".", "--overwrite"), "current directory", workspace)
    refused(capsys, train_args("../data", "..", "--overwrite"), "--out ..: holds the input ../data", workspace)


def test_overwrite_replaces_a_run_of_icots(workspace, capsys):
    assert run_cli(*train_args("data", "run", "--overwrite", "--max-steps", "1")) == 0
    assert (workspace / "run" / "metrics.jsonl").read_text().count('"event": "start"') == 1
    assert (workspace / "mine" / "notes.txt").read_text() == "the user's"


# ----- a checkpoint or best model never holds non-finite weights ----------------------------------

@pytest.mark.parametrize("diverging", [["--lr", "1e4"], ["--lr", "30", "--max-grad-norm", "0"]])
def test_non_finite_weights_are_never_saved(data, tmp_path, capsys, diverging):
    out = tmp_path / "nan"
    args = train_args(data, out, "--save-every", "1", "--max-steps", "12", "--epochs", "3", *diverging)
    line = one_line_error(capsys, run_cli(*args))
    assert "non-finite" in line or "loss became" in line
    named = Path(line.split("the last good checkpoint is ")[1].split(" (")[0])
    assert (out / "checkpoints" / "latest").read_text().strip() == named.name
    saved = [*(out / "checkpoints").glob("step-*/model.safetensors"), *(out / "best").glob("model.safetensors")]
    assert named / "model.safetensors" in saved
    for weights in saved:
        assert all(torch.isfinite(t).all() for t in load_file(weights).values()), weights


# ----- output paths: checked before any work -------------------------------------------------------

@pytest.fixture
def places(tmp_path, data, run, monkeypatch):
    """A read-only directory, a file, a directory, and the inputs the commands need."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if _writable(ro):  # root ignores permission bits; sysfs refuses new files even to root
        ro = Path("/sys")
        if _writable(ro):
            pytest.skip("no read-only location here")
    (tmp_path / "file").write_text("the user's")
    (tmp_path / "dir").mkdir()
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "<<1+1=2>>2 #### 2"}) + "\n")
    monkeypatch.chdir(tmp_path)
    yield {"ro": ro, "file": tmp_path / "file", "dir": tmp_path / "dir", "data": data, "run": run}
    (tmp_path / "ro").chmod(0o755)


def _writable(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def commands(p, out_dir, out_file):
    """Every command that writes, given where to write a directory and a file."""
    return {
        "data mult": ["data", "mult", "--digits", "2x2", "--train", "5", "--valid", "0", "--test", "0", "--out", out_dir],
        "data gsm8k": ["data", "gsm8k", "--input", "gsm.jsonl", "--out", out_file],
        "tokenizer train": ["tokenizer", "train", "--data", p["data"] / "train.txt", "--vocab-size", "300", "--out", out_dir],
        "train": train_args(p["data"], out_dir),
        "eval --json": ["eval", "--model", p["run"] / "best", "--data", p["data"] / "test.txt", "--json", out_file],
        "probe --out": ["probe", "--model", p["run"] / "best", "--data", p["data"] / "test.txt", "--out", out_dir],
        "report --out": ["report", p["run"], "--out", out_dir],
        "demo --out": ["demo", "--quick", "--out", out_dir],
    }


PROBLEMS = {
    "read-only": (lambda p: (p["ro"] / "out", p["ro"] / "out.txt"), "cannot write in"),
    "parent is a file": (lambda p: (p["file"] / "out", p["file"] / "out.txt"), "is a file, not a directory"),
    "file where a directory goes, or the reverse": (lambda p: (p["file"], p["dir"]), "expected a"),
}


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("command", commands({"data": Path(), "run": Path()}, "", ""))
def test_unwritable_outputs(places, tmp_path, capsys, command, problem):
    where, fragment = PROBLEMS[problem]
    out_dir, out_file = where(places)
    refused(capsys, commands(places, out_dir, out_file)[command], fragment, tmp_path)


def test_report_into_an_unwritable_run(places, run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "plots")
    (copy / "plots").write_text("in the way")
    refused(capsys, ["report", copy], f"report {copy / 'plots'}: exists and is not a directory", tmp_path)


# ----- damaged files -------------------------------------------------------------------------------

@pytest.fixture
def damaged_model(run, tmp_path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(run / "best", model)
    (model / "model.safetensors").write_bytes(b"not safetensors at all")
    return model


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_damaged_weights(damaged_model, data, tmp_path, capsys, command):
    args = {"train": train_args(data, tmp_path / "out", "--model", damaged_model),
            "eval": ["eval", "--model", damaged_model, "--data", data / "test.txt"],
            "predict": ["predict", "--model", damaged_model, "12*34"]}[command]
    refused(capsys, args, f"cannot load model from directory '{damaged_model}'", damaged_model)


def test_truncated_weights(run, data, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(run / "best", model)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    refused(capsys, ["eval", "--model", model, "--data", data / "test.txt"], "cannot load model", tmp_path)


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_resume_from_a_damaged_checkpoint(run_copy, tmp_path, capsys):
    (run_copy / "checkpoints" / "step-00000004" / "model.safetensors").write_bytes(b"\0" * 100)
    refused(capsys, ["train", "--resume", run_copy], "step-00000004: cannot load this checkpoint", tmp_path)


@pytest.mark.parametrize("pointer", [b"step-00000099\n", b"", b"\xff\xfe\n", b"../../elsewhere\n"])
def test_resume_from_a_missing_checkpoint(run_copy, tmp_path, capsys, pointer):
    (run_copy / "checkpoints" / "latest").write_bytes(pointer)
    refused(capsys, ["train", "--resume", run_copy], "latest: names a checkpoint that does not exist", tmp_path)


def test_report_reads_what_a_killed_run_left(run_copy, capsys):
    with open(run_copy / "metrics.jsonl", "ab") as f:
        f.write(b'\xff\xfe{"step": 5}\n{"step": 6, "loss": 0.')  # bytes that are not UTF-8, then half a record
    line = warned(capsys, ["report", run_copy], "skipped 2 unreadable line(s)")
    assert str(run_copy / "metrics.jsonl") in line


def test_report_of_a_run_with_a_binary_config(run_copy, tmp_path, capsys):
    (run_copy / "config.yaml").write_bytes(b"\xff\xfe\0")
    refused(capsys, ["report", run_copy], "config.yaml: not UTF-8 text", tmp_path)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "bogus", "meta"])
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_unusable_device(run, data, tmp_path, capsys, device, command):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = {"eval": ["eval", "--model", run / "best", "--data", data / "test.txt"],
            "predict": ["predict", "--model", run / "best", "12*34"]}[command]
    refused(capsys, [*args, "--device", device], f"--device {device}: ", tmp_path)


def test_huge_vocabulary(data, tmp_path, capsys):
    refused(capsys, ["tokenizer", "train", "--data", data / "train.txt", "--vocab-size", "99999999999", "--out",
                     tmp_path / "tok"], "--vocab-size 99999999999: expected 300", tmp_path)


# ----- no silent wrong result ----------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--max-examples", "-1"), ("--max-examples", "0"), ("--show", "-1"),
                                         ("--max-new-tokens", "0"), ("--batch-size", "-3")])
def test_eval_refuses_negative_counts(run, data, tmp_path, capsys, flag, value):
    refused(capsys, ["eval", "--model", run / "best", "--data", data / "test.txt", flag, value], f"{flag} {value}: ",
            tmp_path)


@pytest.mark.parametrize("override, fragment", [
    (["--method", "nocot"], "--method nocot: "),
    (["--out", "elsewhere"], "--out elsewhere: "),
    (["--batch-size", "8"], "--batch-size 8: "),
    (["--data", "."], "--data .: "),
    (["--overwrite"], "--overwrite True: "),
])
def test_resume_refuses_settings_that_make_another_run(run_copy, tmp_path, capsys, monkeypatch, override, fragment):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, ["train", "--resume", run_copy, *override], fragment, tmp_path)
    assert "a resume continues the same run" in line


def test_resume_says_what_it_changes_and_logs_each_step_once(run_copy, capsys):
    (run_copy / "checkpoints" / "latest").write_text("step-00000002\n")  # steps 3 and 4 are redone
    warned(capsys, ["train", "--resume", run_copy, "--max-steps", "6", "--epochs", "2"],
           f"resuming {run_copy} with epochs 1 -> 2, max_steps 4 -> 6")
    records = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    events = [(r["event"], r.get("step")) for r in records if "event" in r and r["event"] != "start"]
    assert events == [("resume", 2), ("validation", 4), ("validation", 6), ("end", 6)]


def test_a_resume_trains_with_the_weight_decay_it_sets(run_copy, capsys, monkeypatch):
    """The checkpoint's optimizer state carries the weight decay it was saved with; a resume that changes it
    trains with the new one."""
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([group["weight_decay"] for group in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    (run_copy / "checkpoints" / "latest").write_text("step-00000002\n")
    warned(capsys, ["train", "--resume", run_copy, "--weight-decay", "0.5"], "weight_decay 0.01 -> 0.5")
    assert seen == [[0.5], [0.5]]


def test_extending_a_finished_run_keeps_its_earlier_result(run_copy, capsys):
    warned(capsys, ["train", "--resume", run_copy, "--max-steps", "6", "--epochs", "2"], "max_steps 4 -> 6")
    records = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "end"] == [4, 6]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["max_steps"] == 6  # what it trains with now


def test_eval_and_predict_warn_about_another_task(run, data, tmp_path, capsys):
    bigger = tmp_path / "3x3.txt"
    write_examples(bigger, mult_examples(3, 3, 2, seed=0))
    warned(capsys, ["eval", "--model", run / "best", "--data", bigger], "is 3x3 multiplication, but")
    text = tmp_path / "text.txt"
    text.write_text("1 + 2||1 + 2 #### 3\n")  # words the model knows: unknown ones are an error of their own
    warned(capsys, ["eval", "--model", run / "best", "--data", text],
           f"{text} is non-multiplication text, but {run / 'best'} was trained on 2x2 multiplication")
    warned(capsys, ["predict", "--model", run / "best", "37123*49123"], "'37123*49123' is 5x5 multiplication")
    assert run_cli("eval", "--model", run / "best", "--data", data / "test.txt", "--max-examples", "2") == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("model, fragment", [
    ("run/bset", "model run/bset: no such directory"),
    ("./nope", "model ./nope: no such directory"),
    ("/no/such/model", "model /no/such/model: no such directory"),
    ("data/train.txt", "model data/train.txt: is a file"),
    ("micro", "model micro: a preset is an untrained model shape"),
])
def test_local_model_paths_are_not_sent_to_the_hub(workspace, capsys, model, fragment):
    refused(capsys, ["predict", "--model", model, "12*34"], fragment, workspace)


def test_what_counts_as_a_local_path(workspace):
    local = ["./x", "../x", "/x", "~/x", "run/x/best", "run/best", "a/b/c"]
    hub = ["gpt2", "openai-community/gpt2", "owner/name"]
    assert all(is_local_path(name) for name in local) and not any(is_local_path(name) for name in hub)


def test_data_mult_beyond_the_machine_integer(tmp_path):
    for digits in ("10x10", "11x11", "20x20"):
        out = tmp_path / digits
        assert run_cli("data", "mult", "--digits", digits, "--train", "300", "--valid", "20", "--test", "20",
                       "--out", out) == 0
        splits = {name: (out / f"{name}.txt").read_text().splitlines() for name in ("train", "valid", "test")}
        questions = [line.split("||")[0] for lines in splits.values() for line in lines]
        assert len(set(questions)) == 340
        a, b = questions[0].split(" * ")
        assert len(a.split()) == len(b.split()) == int(digits.split("x")[0])
    again = tmp_path / "again"
    assert run_cli("data", "mult", "--digits", "20x20", "--train", "300", "--valid", "20", "--test", "20",
                   "--out", again) == 0
    assert snapshot(again) == snapshot(tmp_path / "20x20")


# ----- the last guard ------------------------------------------------------------------------------

def test_last_guard_turns_a_bug_into_one_line(monkeypatch, capsys):
    def bug(args):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(cli, "cmd_data_stats", bug)
    monkeypatch.delenv("ICOT_TRACEBACK")
    assert run_cli("data", "stats", "x") == 1
    assert capsys.readouterr().err == ("icot: error: unexpected RuntimeError: something broke (probably a bug in icot: "
                                       "rerun with --traceback (or ICOT_TRACEBACK=1) for details and report it)\n")
    with pytest.raises(RuntimeError):
        run_cli("data", "stats", "x", "--traceback")
    monkeypatch.setenv("ICOT_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        run_cli("data", "stats", "x")


def test_last_guard_reports_a_system_error_in_its_words(monkeypatch, capsys):
    def full(args):
        raise OSError(28, "No space left on device", "runs/x/metrics.jsonl")

    monkeypatch.setattr(cli, "cmd_data_stats", full)
    monkeypatch.delenv("ICOT_TRACEBACK")
    line = one_line_error(capsys, run_cli("data", "stats", "x"))
    assert line.startswith("icot: error: runs/x/metrics.jsonl: No space left on device (rerun with --traceback")
