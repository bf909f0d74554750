"""The model card (README.md) icot writes into every model directory it saves in training."""

import datetime
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from icot.data.format import write_examples
from conftest import mult_examples


def card(model_dir) -> tuple[dict, str]:
    """(YAML metadata, markdown body) of a model card."""
    text = (model_dir / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_card_of_a_tested_model(explicit_run, mult3_data):
    meta, body = card(explicit_run / "best")
    end = json.loads((explicit_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["implicit-cot", "explicit", "multiplication"] and "base_model" not in meta  # a preset
    (result,) = meta["model-index"][0]["results"]
    assert result["metrics"][0]["type"] == "accuracy" and result["metrics"][0]["value"] == end["test_accuracy"] == 1.0
    assert f"| training data | `{mult3_data / 'train.txt'}`: 32 examples of 3x3 multiplication |" in body
    assert "| base model | `micro` preset: a gpt2 shape (2 layers, 4 heads, width 128), random initialisation |" in body
    saved = json.loads((explicit_run / "best" / "icot.json").read_text())
    assert f"| saved at | step {saved['step']} (epoch {saved['epoch']}) |" in body
    measured = saved["evaluation"]
    assert measured["accuracy"] == 1.0 and measured["examples"] == 32 and measured["batch_size"] == 64
    today = datetime.date.today()  # the session fixture may have been trained before midnight
    assert measured["date"] in {today.isoformat(), (today - datetime.timedelta(days=1)).isoformat()}
    assert f"torch {torch.__version__}" in measured["machine"]
    assert measured["training_data"]  # the fixture's test file repeats its training file: the card says so
    assert (f"Training accuracy (the test file repeats the training file) **1.0000** on 32 examples of "
            f"`{mult3_data / 'test.txt'}`" in body
            and f"Measured {measured['date']} on CPU " in body)
    best = explicit_run / "best"
    assert f'icot predict --model {best} "123*987"' in body and f'icot.load("{best}")' in body
    assert f'AutoModelForCausalLM.from_pretrained("{best}", trust_remote_code=True)' in body
    assert "lr: 0.003" in body.split("Training config")[1]  # the whole config, at the end


@pytest.mark.parametrize("model_dir", ["run", "models/mult3x3-micro-stepwise", "models/mult4x4-tiny-stepwise"])
def test_cards_are_valid_hub_metadata(explicit_run, model_dir):
    """huggingface_hub reads the card's metadata, its test result included (a card the Hub would reject raises)."""
    from huggingface_hub import ModelCard

    path = explicit_run / "best" if model_dir == "run" else Path(__file__).parent.parent / model_dir
    data = ModelCard.load(path / "README.md").data
    assert data.library_name == "transformers" and data.eval_results
    if model_dir == "run":
        (result,) = data.eval_results
        assert result.metric_type == "accuracy" and result.metric_value == 1.0 and result.dataset_name == "test.txt"
    else:  # the shipped models: each result names its test data and is at least 0.99
        assert all(r.dataset_name and r.metric_value >= 0.99 for r in data.eval_results)


def test_card_of_a_stepwise_model_without_a_test_set(mult3_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        (data / f"{split}.txt").write_text((mult3_data / f"{split}.txt").read_text())
    run = tmp_path / "run"
    assert run_cli("train", "--method", "stepwise", "--data", data, "--model", "micro", "--out", run,
                   "--batch-size", "32", "--epochs", "100", "--max-steps", "4", "--eval-every", "2",
                   "--remove-per-epoch", "1", "--keep-position", "--gap-placement", "in_place") == 0
    meta, body = card(run / "best")
    assert meta["tags"] == ["implicit-cot", "stepwise", "multiplication"] and "model-index" not in meta
    assert "Test accuracy and speed: not measured." in body and "evaluation" not in json.loads(
        (run / "best" / "icot.json").read_text())
    assert "| CoT tokens removed | 3 (from the left) |" in body  # one a step, counted when step 4 began
    assert "| removal pace | fixed: 1.0 tokens per epoch |" in body
    assert ("| keep_position | true: the answer keeps the positions it had with the whole CoT; at inference a gap of "
            "3 positions after token 1 (in place: every kept token keeps its position) |") in body


def test_cards_of_the_icot_kd_stages(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_examples(data / "train.txt", mult_examples(2, 2, 16, seed=0))
    write_examples(data / "test.txt", mult_examples(2, 2, 8, seed=1))
    run = tmp_path / "kd"
    assert run_cli("train", "--method", "kd", "--data", data, "--model", "micro", "--out", run, "--batch-size", "16",
                   "--epochs", "10", "--max-steps", "2") == 0
    meta, body = card(run / "best")
    assert meta["tags"][:2] == ["implicit-cot", "kd"] and meta["model-index"][0]["name"] == "kd"
    assert "stage (c), the coupled model" in body and "(`kd_modules.safetensors`, `emulator/`)" in body
    assert f"| student | `{(run / 'student' / 'best').resolve()}` |" in body
    _, emulator = card(run / "emulator" / "best")
    assert "stage (b), the thought emulator" in emulator and f"--emulator-dir {run / 'emulator' / 'best'}" in emulator
    assert "| mixture size | `1` |" in emulator and "not measured" in emulator  # its test is a loss, not an accuracy
    teacher, _ = card(run / "teacher" / "best")
    assert teacher["tags"] == ["implicit-cot", "explicit", "multiplication"]


def test_card_states_the_adaptive_pace_with_its_late_part():
    from icot.modelcard import _settings

    config = {"removal_pace": "adaptive", "pace_accuracy": 0.9, "pace_min_steps": 100, "pace_max_steps": 400}
    pace = dict(_settings({"config": config}))["removal pace"]
    assert pace.endswith("at most 400 steps each")
    pace = dict(_settings({"config": {**config, "pace_late_from": 30, "pace_late_max_steps": 1500}}))["removal pace"]
    assert pace.endswith("at most 400 steps each (1500 from token 30 on)")
    pace = dict(_settings({"config": {**config, "pace_late_from": 15, "pace_late_max_steps": 1200, "pace_late_until": 24}}))
    assert pace["removal pace"].endswith("at most 400 steps each (1200 from token 15 to 23)")


def test_card_states_rewinds_when_they_were_on():
    from icot.modelcard import _settings

    config = {"rewind_below": 0.1, "rewind_after": 8, "rewind_max": 3, "rewind_to": "best"}
    assert dict(_settings({"rewinds": 1, "config": config}))["rewinds"] == (
        "1 before this model (after 8 validations in a row below 0.1, back to the best one at or above it; at most 3)")
    start = {**config, "rewind_to": "start", "rewind_below": 0.5, "rewind_after": 40, "rewind_max": 2}
    assert dict(_settings({"rewinds": 0, "config": start}))["rewinds"] == (
        "0 restarts before this model (after 40 validations in a row below 0.5 with the whole CoT removed, back to "
        "the initial model with new data; at most 2)")
    assert "rewinds" not in dict(_settings({"config": {}}))


@pytest.mark.parametrize("method, beside", [("coconut", "between the thought tokens"),
                                            ("codi", "codi_projection.safetensors")])
def test_cards_of_continuous_thought_models_say_what_they_need(method, beside):
    from icot.modelcard import how_to_use, summary

    meta = {"method": method, "task": "mult", "digits": "3x3"}
    assert "continuous thoughts, then answers" in summary(meta) and f"method {method}" not in summary(meta)
    assert beside in how_to_use(meta, Path("model"))


def test_push_uploads_the_model_directory_as_a_hub_model_repository(explicit_run, monkeypatch, capsys):
    """Everything up to the upload itself (no network here): the repository is created, the whole
    directory uploaded, the URL printed; the Hub's refusal is one line."""
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or
                        f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    best = explicit_run / "best"
    assert run_cli("push", best, "someone/mult3-explicit", "--private") == 0
    (create, upload) = calls
    assert create == ("create", "someone/mult3-explicit", {"repo_type": "model", "private": True, "exist_ok": True})
    assert upload[1]["folder_path"] == str(best) and upload[1]["repo_id"] == "someone/mult3-explicit"
    assert "uploaded to https://huggingface.co/someone/mult3-explicit" in capsys.readouterr().out

    def refused(self, **kw):
        raise OSError("Connection refused")

    monkeypatch.setattr(HfApi, "upload_folder", refused)
    from test_cli_errors import one_line_error

    line = one_line_error(capsys, run_cli("push", best, "someone/mult3-explicit"))
    assert "push someone/mult3-explicit: the Hub refused or could not be reached (Connection refused)" in line
    line = one_line_error(capsys, run_cli("push", explicit_run, "someone/run"))  # the run, not its model
    assert f"{explicit_run}: no icot.json" in line
