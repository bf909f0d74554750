"""--report-to: the records of metrics.jsonl reach TensorBoard and W&B through Accelerate's trackers."""

import glob
import json
import math
import struct
import time

import pytest
import yaml

from conftest import run_cli
from test_cli_errors import one_line_error
from icot import trackers


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(data, run, *extra):
    """A few steps of stepwise training (its removal records too), validated and tested."""
    return run_cli("train", "--method", "stepwise", "--data", data, "--model", "micro", "--out", run, "--lr", "1e-3",
                   "--batch-size", "16", "--epochs", "100", "--max-steps", "4", "--log-every", "1", "--eval-every", "2",
                   "--remove-per-epoch", "4", *extra)


def tensorboard_scalars(run) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard" / "implicit-cot"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_receives_the_records_and_the_config(mult3_data, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert train(mult3_data, run, "--report-to", "tensorboard") == 0
    scalars, logged = tensorboard_scalars(run), records(run)
    training = [r for r in logged if "loss" in r]
    assert [(step, round(value, 5)) for step, value in scalars["train/loss"]] == \
        [(r["step"], round(r["loss"], 5)) for r in training] and len(training) == 4
    validations = [r for r in logged if r.get("event") == "validation"]
    assert [step for step, _ in scalars["validation/val_accuracy"]] == [r["step"] for r in validations] == [2, 4]
    removals = [r for r in logged if r.get("event") == "removal"]
    assert removals and [value for _, value in scalars["removal/removed"]] == [r["removed"] for r in removals]
    end = logged[-1]
    assert scalars["end/test_accuracy"] == [(4, pytest.approx(end["test_accuracy"]))]
    assert not any("device" in tag for tag in scalars)  # strings stay out
    # the resolved config as hyperparameters (Accelerate writes them beside the events as hparams.yml too)
    (hparams,) = glob.glob(str(run / "tensorboard" / "implicit-cot" / "*" / "hparams.yml"))
    hparams = yaml.safe_load(open(hparams))
    assert hparams["lr"] == 1e-3 and hparams["report_to"] == "tensorboard" and hparams["max_steps"] == 4
    assert hparams["tokenizer"] == "None" and hparams["remove_all_when_remove_beyond"] == "inf"


def test_a_resumed_run_redraws_its_curves_from_the_checkpoint(mult3_data, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert train(mult3_data, run, "--save-every", "2", "--keep-checkpoints", "2") == 0
    (run / "checkpoints" / "latest").write_text("step-00000002\n")
    # trackers may be switched on at a resume: a harmless change, announced
    assert run_cli("train", "--resume", run, "--report-to", "tensorboard", "--lr", "2e-3") == 0
    assert "report_to none -> tensorboard" in capsys.readouterr().err
    first = tensorboard_scalars(run)
    assert [step for step, _ in first["train/loss"]] == [3, 4]  # from the resume on
    (run / "checkpoints" / "latest").write_text("step-00000002\n")
    assert run_cli("train", "--resume", run) == 0
    again, logged = tensorboard_scalars(run), records(run)
    # the points the second resume redid replace those of the first: one per step, as in metrics.jsonl
    assert [(step, round(value, 5)) for step, value in again["train/loss"]] == \
        [(r["step"], round(r["loss"], 5)) for r in logged if "loss" in r and r["step"] > 2]


def wandb_history(run_file) -> list[dict]:
    """The history rows of an offline W&B run file: protobuf Records in LevelDB's log format (a
    7-byte file header, then 32 KiB blocks of chunks, each with a crc32/length/type header)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    rows, chunks, pos = [], [], 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if pos > len(data):  # a record still being written
            break
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record.FromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)  # 'train/loss' is nested
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_records(mult3_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert train(mult3_data, run, "--report-to", "wandb", "--tracker-project", "icot-tests") == 0
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    # wandb-core, a process of its own, may still be writing the file when training has returned
    # (seen on a loaded machine): wait for the last record
    for _ in range(150):
        rows = wandb_history(run_file)
        if any("end/test_accuracy" in row for row in rows):
            break
        time.sleep(0.2)
    logged = records(run)
    losses = {row["_step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert losses == {r["step"]: pytest.approx(r["loss"]) for r in logged if "loss" in r}
    final = next(row for row in rows if "end/test_accuracy" in row)
    assert final["end/test_accuracy"] == logged[-1]["test_accuracy"] and final["_step"] == 4


def test_a_missing_tracker_package_is_refused_before_any_work(mult3_data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(trackers, "get_available_trackers", lambda: [])  # as if nothing were installed
    line = one_line_error(capsys, train(mult3_data, run, "--report-to", "tensorboard"))
    assert line == ("icot: error: --report-to tensorboard needs the tensorboard package: "
                    "pip install 'implicit-cot[tensorboard]'")
    assert "pip install 'implicit-cot[wandb]'" in one_line_error(capsys, train(mult3_data, run, "--report-to", "wandb"))
    assert "needs the comet_ml package: pip install comet_ml" in one_line_error(
        capsys, run_cli("train", "--method", "kd", "--data", mult3_data, "--out", run, "--report-to", "comet_ml"))
    assert not run.exists()


def test_mlflow_without_its_package(mult3_data, tmp_path, capsys):
    """The real check (no monkeypatch): mlflow is heavy and not in the dev extra."""
    if "mlflow" in {str(t) for t in trackers.get_available_trackers()}:
        pytest.skip("mlflow is installed here")
    line = one_line_error(capsys, train(mult3_data, tmp_path / "run", "--report-to", "mlflow"))
    assert line.endswith("--report-to mlflow needs the mlflow package: pip install 'implicit-cot[mlflow]'")
    assert not (tmp_path / "run").exists()


def test_unknown_tracker_names_the_known_ones(mult3_data, tmp_path, capsys):
    line = one_line_error(capsys, train(mult3_data, tmp_path / "run", "--report-to", "tensorbord"))
    assert "report_to: 'tensorbord' is not one of all, none, " in line and "wandb" in line and "mlflow" in line


def test_report_to_all_without_any_tracker_warns_and_trains(mult3_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trackers, "get_available_trackers", lambda: [])
    assert train(mult3_data, tmp_path / "run", "--report-to", "all", "--max-steps", "1") == 0
    assert "report_to all: no tracker package is installed" in capsys.readouterr().err


def test_a_tracker_that_fails_to_start_is_one_line(mult3_data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from accelerate.tracking import TensorBoardTracker

    def no_server(self):
        raise RuntimeError("no server here\nsecond line")

    monkeypatch.setattr(TensorBoardTracker, "start", no_server)
    line = one_line_error(capsys, train(mult3_data, tmp_path / "run", "--report-to", "tensorboard"))
    assert line == "icot: error: report_to tensorboard: the tracker did not start (RuntimeError: no server here)"


def test_records_become_scalars_and_configs_hyperparameters():
    record = {"event": "removal", "step": 7, "removed": math.inf, "optimizer_reset": True, "device": "cpu",
              "best_step": None, "stages": {"teacher": {"test_accuracy": 0.5}}}
    assert trackers.scalars(record) == {"removal/optimizer_reset": 1, "removal/stages/teacher/test_accuracy": 0.5}
    assert trackers.scalars({"step": 3, "loss": 0.25})["train/loss"] == 0.25
    config = {"lr": 1e-3, "tokenizer": None, "delta": "dynamic", "sizes": [1, 2], "teacher": {"epochs": 2}}
    assert trackers.hparams(config) == {"lr": 1e-3, "tokenizer": "None", "delta": "dynamic", "sizes": "[1, 2]",
                                        "teacher/epochs": 2}
    assert trackers.requested("none") == [] and trackers.requested("tensorboard, wandb") == ["tensorboard", "wandb"]
