"""Config fields are declared once, with their help: `icot train --help` and docs/config.md show them."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest
from conftest import run_cli

from icot import config
from icot.api import resumable_fields
from icot.config_doc import render
from icot.methods import trainers
from icot.methods.kd.config import MixtureSettings, StageSettings
from icot.probe.settings import ProbeSettings
from icot.trainer import TrainConfig

DOC = Path(__file__).parent.parent / "docs" / "config.md"


def _subclasses(cls) -> set:
    return {cls} | {c for sub in cls.__subclasses__() for c in _subclasses(sub)}


def _sections(cls) -> set:
    """cls and the dataclasses of its fields (KDConfig's teacher, student, ... sections)."""
    hints = typing.get_type_hints(cls)
    nested = [hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    return {cls} | {c for n in nested for c in _sections(n)}


TRAINERS = trainers()  # imports every method's module, so that their config classes are subclasses found below
CONFIG_CLASSES = sorted({c for root in (TrainConfig, StageSettings, MixtureSettings, ProbeSettings)
                         for sub in _subclasses(root) for c in _sections(sub)}, key=lambda c: c.__qualname__)


def test_docs_config_md_is_generated_from_the_declarations():
    assert DOC.read_text(encoding="utf-8") == render(), \
        "docs/config.md is out of date: regenerate it with `python -m icot.config_doc > docs/config.md`"


def test_every_config_class_is_found():
    names = {c.__name__ for c in CONFIG_CLASSES}
    assert {t.config_class.__name__ for t in TRAINERS.values()} <= names
    assert {"BaselineConfig", "TeacherConfig", "StudentConfig", "EmulatorConfig", "CoupleConfig", "TeacherStage",
            "StudentStage", "EmulatorStage", "CoupleStage", "ProbeSettings"} <= names


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_help(cls):
    missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help", "").strip()]
    assert not missing, f"{cls.__name__}: fields without help metadata (declare them with config.option(help=...)): {missing}"


def test_resumable_fields_come_from_the_metadata():
    assert resumable_fields() == {
        "epochs", "max_steps", "max_train_seconds", "lr", "lr_drop_step", "lr_drop_factor", "weight_decay", "warmup_steps",
        "max_grad_norm",
        "eval_every", "eval_batch_size", "max_new_tokens", "max_eval_examples", "log_every", "save_every",
        "keep_checkpoints", "num_workers", "compile", "cpu", "report_to", "tracker_project", "rewind_max",
        "steps_past_goal"}


def test_a_field_given_another_default_keeps_its_declaration():
    coconut = {f.name: f for f in dataclasses.fields(TRAINERS["coconut"].config_class)}
    shared = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert coconut["lr"].default == 1e-4 and coconut["lr"].metadata["help"].startswith(shared["lr"].metadata["help"])
    assert coconut["lr"].metadata["bounds"] == shared["lr"].metadata["bounds"] and coconut["lr"].metadata["resumable"]


def test_kd_stage_settings_derive_from_the_shared_fields():
    shared = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(StageSettings)
    for f in dataclasses.fields(StageSettings):
        base = shared[f.name]
        assert f.default is None and type(None) in typing.get_args(hints[f.name])
        assert f.metadata["help"].startswith(base.metadata["help"].split("; null: ")[0])
        assert {k: v for k, v in f.metadata.items() if k != "help"} == {k: v for k, v in base.metadata.items() if k != "help"}


@pytest.mark.parametrize("section, value, message", [
    ("teacher", {"epochs": 0}, "config: teacher.epochs must be at least 1 (or null), got 0"),
    ("student", {"lr": 0.0}, "config: student.lr must be positive, got 0.0"),
    ("emulator", {"lr_drop_factor": 2.0}, "config: emulator.lr_drop_factor must be in (0, 1], got 2.0"),
    ("couple", {"warmup_steps": -1}, "config: couple.warmup_steps must not be negative, got -1"),
])
def test_kd_stage_bounds_are_the_shared_ones(tmp_path, section, value, message):
    with pytest.raises(config.UserError, match=re.escape(message)):
        config.build(TRAINERS["kd"].config_class, {"data": str(tmp_path), "out": str(tmp_path / "run"), section: value})


def test_train_help_lists_the_methods_fields(capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli("train", "--method", "stepwise", "--help")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "usage: icot train" in out and "config fields of --method stepwise" in out
    assert "--removal-smoothing-lambda  (float, default 4.0)" in out
    assert "P(o) proportional to exp(-lambda o)" in out
    assert "--removal-side  (str, default left; one of left, right)" in out
    assert "--lr  (float, default 5e-05; a resume may change it)" in out
    for row in config.describe(TRAINERS["stepwise"].config_class):
        assert f"--{row['name'].replace('_', '-')}  (" in out


def test_train_help_without_a_method_lists_the_shared_fields_and_the_methods(capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli("train", "--help")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "config fields every method shares" in out and "--batch-size  (int, default 32)" in out
    assert "removal_smoothing" not in out and "removal-smoothing" not in out
    assert f"methods: {', '.join(TRAINERS)}" in out


def test_train_help_of_kd_lists_its_sections(capsys):
    with pytest.raises(SystemExit):
        run_cli("train", "--method", "kd", "-h")
    out = capsys.readouterr().out
    assert "--teacher.lr  (float | null, default null; a resume may change it)" in out
    assert "--emulator.mixture  (str, default soft; one of soft, token)" in out


def test_train_help_of_an_unknown_method_is_an_error(capsys):
    assert run_cli("train", "--method", "bogus", "--help") == 2
    assert "method 'bogus' is unknown" in capsys.readouterr().err


def test_a_resume_may_change_only_the_resumable_fields_also_in_sections(mult3_data, tmp_path):
    from icot.api import _resumed_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"method: kd\ndata: {mult3_data}\nout: {run}\n")
    _, resumed = _resumed_config(run, {"teacher": {"lr": 1e-4}, "max_steps": 5})
    assert resumed.teacher.lr == 1e-4 and resumed.max_steps == 5
    allowed = ("compile, cpu, epochs, eval_batch_size, eval_every, keep_checkpoints, log_every, lr, lr_drop_factor, "
               "lr_drop_step, max_eval_examples, max_grad_norm, max_new_tokens, max_steps, max_train_seconds, num_workers, "
               "report_to, rewind_max, save_every, steps_past_goal, tracker_project, warmup_steps, weight_decay")
    with pytest.raises(config.UserError) as refused:
        _resumed_config(run, {"teacher": {"batch_size": 8}})
    assert str(refused.value) == (f"--teacher.batch-size 8: {run} was trained with teacher.batch_size None, and a resume "
                                  f"continues the same run; it may change only {allowed} (start a new run for the rest)")
