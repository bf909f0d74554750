"""End-to-end: training really learns, evaluation is batch-size independent, models reload."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from icot.data.format import read_examples
from icot.data.layout import encode
from icot.evaluate import evaluate
from icot.methods import load_predictor
from icot.predict import predict
from icot.trainer import native_bf16_cpu
from conftest import run_cli


def test_explicit_model_memorises_32_examples(explicit_run):
    records = [json.loads(line) for line in (explicit_run / "metrics.jsonl").read_text().splitlines()]
    end = records[-1]
    assert end["event"] == "end" and end["test_accuracy"] == 1.0
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] / 10
    assert (explicit_run / "config.yaml").exists() and (explicit_run / "plots" / "training.png").exists()


def test_batch_1_and_batch_64_give_identical_predictions(explicit_run, mult3_data):
    predictor = load_predictor(explicit_run / "best")
    data = encode(predictor.tokenizer, predictor.layout, read_examples(mult3_data / "test.txt"))
    one = evaluate(predictor, data, batch_size=1, progress=False)
    many = evaluate(predictor, data, batch_size=64, progress=False)
    assert one.predictions == many.predictions
    assert one.accuracy == many.accuracy == 1.0
    # explicit CoT writes its whole CoT: 24 tokens for 3x3, SEP, '####' + 6 digits, EOS
    assert one.mean_generated_tokens == 24 + 1 + 7 + 1


def test_saved_model_loads_with_plain_from_pretrained(explicit_run, mult3_data):
    best = explicit_run / "best"
    model = AutoModelForCausalLM.from_pretrained(best)
    predictor = load_predictor(best)
    example = read_examples(mult3_data / "test.txt")[0]
    prompt = predictor.layout.prefix + predictor.tokenizer(example.question, add_special_tokens=False)["input_ids"]
    prompt.append(predictor.layout.sep_id)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                         pad_token_id=predictor.layout.pad_id)
    # without its remote code (tests/test_export.py) nothing stops plain generate after the answer (EOS is SEP,
    # which also closes the CoT, so the saved generation config names none): it begins with icot's answer
    ours = predictor.generate([prompt], 40)[0]
    produced = out[0, len(prompt):].tolist()
    assert len(produced) == 40 and produced[: len(ours)] == ours and ours[-1] == predictor.layout.sep_id
    assert (best / "model.safetensors").exists() and json.loads((best / "icot.json").read_text())["method"] == "explicit"


def test_predict_accepts_ordinary_numbers(explicit_run, mult3_data):
    predictor = load_predictor(explicit_run / "best")
    example = read_examples(mult3_data / "train.txt")[0]
    a, b = (int("".join(reversed(part.split()))) for part in example.question.split(" * "))
    prediction = predict(predictor, f"{a}*{b}")
    assert prediction.line().startswith(f"{a}*{b} = {a * b}  (correct; CoT: ")
    assert (prediction.question, prediction.cot, prediction.answer) == (example.question, example.cot, example.answer)
    assert predict(predictor, example.question).line() == prediction.line()


def test_eval_cli_writes_json_and_shows_examples(explicit_run, mult3_data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert run_cli("eval", "--model", explicit_run / "best", "--data", mult3_data / "test.txt", "--batch-size", "8",
                   "--json", out, "--show", "2") == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and printed.count("reference:") == 2
    result = json.loads(out.read_text())
    assert result["accuracy"] == 1.0 and len(result["predictions"]) == 32 and result["examples_per_s"] > 0


def test_learning_rate_warms_up_then_drops(mult3_data, tmp_path):
    from icot.cli import build_train_config

    trainer_cls, config = build_train_config(None, "explicit", ["--data", str(mult3_data), "--out", str(tmp_path / "r"),
                                                                "--warmup-steps", "2", "--lr-drop-step", "5",
                                                                "--lr-drop-factor", "0.5"])
    assert [trainer_cls(config).lr_factor(step) for step in range(7)] == [0.5, 1, 1, 1, 1, 0.5, 0.5]


@pytest.mark.parametrize("saved, placement, gap_from", [
    ({"keep_position": True, "position_gap": 24}, "in_place", 1),  # icot 0.1: the gap after the first SEP
    ({"keep_position": True, "position_gap": 24, "position_gap_from": 0}, "authors", 0),
    ({"keep_position": True, "position_gap": 24, "position_gap_from": 1, "gap_placement": "in_place"}, "in_place", 1),
])
def test_a_saved_model_is_decoded_with_the_positions_it_was_trained_with(explicit_run, tmp_path, saved, placement, gap_from):
    model = tmp_path / "model"
    shutil.copytree(explicit_run / "best", model)
    meta = json.loads((model / "icot.json").read_text())
    (model / "icot.json").write_text(json.dumps({**meta, "cot_removed": "all", **saved}))
    predictor = load_predictor(model)
    assert (predictor.gap_placement, predictor.position_gap_from, predictor.position_gap) == (placement, gap_from, 24)


def test_equal_exact_match_keeps_the_better_token_accuracy(mult3_data, tmp_path):
    """A baseline at 0.000 exact match throughout keeps its best model, not its first one."""
    run = tmp_path / "nocot"
    assert run_cli("train", "--method", "nocot", "--data", mult3_data, "--model", "micro", "--out", run, "--lr", "3e-3",
                   "--batch-size", "32", "--epochs", "24", "--eval-every", "4", "--save-every", "24") == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if r.get("event") == "validation"]
    assert {v["val_accuracy"] for v in validations} == {0.0}
    best = max(validations, key=lambda v: v["val_token_accuracy"])
    assert best["step"] != validations[0]["step"]  # the old rule kept the first of equal results
    assert records[-1]["best_step"] == best["step"]
    assert json.loads((run / "best" / "icot.json").read_text())["step"] == best["step"]


GOAL_RUN = ["train", "--method", "explicit", "--model", "micro", "--lr", "3e-3", "--batch-size", "32",
            "--eval-every", "10", "--log-every", "10", "--epochs", "400", "--stop-at-accuracy", "0.5",
            "--save-every", "400"]  # a checkpoint at the end only: one per step (an epoch) costs a sixth of the run


@pytest.fixture(scope="module")
def goal_run(mult3_data, tmp_path_factory):
    """An explicit run stopped by stop_at_accuracy; tests that resume it work on a copy."""
    run = tmp_path_factory.mktemp("goal") / "stopped"
    assert run_cli(*GOAL_RUN, "--data", mult3_data, "--out", run) == 0
    return run


def test_stop_at_accuracy_ends_at_the_first_validation_that_reaches_it(goal_run, mult3_data, tmp_path):
    """The run stops right after the check that reaches the target, with the weights a run of
    exactly that many steps would have: the trajectory before it is untouched."""
    stopped = shutil.copytree(goal_run, tmp_path / "stopped")
    records = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if r.get("event") == "validation"]
    assert len(validations) > 1 and [v["val_accuracy"] >= 0.5 for v in validations] == [False] * (len(validations) - 1) + [True]
    step = validations[-1]["step"]
    assert step < 400
    assert [r for r in records if r.get("event") == "goal_reached"] == [{"event": "goal_reached", "step": step}]
    assert records[-1]["event"] == "end" and records[-1]["step"] == step and "test_accuracy" in records[-1]
    assert run_cli("train", "--resume", stopped) == 0  # a resumed run knows it has reached its goal
    resumed = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()][len(records):]
    assert [r.get("event") for r in resumed] == ["resume", "end"] and resumed[-1]["step"] == step
    for event in (records[0], resumed[0]):  # a wall time is read with the machine that ran it
        assert event["torch_threads"] == torch.get_num_threads()
        assert event.get("cpu_native_bf16") == (native_bf16_cpu() if event["device"] == "cpu" else None)

    capped = tmp_path / "capped"
    common = [a for a in GOAL_RUN if a not in ("--stop-at-accuracy", "0.5")]
    assert run_cli(*common, "--data", mult3_data, "--max-steps", step, "--out", capped) == 0
    for run in (stopped, capped):
        assert json.loads((run / "best" / "icot.json").read_text())["step"] == step
    a = AutoModelForCausalLM.from_pretrained(stopped / "best").state_dict()
    b = AutoModelForCausalLM.from_pretrained(capped / "best").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_steps_past_goal_trains_on_and_saves_the_last_model(goal_run, mult3_data, tmp_path):
    """Past the goal the run goes on steps_past_goal steps and its model is the one at the end, also
    when a run stopped at its goal is resumed with steps_past_goal set (the goal step is kept)."""
    straight = tmp_path / "straight"
    assert run_cli(*GOAL_RUN, "--data", mult3_data, "--steps-past-goal", "20", "--out", straight) == 0
    resumed, wrecked = shutil.copytree(goal_run, tmp_path / "resumed"), shutil.copytree(goal_run, tmp_path / "wrecked")
    goal = json.loads((resumed / "best" / "icot.json").read_text())["step"]
    assert run_cli("train", "--resume", resumed, "--steps-past-goal", "20") == 0
    # a model made worse past the goal is still the one saved: the run's model is its last
    assert run_cli("train", "--resume", wrecked, "--steps-past-goal", "20", "--lr", "1") == 0
    records = [json.loads(line) for line in (wrecked / "metrics.jsonl").read_text().splitlines()]
    accuracy = {r["step"]: r["val_accuracy"] for r in records if r.get("event") == "validation"}
    assert accuracy[goal + 20] < accuracy[goal] and records[-1]["best_step"] == goal + 20
    for run in (straight, resumed):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r.get("event") == "validation"][-3:] == [goal, goal + 10, goal + 20]
        assert records[-1]["event"] == "end" and records[-1]["step"] == records[-1]["best_step"] == goal + 20
        assert json.loads((run / "best" / "icot.json").read_text())["step"] == goal + 20
    a = AutoModelForCausalLM.from_pretrained(straight / "best").state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed / "best").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["--stop-at-accuracy", "1.5", "--eval-every", "10"], "stop_at_accuracy must be in (0, 1]"),
    (["--stop-at-accuracy", "0.9"], "set eval_every"),
    (["--steps-past-goal", "20", "--eval-every", "10"], "steps_past_goal counts from the validation"),
    (["--stop-at-accuracy", "0.9", "--steps-past-goal", "15", "--eval-every", "10"], "multiple of eval_every (10)"),
])
def test_stop_at_accuracy_settings_are_checked(mult3_data, tmp_path, capsys, args, message):
    code = run_cli("train", "--method", "explicit", "--data", mult3_data, "--model", "micro", "--out", tmp_path / "r", *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_stop_at_accuracy_needs_a_validation_file(mult3_data, tmp_path, capsys):
    code = run_cli("train", "--method", "nocot", "--train-file", mult3_data / "train.txt", "--model", "micro",
                   "--eval-every", "10", "--stop-at-accuracy", "0.9", "--out", tmp_path / "r")
    err = capsys.readouterr().err
    assert code == 2 and "stop_at_accuracy watches validation accuracy" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("precision, native, warned", [
    ("bf16-mixed", False, True), ("bf16", False, True), ("bf16-mixed", True, False), ("fp32", False, False)])
def test_bf16_on_a_cpu_without_native_bf16_is_warned(mult3_data, tmp_path, monkeypatch, capsys, precision, native,
                                                      warned):
    """Emulated bf16 made a 4x4 step 19x slower than fp32: the user is told before the run starts."""
    from accelerate.state import AcceleratorState
    from icot.trainer import loop as trainer
    from icot.cli import build_train_config
    from icot.errors import new_command

    monkeypatch.setattr(trainer, "native_bf16_cpu", lambda: native)
    new_command()
    trainer_cls, config = build_train_config(None, "explicit", ["--data", str(mult3_data), "--out", str(tmp_path / "r"),
                                                                "--precision", precision, "--cpu"])
    # Accelerate keeps one mixed-precision setting per process: start afresh, and leave it afresh for the next test
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        trainer_cls(config)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert ("on a CPU without native bf16" in capsys.readouterr().err) == warned
