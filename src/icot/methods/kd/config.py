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
from dataclasses import dataclass, field
from pathlib import Path

from icot.config import changed, choice
from icot.errors import UserError
from icot.methods.baselines import ExplicitConfig
from icot.methods.kd.modules import MIXTURES, SOFT, TOKEN
from icot.methods.kd.states import DYNAMIC, SUBSETS, parse_delta
from icot.trainer import TrainConfig

STAGES = ("teacher", "student", "emulator", "couple")
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _check_delta(delta: str) -> None:
    try:
        parse_delta(delta)
    except ValueError:
        raise UserError(f"config: delta must be '{DYNAMIC}' or a positive integer, got '{delta}'") from None


# ----- the stage trainers' configs ----------------------------------------------------------------

@dataclass
class TeacherConfig(ExplicitConfig):
    """ICoT-KD's teacher: an explicit-CoT run that knows where its states will be read."""

    delta: str = DYNAMIC
    subset: str = choice(*SUBSETS, default="diagonal")

    def validate(self) -> None:
        super().validate()
        _check_delta(self.delta)


@dataclass
class TeacherStatesConfig(TrainConfig):
    """Stages (a) and (b) learn from a trained explicit-CoT teacher's hidden states."""

    method: str = "kd"
    teacher_dir: str | None = None
    delta: str = DYNAMIC
    subset: str = choice(*SUBSETS, default="diagonal")

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
    """The emulator's mixture. soft: a softmax average of mixture_size components (1 for
    multiplication; temperature 0.05), as the released code. token: one component per vocabulary
    token, supervised by the teacher's CoT token at t_l with a cross-entropy term of weight
    token_loss_weight, as the paper's research code (its script's default weight is 0.01; the
    paper adds the term unweighted)."""

    mixture: str = choice(*MIXTURES, default=SOFT)
    mixture_size: int = 1
    softmax_temperature: float = 0.05
    token_loss_weight: float = 1.0

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

    method: str = "kd"
    student_dir: str | None = None
    emulator_dir: str | None = None
    freeze_emulator: bool = False

    def validate(self) -> None:
        super().validate()
        if self.student_dir is None or self.emulator_dir is None:
            raise UserError("config: student_dir and emulator_dir are required (saved stage a and b models)")


# ----- the user's config -------------------------------------------------------------------------

@dataclass
class StageSettings:
    """One stage's optimisation settings; null (the default) keeps the top-level value."""

    section = ""
    epochs: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    warmup_steps: int | None = None
    eval_every: int | None = None
    save_every: int | None = None
    lr_drop_step: int | None = None
    lr_drop_factor: float | None = None

    def validate(self) -> None:
        for name in ("epochs", "max_steps", "batch_size", "eval_every", "save_every", "lr_drop_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"config: {self.section}.{name} must be at least 1 (or null), got {value}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"config: {self.section}.lr must be positive, got {self.lr}")
        if self.lr_drop_factor is not None and not 0 < self.lr_drop_factor <= 1:
            raise UserError(f"config: {self.section}.lr_drop_factor must be in (0, 1], got {self.lr_drop_factor}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"config: {self.section}.warmup_steps must not be negative, got {self.warmup_steps}")

    def overrides(self) -> dict:
        """The TrainConfig fields this section sets."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k in _TRAIN_FIELDS and v is not None}


@dataclass
class TeacherStage(StageSettings):
    section = "teacher"
    model: str | None = None  # initial weights of the teacher (default: the top-level model)


@dataclass
class _ReadsTeacherStates(StageSettings):
    """Stages (a) and (b): a fresh model (`model`, default the top-level one), or the teacher's
    weights as the start (`init_from_teacher`; then its states are in the model's own space)."""

    model: str | None = None
    init_from_teacher: bool = False

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
    freeze_emulator: bool = False


@dataclass
class KDConfig(TrainConfig):
    """The whole ICoT-KD pipeline (teacher → student → emulator → coupled) or one stage of it.

    stage: `all` runs every stage whose model is not given as a directory (teacher_dir,
    student_dir, emulator_dir); a single stage runs only that one from the directories it needs.
    """

    method: str = "kd"
    stage: str = choice("all", *STAGES, default="all")
    delta: str = DYNAMIC
    subset: str = choice(*SUBSETS, default="diagonal")
    teacher_dir: str | None = None
    student_dir: str | None = None
    emulator_dir: str | None = None
    teacher: TeacherStage = field(default_factory=TeacherStage)
    student: StudentStage = field(default_factory=StudentStage)
    emulator: EmulatorStage = field(default_factory=EmulatorStage)
    couple: CoupleStage = field(default_factory=CoupleStage)

    def validate(self) -> None:
        super().validate()
        _check_delta(self.delta)
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
