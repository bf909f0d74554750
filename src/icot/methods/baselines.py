"""The two baselines of both papers: explicit CoT (also the teacher) and no CoT."""

from __future__ import annotations

from dataclasses import dataclass

from icot.errors import UserError
from icot.trainer import TrainConfig, Trainer


@dataclass
class BaselineConfig(TrainConfig):
    # stop once validation exact match reaches this: an explicit model trained until it can do the
    # task with CoT, however many steps its seed needs, before internalization starts from it
    stop_at_accuracy: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.stop_at_accuracy is None:
            return
        if not 0 < self.stop_at_accuracy <= 1:
            raise UserError(f"config: stop_at_accuracy must be in (0, 1], got {self.stop_at_accuracy}")
        if not self.eval_every:
            raise UserError("config: stop_at_accuracy is checked at each validation: set eval_every")
        self.require_valid_file("stop_at_accuracy")


class BaselineTrainer(Trainer):
    def goal_reached(self) -> bool:
        """Every validation before the one that reaches stop_at_accuracy was below it, so that one is
        the best so far: the progress record says it, also to a run resumed after it."""
        target, p = self.config.stop_at_accuracy, self.progress
        if target is None:
            return False
        return self.from_main(float(p.best_step == p.step and p.best_accuracy >= target)) > 0


@dataclass
class ExplicitConfig(BaselineConfig):
    method: str = "explicit"


class ExplicitTrainer(BaselineTrainer):
    """Train on `input SEP cot SEP #### answer EOS`; the model writes its CoT, then answers."""

    config_class = ExplicitConfig

    def metadata(self) -> dict:
        return {"cot_removed": 0}


@dataclass
class NoCotConfig(BaselineConfig):
    method: str = "nocot"


class NoCotTrainer(BaselineTrainer):
    """Train on `input SEP SEP #### answer EOS`; the model answers at once."""

    config_class = NoCotConfig
    drop_cot = True

    def metadata(self) -> dict:
        return {"cot_removed": "all"}
