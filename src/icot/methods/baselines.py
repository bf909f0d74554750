"""The two baselines of both papers: explicit CoT (also the teacher) and no CoT."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        if self.data_files()["valid"] is None:
            raise UserError("config: stop_at_accuracy watches validation accuracy: give a validation file "
                            "(valid_file, or valid.txt in the data directory)")


class BaselineTrainer(Trainer):
    def goal_reached(self) -> bool:
        """Every validation before the one that reaches stop_at_accuracy was below it, so that one is
        the best so far: the progress record says it, also to a run resumed after it."""
        target, p = self.config.stop_at_accuracy, self.progress
        if target is None:
            return False
        reached = self.is_main and p.best_step == p.step and p.best_accuracy >= target  # the main process validates
        flag = torch.tensor(float(reached), device=self.accelerator.device)
        return self.accelerator.reduce(flag, reduction="sum").item() > 0


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
