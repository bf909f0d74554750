"""The shared training loop and what it needs: settings (config), run directory (rundir),
checkpoints, and the loop itself (loop: Trainer, the class a method subclasses)."""

from icot.trainer.checkpoints import CHECKPOINTS, LATEST
from icot.trainer.config import TrainConfig
from icot.trainer.loop import EvaluationInterrupted, Loss, Trainer, TrainingInterrupted, native_bf16_cpu
from icot.trainer.rundir import start_run_dir

__all__ = ["CHECKPOINTS", "LATEST", "EvaluationInterrupted", "Loss", "TrainConfig", "Trainer", "TrainingInterrupted",
           "native_bf16_cpu", "start_run_dir"]
