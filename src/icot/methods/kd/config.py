"""ICoT-KD settings: one config for the whole pipeline, and one per stage trainer.

`KDConfig` is what a user writes: the shared fields of every method at the top level (data,
model, lr, batch size, ...), the KD settings (delta, subset, stage, saved stage directories) and
one section per stage whose fields, when set, replace the top-level ones for that stage:

    epochs: 40              # every stage ...
    teacher: {epochs: 1}    # ... but the teacher
    emulator: {mixture: token}
    couple: {freeze_emulator: false}

The pipeline turns it into the stage trainers' own configs (`StudentConfig`, ...).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from icot.config import changed, check_bounds, choice, fields_with, option
from icot.errors import UserError
from icot.methods.baselines import ExplicitConfig
from icot.methods.kd.modules import MIXTURES, SOFT, TOKEN
from icot.methods.kd.states import DYNAMIC, SUBSETS, parse_delta
from icot.trainer import TrainConfig

STAGES = ("teacher", "student", "emulator", "couple")
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


# ----- the fields more than one config has, declared once ----------------------------------------

def _delta():
    return option(DYNAMIC, help="the CoT distance between the teacher positions read for consecutive layers: "
                                "'dynamic' (the CoT spread evenly over the layers, the paper's) or a positive integer")


def _subset():
    return choice(*SUBSETS, default="diagonal",
                  help="which teacher states feed the layers: the diagonal (the paper's), a column (the first or "
                       "the second SEP at every layer) or a row (see kd/states.py)")


def _model_dir(stage: str, what: str):
    return option(None, help=f"a trained {stage} model directory ({what}); null: train one in this run")


def _freeze_emulator():
    return option(False, help="keep the emulator's weights fixed while coupling; false: train it with the student")


def _check_delta(delta: str) -> None:
    try:
        parse_delta(delta)
    except ValueError:
        raise UserError(f"config: delta must be '{DYNAMIC}' or a positive integer, got '{delta}'") from None


# ----- the stage trainers' configs ----------------------------------------------------------------

@dataclass
class TeacherConfig(ExplicitConfig):
    """ICoT-KD's teacher: an explicit-CoT run that knows where its states will be read."""

    delta: str = _delta()
    subset: str = _subset()

    def validate(self) -> None:
        super().validate()
        _check_delta(self.delta)


@dataclass
class TeacherStatesConfig(TrainConfig):
    """Stages (a) and (b) learn from a trained explicit-CoT teacher's hidden states."""

    method: str = option("kd", help="kd: a stage of ICoT-KD (Deng et al. 2023)")
    teacher_dir: str | None = option(None, help="the trained explicit-CoT teacher's model directory (required), "
                                                "e.g. RUN/teacher/best")
    delta: str = _delta()
    subset: str = _subset()

    def validate(self) -> None:
        super().validate()
        if self.teacher_dir is None:
            raise UserError("config: teacher_dir is required (a trained explicit-CoT model directory, e.g. RUN/teacher/best)")
        _check_delta(self.delta)


@dataclass
class StudentConfig(TeacherStatesConfig):
    """Stage (a), mind-reading the teacher."""


@dataclass
class MixtureSettings:
    """The emulator's mixture: soft, as the released code, or token, as the paper's research code."""

    mixture: str = choice(*MIXTURES, default=SOFT,
                          help="soft: a softmax average of mixture_size components (the released code); token: one "
                               "component per vocabulary token, supervised by the teacher's CoT token (the paper's "
                               "research code)")
    mixture_size: int = option(1, help="soft mixture: its number of components (1 for multiplication)")
    softmax_temperature: float = option(0.05, help="soft mixture: the temperature of its softmax (the released "
                                                   "code's 0.05)")
    token_loss_weight: float = option(1.0, help="token mixture: the weight of its cross-entropy term (the script's "
                                                "default 0.01; the paper adds it unweighted)")

    def check_mixture(self, section: str) -> None:
        if self.mixture_size < 1:
            raise UserError(f"config: {section}mixture_size must be at least 1, got {self.mixture_size}")
        if self.mixture == TOKEN and self.mixture_size != 1:
            raise UserError(f"config: {section}mixture_size is for the soft mixture; the token mixture has one "
                            "component per vocabulary token (drop mixture_size)")
        if not self.softmax_temperature > 0:
            raise UserError(f"config: {section}softmax_temperature must be positive, got {self.softmax_temperature}")
        if not self.token_loss_weight >= 0:
            raise UserError(f"config: {section}token_loss_weight must not be negative, got {self.token_loss_weight}")

    def mixture_values(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(MixtureSettings)}


@dataclass
class EmulatorConfig(MixtureSettings, TeacherStatesConfig):
    """Stage (b), thought emulation."""

    def validate(self) -> None:
        super().validate()
        self.check_mixture("")


@dataclass
class CoupleConfig(TrainConfig):
    """Stage (c), couple and optimize: end-to-end on the answer, from a student and an emulator."""

    method: str = option("kd", help="kd: a stage of ICoT-KD (Deng et al. 2023)")
    student_dir: str | None = option(None, help="the trained student's model directory (required)")
    emulator_dir: str | None = option(None, help="the trained emulator's model directory (required)")
    freeze_emulator: bool = _freeze_emulator()

    def validate(self) -> None:
        super().validate()
        if self.student_dir is None or self.emulator_dir is None:
            raise UserError("config: student_dir and emulator_dir are required (saved stage a and b models)")


# ----- the user's config -------------------------------------------------------------------------

def _stage_settings(*names):
    """Make a stage's dataclass, with TrainConfig's fields `names` as declared there (type, help,
    bounds, resumability), null by default: null keeps the top-level value."""

    def declare(cls):
        train, hints = {f.name: f for f in dataclasses.fields(TrainConfig)}, typing.get_type_hints(TrainConfig)
        annotations = {}
        for name in names:
            spec = train[name]
            annotations[name] = hints[name] | None
            what = spec.metadata["help"].split("; null: ")[0]  # the stage's null is the top-level value
            setattr(cls, name, dataclasses.field(default=None, metadata={
                **spec.metadata, "help": f"{what}; null (the default): the top-level {name}"}))
        cls.__annotations__ = {**annotations, **cls.__dict__.get("__annotations__", {})}
        return dataclass(cls)

    return declare


@_stage_settings("epochs", "max_steps", "max_train_seconds", "lr", "batch_size", "warmup_steps", "eval_every", "save_every",
                 "lr_drop_step", "lr_drop_factor")
class StageSettings:
    """One stage's optimisation settings; null (the default) keeps the top-level value."""

    section = ""

    def validate(self) -> None:
        check_bounds(self, fields_with(StageSettings, "bounds"), f"{self.section}.")

    def overrides(self) -> dict:
        """The TrainConfig fields this section sets."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k in _TRAIN_FIELDS and v is not None}


@dataclass
class TeacherStage(StageSettings):
    section = "teacher"
    model: str | None = option(None, help="the teacher's initial weights, a preset or a model directory or hub id; "
                                          "null: the top-level model")


@dataclass
class _ReadsTeacherStates(StageSettings):
    """Stages (a) and (b): a fresh model (`model`, default the top-level one), or the teacher's
    weights as the start (`init_from_teacher`; then its states are in the model's own space)."""

    model: str | None = option(None, help="the stage's initial weights, a preset or a model directory or hub id; "
                                          "null: the top-level model")
    init_from_teacher: bool = option(False, help="start from the teacher's weights, so its states are in the model's "
                                                 "own space (instead of model)")

    def validate(self) -> None:
        super().validate()
        if self.init_from_teacher and self.model is not None:
            raise UserError(f"config: {self.section}.model and {self.section}.init_from_teacher both give the "
                            "initial weights; keep one")


@dataclass
class StudentStage(_ReadsTeacherStates):
    section = "student"


@dataclass
class EmulatorStage(MixtureSettings, _ReadsTeacherStates):
    section = "emulator"

    def validate(self) -> None:
        super().validate()
        self.check_mixture("emulator.")


@dataclass
class CoupleStage(StageSettings):
    section = "couple"
    freeze_emulator: bool = _freeze_emulator()


@dataclass
class KDConfig(TrainConfig):
    """The whole ICoT-KD pipeline (teacher → student → emulator → coupled) or one stage of it.

    stage: `all` runs every stage whose model is not given as a directory (teacher_dir,
    student_dir, emulator_dir); a single stage runs only that one from the directories it needs.
    """

    method: str = option("kd", help="kd: ICoT-KD, implicit CoT by knowledge distillation (Deng et al. 2023)")
    stage: str = choice("all", *STAGES, default="all",
                        help="all: every stage whose model is not given as a directory; or only that stage, from "
                             "the directories it needs")
    delta: str = _delta()
    subset: str = _subset()
    teacher_dir: str | None = _model_dir("teacher", "explicit CoT, e.g. RUN/teacher/best")
    student_dir: str | None = _model_dir("student", "stage a, e.g. RUN/student/best")
    emulator_dir: str | None = _model_dir("emulator", "stage b, e.g. RUN/emulator/best")
    teacher: TeacherStage = option(default_factory=TeacherStage, help="the teacher's settings")
    student: StudentStage = option(default_factory=StudentStage, help="the student's settings (stage a)")
    emulator: EmulatorStage = option(default_factory=EmulatorStage, help="the emulator's settings (stage b)")
    couple: CoupleStage = option(default_factory=CoupleStage, help="the coupled model's settings (stage c)")

    def validate(self) -> None:
        super().validate()
        _check_delta(self.delta)
        if self.fsdp:
            raise UserError("config: fsdp: --method kd trains a teacher, an emulator and a student that read one "
                            "another's hidden states, each loaded whole; expected fsdp false")
        if self.lora.r:
            raise UserError("config: lora: ICoT-KD does not take adapters (its coupled stage trains two LMs, the "
                            "emulator's and the student's, at once); expected lora.r 0")
        if self.gradient_checkpointing:
            raise UserError("config: gradient_checkpointing: ICoT-KD's stages train in eval mode (as its authors do), "
                            "where checkpointing does nothing; expected gradient_checkpointing false")
        for name in ("teacher_dir", "student_dir", "emulator_dir"):
            folder = getattr(self, name)
            if folder is not None and not Path(folder).is_dir():
                raise UserError(f"config: {name} {folder} is not a directory")
        needs = {"student": ["teacher_dir"], "emulator": ["teacher_dir"], "couple": ["student_dir", "emulator_dir"]}
        missing = [name for name in needs.get(self.stage, []) if getattr(self, name) is None]
        if missing:
            raise UserError(f"config: stage '{self.stage}' needs {' and '.join(missing)} (saved models of the earlier stages)")
        if self.stage == "teacher" and self.teacher_dir is not None:
            raise UserError("config: stage 'teacher' trains a teacher; teacher_dir gives one already (drop one of them)")
        self.check_sections_act()

    def check_sections_act(self) -> None:
        """Settings of a stage this run does not train (another stage chosen, or its model given) would do nothing."""
        trained = self.stages()
        for stage in STAGES:
            section = getattr(self, stage)
            default = type(section)()
            given = [f.name for f in dataclasses.fields(section) if getattr(section, f.name) != getattr(default, f.name)]
            if stage not in trained and given:
                raise UserError(f"config: {stage}.{given[0]} is set, but this run does not train the {stage} (stage "
                                f"{self.stage}; {', '.join(trained)} trained); drop the {stage} settings")
        if trained == ["couple"] and (changed(self, "delta") or changed(self, "subset")):
            raise UserError("config: delta and subset say where the teacher's states are read; the couple stage reads "
                            "none (drop them)")

    def stages(self) -> list[str]:
        """The stages this run trains, in order."""
        if self.stage != "all":
            return [self.stage]
        given = {"teacher": self.teacher_dir, "student": self.student_dir, "emulator": self.emulator_dir}
        stages = [s for s in ("student", "emulator") if given[s] is None]
        if stages and given["teacher"] is None:
            stages.insert(0, "teacher")
        return stages + ["couple"]
