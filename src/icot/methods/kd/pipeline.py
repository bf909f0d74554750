"""`icot train --method kd`: teacher → (a) student → (b) emulator → (c) coupled, in one command.

Each stage is a Trainer on the shared loop with its own run directory RUN/<stage> (config,
metrics, checkpoints, plots) and its best model in RUN/<stage>/best, except the run's last stage,
whose best model is RUN/best (the coupled model for a full run). Each stage's best model feeds the
next. `--resume RUN` skips finished stages, resumes the interrupted one from its checkpoint and
runs the rest.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from accelerate import PartialState
from tqdm.auto import tqdm

from icot import paths, trackers
from icot.methods.kd.config import KDConfig
from icot.methods.kd.modules import check_cot_teacher, kd_metadata
from icot.methods.kd.stages import CoupleTrainer, EmulatorTrainer, StudentTrainer, TeacherTrainer
from icot.report import plot_kd_stages
from icot.trainer import CHECKPOINTS, LATEST, TrainConfig, Trainer, start_run_dir
from icot.trainer.rundir import check_data_readable

_TRAINERS = {"teacher": TeacherTrainer, "student": StudentTrainer, "emulator": EmulatorTrainer, "couple": CoupleTrainer}
STAGE_NEEDS = {"teacher": (), "student": ("teacher",), "emulator": ("teacher",), "couple": ("student", "emulator")}


class KDTrainer:
    """Runs the stages of a KDConfig in order; `icot train` uses it like any method's Trainer."""

    config_class = KDConfig

    def __init__(self, config: KDConfig, resume: bool = False):
        self.config = config
        self.resume = resume
        self.run_dir = Path(config.out)
        trackers.log_with(config.report_to)  # a missing tracker package fails before the first stage

    @property
    def is_main(self) -> bool:
        return PartialState().is_main_process

    def fit(self) -> dict:
        """The stages in order, RUN locked against any other command meanwhile (paths.one_writer)."""
        with paths.one_writer(self.run_dir, hold=self.is_main):
            return self.fit_locked()

    def fit_locked(self) -> dict:
        self.check_given_models()
        self.prepare_run_dir()
        stages = self.config.stages()
        summaries = {stage: self.fit_stage(stage) for stage in stages}
        final = {k: v for k, v in summaries[stages[-1]].items() if k != "event"}
        return {**final, "stages": {s: {k: v for k, v in summ.items() if k != "event"} for s, summ in summaries.items()}}

    def stage_needs(self) -> dict[str, list[str]]:
        """The stages this run trains, each with those of them whose best models it starts from: the
        student and the emulator need only the teacher, so they can train side by side (`icot demo`)."""
        stages = self.config.stages()
        return {stage: [s for s in STAGE_NEEDS[stage] if s in stages] for stage in stages}

    def fit_stage(self, stage: str) -> dict:
        """One stage, from the best models of the stages it needs (given in the config or trained in
        RUN/<stage>/best), once the run directory is prepared; the last one also plots the stages."""
        cfg = self.config
        given = {"teacher": cfg.teacher_dir, "student": cfg.student_dir, "emulator": cfg.emulator_dir}
        models = {name: model or str(self.run_dir / name / "best") for name, model in given.items()}
        last = stage == cfg.stages()[-1]
        summary = self.run_stage(stage, self.stage_trainer(stage, models, last))
        if last and self.is_main:
            (self.run_dir / "plots").mkdir(exist_ok=True)
            plot_kd_stages(self.run_dir, self.run_dir / "plots" / "stages.png")
        return summary

    def check_given_models(self) -> None:
        """Saved stage models given in the config are of the right kind, before any training."""
        if self.config.teacher_dir is not None:
            check_cot_teacher(self.config.teacher_dir)
        if self.config.student_dir is not None:
            kd_metadata(self.config.student_dir, "student", "student_dir")
        if self.config.emulator_dir is not None:
            kd_metadata(self.config.emulator_dir, "emulator", "emulator_dir")

    def prepare_run_dir(self) -> None:
        if not self.resume:
            start_run_dir(self.run_dir, self.config, self.is_main, PartialState().wait_for_everyone,
                          lambda: check_data_readable(self.config))

    def stage_trainer(self, stage: str, models: dict, last: bool) -> Trainer:
        """The stage's Trainer, its config the top-level fields with the stage's section on top."""
        cfg = self.config
        shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
        values = {**shared, **getattr(cfg, stage).overrides(), "out": str(self.run_dir / stage), "overwrite": True}
        if stage == "teacher":
            values.update(method="explicit", delta=cfg.delta, subset=cfg.subset)
        elif stage in ("student", "emulator"):
            # the student and the emulator share the teacher's vocabulary: its tokenizer
            values.update(teacher_dir=models["teacher"], tokenizer=models["teacher"], delta=cfg.delta, subset=cfg.subset)
            if getattr(cfg, stage).init_from_teacher:
                values["model"] = models["teacher"]
            if stage == "emulator":
                values.update(cfg.emulator.mixture_values())
        else:
            values.update(student_dir=models["student"], emulator_dir=models["emulator"],
                          freeze_emulator=cfg.couple.freeze_emulator)
        trainer_class = _TRAINERS[stage]
        config = trainer_class.config_class(**values)
        config.validate()
        return trainer_class(config, resume=self.resume and (Path(config.out) / CHECKPOINTS / LATEST).exists(),
                             best_dir=self.run_dir / "best" if last else None)

    def run_stage(self, stage: str, trainer: Trainer) -> dict:
        finished = self.resume and _end_record(trainer.run_dir)
        if finished:
            tqdm.write(f"ICoT-KD {stage}: finished earlier, best model {trainer.best_dir}")
            return finished
        tqdm.write(f"ICoT-KD {stage}: training in {trainer.run_dir}")
        return trainer.fit()


def _end_record(run_dir: Path) -> dict | None:
    """The `end` record of a finished stage's metrics, or None."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    ends = [json.loads(line) for line in metrics.read_text().splitlines() if '"event": "end"' in line]
    return ends[-1] if ends else None
