"""Hostile input, continued (issue 44, classes 12 and 13): a signal after training stops the command;
settings that could not act on the given data (a held-out file that is the training file, a KD teacher
without CoT, steps that never split a CoT, ...) are refused; the Python API answers every bad argument,
types included, with a one-line icot.UserError."""

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

import icot
from conftest import run_cli
from icot.data import Example


def one_line_error(capsys, code) -> str:
    """Exit code 2 and one error line of its own (progress bars may come before it), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("icot: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return icot.generate_mult("2x2", tmp_path_factory.mktemp("data"), train=200, valid=20, test=20)["train"].parent


@pytest.fixture(scope="module")
def model_dir(data, tmp_path_factory) -> Path:
    run = icot.train(method="explicit", data=data, model="micro", out=tmp_path_factory.mktemp("runs") / "explicit",
                     max_steps=2, batch_size=16, max_eval_examples=10)
    return run / "best"


@pytest.fixture(scope="module")
def model(model_dir):
    return icot.load(model_dir, device="cpu")


# ----- 12: a signal after training stops the command --------------------------------------------------

@pytest.mark.parametrize("phase, signum, tested", [("test", signal.SIGINT, True), ("test", signal.SIGTERM, True),
                                                   ("validate", signal.SIGINT, True), ("validate", signal.SIGINT, False)],
                         ids=["ctrl-c-in-test", "sigterm-in-test", "ctrl-c-in-last-validation", "no-test-file"])
def test_a_signal_after_training_stops_the_command(data, tmp_path, monkeypatch, capsys, phase, signum, tested):
    """The signal arrives during the test evaluation, or during the last validation (the test would
    follow): the command stops with 128+signum and one line saying how to go on, the best model saved,
    no `end` record; the handlers it replaced are back; the resume it advises finishes the run."""
    from icot.trainer import loop as trainer

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed from the main thread only")
    evaluate = trainer.evaluate

    def signalled(*args, desc=None, **kwargs):
        if desc == phase:
            os.kill(os.getpid(), signum)
        return evaluate(*args, desc=desc, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", signalled)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    files = ["--train-file", data / "train.txt", "--valid-file", data / "valid.txt"]
    with pytest.raises(SystemExit) as stopped:
        run_cli("train", *files, *(["--test-file", data / "test.txt"] if tested else []), "--model", "micro",
                "--out", run, "--max-steps", "2", "--batch-size", "16", "--max-eval-examples", "10")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("icot: ")]
    assert stopped.value.code == 128 + signum and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"icot: stopped by signal {signum}") and f"icot train --resume {run}" in lines[0]
    assert (f"icot eval --model {run / 'best'} --data {data / 'test.txt'}" in lines[0]) == tested
    assert (run / "best" / "model.safetensors").is_file() and "end" not in [r.get("event") for r in records(run)]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    monkeypatch.undo()
    assert run_cli("train", "--resume", run) == 0
    assert ("test_accuracy" in records(run)[-1]) == tested and records(run)[-1]["event"] == "end"


def test_a_finished_run_gives_the_signal_handlers_back(data, tmp_path):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    icot.train(method="explicit", train_file=data / "train.txt", model="micro", out=tmp_path / "run", max_steps=1,
               batch_size=16)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


# ----- 12: validation or test on the training data ---------------------------------------------------

SAME_FILE = {
    "valid is train": (["--train-file", "d/train.txt", "--valid-file", "d/train.txt"], "valid_file d/train.txt"),
    "test is the data's train": (["--data", "d", "--test-file", "d/train.txt"], "test_file d/train.txt"),
    "spelled another way": (["--train-file", "d/train.txt", "--valid-file", "d/../d/train.txt"], "valid_file d/../d/"),
    "a link to it": (["--train-file", "d/train.txt", "--test-file", "link.txt"], "test_file link.txt"),
}


@pytest.mark.parametrize("case", SAME_FILE)
def test_a_held_out_split_that_is_the_training_file_is_refused(data, tmp_path, monkeypatch, capsys, case):
    args, fragment = SAME_FILE[case]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(data, "d")
    Path("link.txt").symlink_to(Path("d/train.txt").resolve())
    line = one_line_error(capsys, run_cli("train", *args, "--model", "micro", "--out", "run"))
    assert fragment in line and "is the training file d/train.txt" in line and "held-out" in line
    assert not Path("run").exists()


def test_a_copy_of_the_training_file_is_warned_and_its_test_is_called_training_accuracy(data, tmp_path, capsys):
    copies = tmp_path / "copies"
    copies.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(data / "train.txt", copies / f"{split}.txt")
    run = icot.train(method="explicit", data=copies, model="micro", out=tmp_path / "run", max_steps=1, batch_size=16,
                     max_eval_examples=10)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("icot: warning: ")]
    assert [w.split()[2] for w in warnings] == ["valid_file", "test_file"]
    assert all("holds the same examples as the training file" in w and "training accuracy" in w for w in warnings)
    assert json.loads((run / "best" / "icot.json").read_text())["evaluation"]["training_data"] is True
    card = (run / "best" / "README.md").read_text()
    assert "Training accuracy (the test file repeats the training file) **" in card and "Test accuracy" not in card
    assert "name: training accuracy (the test file repeats the training file)" in card


# ----- 12: a KD teacher must write its CoT -------------------------------------------------------------

MARKS = {"thought_tokens": {"begin": 20, "end": 21, "latent": 22}}
NO_COT_TEACHERS = {  # icot.json as these methods write it
    "stepwise, all removed": ({"method": "stepwise", "cot_removed": "all"}, "a stepwise model trained with all CoT"),
    "stepwise, partly removed": ({"method": "stepwise", "cot_removed": 5}, "with 5 CoT tokens removed"),
    "codi": ({"method": "codi", "cot_removed": "all", "thoughts": 6, "projection": None, **MARKS},
             "with 6 continuous thoughts"),
    "coconut past stage 0": ({"method": "coconut", "coconut_stage": 1, "c_thought": 2, "max_latent_stage": 2,
                              "steps": "mult", "thoughts": 2, **MARKS}, "a coconut model trained with 2 continuous"),
}


@pytest.mark.parametrize("case", [*NO_COT_TEACHERS, "a real nocot run"])
def test_a_kd_teacher_without_its_cot_is_refused(data, model_dir, tmp_path, capsys, case):
    teacher = tmp_path / "teacher"
    if case == "a real nocot run":
        teacher = icot.train(method="nocot", data=data, model="micro", out=tmp_path / "nocot", max_steps=1,
                             batch_size=16, max_eval_examples=5) / "best"
        fragment = "a nocot model trained with all CoT tokens removed"
    else:
        shutil.copytree(model_dir, teacher)
        meta = json.loads((teacher / "icot.json").read_text())
        changes, fragment = NO_COT_TEACHERS[case]
        (teacher / "icot.json").write_text(json.dumps({**meta, **changes}))
    line = one_line_error(capsys, run_cli("train", "--method", "kd", "--teacher-dir", teacher, "--data", data, "--model",
                                          "micro", "--out", tmp_path / "kd"))
    assert f"teacher_dir {teacher}: " in line and fragment in line and "expected an explicit-CoT model" in line
    assert not (tmp_path / "kd").exists()


# ----- 12: settings that cannot act on the given data, or beside the other settings ------------------

UNSPLIT = "no training CoT splits into more than one step (e.g. '"
AT_LOAD = {  # found when the data is read
    "coconut: gsm8k steps on multiplication": (["--method", "coconut", "--steps", "gsm8k"], f"steps gsm8k: {UNSPLIT}"),
    "coconut: a separator never there": (["--method", "coconut", "--steps", "separator", "--step-separator", ";"],
                                         f"steps separator ';': {UNSPLIT}"),
    "coconut: latent stages past the steps": (["--method", "coconut", "--max-latent-stage", "3"],
                                              "max_latent_stage 3: the longest training CoT has 2 steps under steps "
                                              "auto (mult)"),
    "coconut: no CoT at all": (["--method", "coconut", "--data", "nocot"], "no training example has a CoT"),
    "codi: dropping the only step": (["--method", "codi", "--steps", "gsm8k"], "leaves the teacher no CoT"),
    "stepwise: steps that never split": (["--method", "stepwise", "--removal-unit", "step", "--steps", "gsm8k"],
                                         "removal_unit step would remove every whole CoT at once"),
    "stepwise: removal starts past every CoT": (["--method", "stepwise", "--remove-start-from", "8"],
                                                "remove_start_from 8: the longest training CoT has 8 tokens"),
    "stepwise: full removal past every CoT": (["--method", "stepwise", "--remove-all-when-remove-beyond", "8"],
                                              "remove_all_when_remove_beyond 8.0: the longest training CoT has 8 tokens"),
    "stepwise: a late pace past every CoT": (["--method", "stepwise", "--removal-pace", "adaptive", "--pace-late-from",
                                              "8", "--pace-late-max-steps", "100"], "pace_late_from 8: the longest"),
    "stepwise: no CoT at all": (["--method", "stepwise", "--data", "nocot"], "no training example has a CoT"),
}
BESIDE = {  # found in the config, before anything is written
    "stepwise: gap placement without keep_position": (["--method", "stepwise", "--gap-placement", "in_place"],
                                                      "gap_placement in_place is read only with keep_position: true"),
    "stepwise: pace settings of a fixed pace": (["--method", "stepwise", "--pace-min-steps", "10"],
                                                "pace_min_steps 10 is read only with removal_pace: adaptive"),
    "stepwise: remove_per_epoch of an adaptive pace": (["--method", "stepwise", "--removal-pace", "adaptive",
                                                        "--remove-per-epoch", "4"], "remove_per_epoch 4.0 is read only"),
    "stepwise: warm-up after resets that never come": (["--method", "stepwise", "--no-reset-optimizer",
                                                        "--warmup-after-reset", "10"], "read only with reset_optimizer"),
    "stepwise: rewind_to without rewind_below": (["--method", "stepwise", "--rewind-to", "best"],
                                                 "rewind_to best is read only with rewind_below"),
    "stepwise: probe layer without the probe": (["--method", "stepwise", "--running-sum-layer", "0"],
                                                "running_sum_layer 0 is read only with running_sum_weight above 0"),
    "codi: steps of a teacher that keeps them all": (["--method", "codi", "--include-last-step", "--steps", "mult"],
                                                     "read only with include_last_step: false"),
    "kd: a teacher section with teacher_dir": (["--method", "kd", "--teacher-dir", "models", "--teacher.epochs", "2"],
                                               "teacher.epochs is set, but this run does not train the teacher"),
    "kd: delta for the couple stage": (["--method", "kd", "--stage", "couple", "--student-dir", "models",
                                        "--emulator-dir", "models", "--delta", "4"], "the couple stage reads none"),
    "a tracker project without a tracker": (["--tracker-project", "foo"],
                                            "tracker_project foo is read only with report_to"),
    "a test file that is the validation file": (["--test-file", "mult/valid.txt"],
                                                "test_file mult/valid.txt: is the validation file"),
}


def refused_training(data, tmp_path, monkeypatch, capsys, args) -> str:
    """`icot train` with `args` in a directory holding mult/ (2x2, 2 steps a CoT), nocot/ (the same
    without CoT) and models/ (empty): its one error line, no checkpoint written."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(data, "mult")
    Path("nocot").mkdir()
    Path("nocot/train.txt").write_text("".join(line.split("||")[0] + "|| #### " + line.split("#### ")[1]
                                               for line in (data / "train.txt").read_text().splitlines(True)))
    Path("models").mkdir()
    line = one_line_error(capsys, run_cli("train", "--data", "mult", "--model", "micro", "--out", "run", *args))
    assert not Path("run/checkpoints").exists()
    return line


@pytest.mark.parametrize("case", AT_LOAD)
def test_settings_that_cannot_act_on_the_data_are_refused(data, tmp_path, monkeypatch, capsys, case):
    args, fragment = AT_LOAD[case]
    assert fragment in refused_training(data, tmp_path, monkeypatch, capsys, args)


@pytest.mark.parametrize("case", BESIDE)
def test_settings_that_cannot_act_beside_the_others_are_refused(data, tmp_path, monkeypatch, capsys, case):
    args, fragment = BESIDE[case]
    assert fragment in refused_training(data, tmp_path, monkeypatch, capsys, args)
    assert not Path("run").exists()


def test_a_projection_shape_without_a_projection_is_warned(data, tmp_path, capsys):
    from icot.api import train_config

    train_config(None, {"method": "codi", "data": data, "out": tmp_path / "run", "projection": False,
                        "projection_dim": 64})
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("icot: warning: ")]
    assert warnings == ["icot: warning: config: projection_dim: read only with projection: true (projection: false "
                        "has none to shape)"]


def test_the_settings_checks_leave_working_settings_alone(data, tmp_path):
    run = icot.train(method="coconut", data=data, model="micro", out=tmp_path / "run", max_latent_stage=2, c_thought=1,
                     first_stage=3, max_steps=1, batch_size=16, max_eval_examples=5)
    assert json.loads((run / "best" / "icot.json").read_text())["steps"] == "mult"


# ----- 13: the Python API refuses bad arguments with one line --------------------------------------------

API_CASES = {
    "load(123)": (lambda m, d, t: icot.load(123), "--model 123: expected a model directory"),
    "load(None)": (lambda m, d, t: icot.load(None), "--model None: expected"),
    "load('')": (lambda m, d, t: icot.load(""), "--model '': empty"),
    "load(bytes)": (lambda m, d, t: icot.load(b"run/best"), "got bytes"),
    "load(device=list)": (lambda m, d, t: icot.load(t, device=["cpu"]), "--device ['cpu']: expected 'cpu'"),
    "predict(123)": (lambda m, d, t: m.predict(123), "question 123: expected a question such as '12*34', got int"),
    "predict(None)": (lambda m, d, t: m.predict(None), "question None: expected"),
    "predict('')": (lambda m, d, t: m.predict(""), "empty input"),
    "predict(list)": (lambda m, d, t: m.predict(["12*34"]), "got list"),
    "predict(bytes)": (lambda m, d, t: m.predict(b"12*34"), "got bytes"),
    "generate(1.5)": (lambda m, d, t: m.generate(1.5), "question 1.5: expected"),
    "evaluate(42)": (lambda m, d, t: m.evaluate(42), "--data 42: expected a data file or a list of icot.data.Example"),
    "evaluate(None)": (lambda m, d, t: m.evaluate(None), "--data None: expected"),
    "evaluate('')": (lambda m, d, t: m.evaluate(""), "--data '': empty"),
    "evaluate([1, 2])": (lambda m, d, t: m.evaluate([1, 2]), "--data item 1: expected icot.data.Example, got int"),
    "evaluate(int question)": (lambda m, d, t: m.evaluate([Example(3, "", "1")]), "--data item 1 question 3: expected"),
    "evaluate(None fields)": (lambda m, d, t: m.evaluate([Example(None, None, None)]), "question None: expected text"),
    "evaluate(empty fields)": (lambda m, d, t: m.evaluate([Example("", "", "")]), "--data item 1: empty question"),
    "predict(two lines)": (lambda m, d, t: m.predict("907*555\n123*456"), "holds a line break"),
    "train(config with an int key)": (lambda m, d, t: icot.train(config={1: 2, "x": 3}), "config key 1: expected"),
    "train(method=list)": (lambda m, d, t: icot.train(method=["explicit"], data=d, out=t / "run"),
                           "method ['explicit']: expected a method name"),
    "evaluate(batch_size='8')": (lambda m, d, t: m.evaluate(d / "test.txt", batch_size="8"), "--batch-size '8': expected"),
    "evaluate(batch_size=True)": (lambda m, d, t: m.evaluate(d / "test.txt", batch_size=True), "got bool"),
    "evaluate(max_examples=2.5)": (lambda m, d, t: m.evaluate(d / "test.txt", max_examples=2.5), "--max-examples 2.5"),
    "evaluate(max_new_tokens='5')": (lambda m, d, t: m.evaluate(d / "test.txt", max_new_tokens="5"), "--max-new-tokens"),
    "evaluate(answer_match=3)": (lambda m, d, t: m.evaluate(d / "test.txt", answer_match=3), "--answer-match 3"),
    "Model(3, None)": (lambda m, d, t: icot.Model(3, None), "Model path 3: expected"),
    "Model(path, 'x')": (lambda m, d, t: icot.Model("run/best", "x"), "Model predictor 'x': expected a Predictor"),
    "train(config=3)": (lambda m, d, t: icot.train(config=3), "config 3: expected a YAML file or a dict"),
    "train(config=list)": (lambda m, d, t: icot.train(config=[]), "config []: expected"),
    "train(config='')": (lambda m, d, t: icot.train(config=""), "config '': empty; expected a YAML file"),
    "train(resume=True)": (lambda m, d, t: icot.train(resume=True), "--resume True: expected a run directory"),
    "train(resume='')": (lambda m, d, t: icot.train(resume=""), "--resume '': empty"),
    "train(lr='fast')": (lambda m, d, t: icot.train(data=d, out=t / "run", lr="fast"), "lr: expected a number"),
    "generate_mult(digits=3)": (lambda m, d, t: icot.generate_mult(digits=3, out=t / "g"), "--digits 3: expected AxB"),
    "generate_mult(out=None)": (lambda m, d, t: icot.generate_mult("2x2", out=None), "--out None: expected"),
    "generate_mult(train=True)": (lambda m, d, t: icot.generate_mult("2x2", t / "g", train=True), "--train True"),
    "generate_mult(test=2.5)": (lambda m, d, t: icot.generate_mult("2x2", t / "g", test=2.5), "--test 2.5"),
    "generate_mult(seed='a')": (lambda m, d, t: icot.generate_mult("2x2", t / "g", seed="a"), "--seed 'a'"),
    "generate_mult(exclude=str)": (lambda m, d, t: icot.generate_mult("2x2", t / "g", exclude="x.txt"),
                                   "--exclude 'x.txt': expected a list of data files, got str"),
    "generate_mult(exclude=[3])": (lambda m, d, t: icot.generate_mult("2x2", t / "g", exclude=[3]), "--exclude 3"),
    "generate_mult(overwrite='no')": (lambda m, d, t: icot.generate_mult("2x2", t / "g", overwrite="no"),
                                      "--overwrite 'no': expected True or False"),
}


@pytest.mark.parametrize("case", API_CASES)
def test_the_api_refuses_bad_arguments_with_one_line(model, data, tmp_path, case):
    call, fragment = API_CASES[case]
    with pytest.raises(icot.UserError) as refused:
        call(model, data, tmp_path)
    message = str(refused.value)
    assert fragment in message and "\n" not in message
    assert not (tmp_path / "g").exists() and not (tmp_path / "run").exists()


def test_the_api_takes_paths_lists_and_numpy_counts_where_it_should(model, model_dir, data):
    import numpy as np

    from icot.data.format import read_examples

    assert icot.load(str(model_dir), device="cpu").path == str(model_dir)
    assert model.evaluate(tuple(read_examples(data / "test.txt")), max_examples=2, batch_size=2)["examples"] == 2
    assert model.evaluate(data / "test.txt", max_examples=np.int64(3), batch_size=np.int32(2))["examples"] == 3
    assert isinstance(model.predict("12*34"), str)


# ----- 12: settings that never act in the run, resumes that end before the checkpoint, probe flags ------

NEVER_ACT = {
    "lr drop past the end": (["--method", "explicit", "--lr-drop-step", "1000"], "lr_drop_step 1000: the run ends"),
    "removal past the end": (["--method", "stepwise"], "by the run's last step (2), so best/ will hold a model still "
                                                        "trained with CoT left; full removal needs max_steps"),
    "pretraining past the end": (["--method", "stepwise", "--pretrain-epochs", "3"],
                                 "pretrain_epochs 3.0: pretraining (39 steps) lasts the whole run"),
    "a test file that copies the validation file": (["--method", "explicit", "--test-file", "copy.txt"],
                                                    "test_file copy.txt holds the same examples as the validation file"),
}


@pytest.mark.parametrize("case", NEVER_ACT)
def test_settings_that_never_act_in_the_run_are_warned(data, tmp_path, monkeypatch, capsys, case):
    args, fragment = NEVER_ACT[case]
    monkeypatch.chdir(tmp_path)
    shutil.copy(data / "valid.txt", "copy.txt")
    assert run_cli("train", "--data", data, "--model", "micro", "--max-steps", "2", "--batch-size", "16",
                   "--max-eval-examples", "5", "--out", "run", *args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("icot: warning: ")]
    assert any(fragment in line for line in warnings), warnings


def test_a_resume_that_ends_before_its_checkpoint_names_max_steps(data, tmp_path, capsys):
    """At step 2 with --max-steps 1; at step 1 (no validation yet, so no best model) with --max-steps 1."""
    run = tmp_path / "run"
    assert run_cli("train", "--data", data, "--model", "micro", "--max-steps", "2", "--batch-size", "16", "--save-every",
                   "1", "--keep-checkpoints", "2", "--max-eval-examples", "5", "--out", run) == 0
    line = one_line_error(capsys, run_cli("train", "--resume", run, "--max-steps", "1"))
    assert "--max-steps 1:" in line and "already at step 2" in line
    (run / "checkpoints" / "latest").write_text("step-00000001\n")
    shutil.rmtree(run / "best")
    line = one_line_error(capsys, run_cli("train", "--resume", run, "--max-steps", "1"))
    assert "--max-steps 1:" in line and "no best model yet; expected --max-steps above 1" in line
    assert run_cli("train", "--resume", run, "--max-steps", "2") == 0 and (run / "best").is_dir()


PROBE_FLAGS = {
    "cot tokens with mult targets": (["--targets", "mult", "--cot-tokens", "3"],
                                     "--cot-tokens 3 is read only with --targets cot (the targets here are mult)"),
    "cot tokens with auto targets on mult data": (["--cot-tokens", "3"], "the targets here are mult"),
    "an input window without the input site": (["--at", "sep", "--input-window", "3"],
                                               "--input-window 3 is read only with --at input"),
    "l2 nan": (["--l2", "nan"], "--l2 nan: expected a finite number, 0 or more"),
    "l2 inf": (["--l2", "inf"], "--l2 inf: expected a finite number"),
}


@pytest.mark.parametrize("case", PROBE_FLAGS)
def test_probe_flags_that_cannot_act_are_refused(model_dir, data, tmp_path, capsys, case):
    args, fragment = PROBE_FLAGS[case]
    line = one_line_error(capsys, run_cli("probe", "--model", model_dir, "--data", data / "test.txt",
                                          "--out", tmp_path / "p", *args))
    assert fragment in line and not (tmp_path / "p").exists()
