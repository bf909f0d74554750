"""The two baselines of both papers: explicit CoT (also the teacher) and no CoT."""

from __future__ import annotations

from dataclasses import dataclass

from icot.config import option
from icot.errors import UserError
from icot.evaluate import Predictor, token_scores
from icot.methods.running_sum import Probed, RunningSum, RunningSumConfig
from icot.trainer import Loss, TrainConfig, Trainer


@dataclass
class BaselineConfig(TrainConfig):
    stop_at_accuracy: float | None = option(
        None, help="stop once validation exact match reaches this fraction: an explicit model trained until it can "
                   "do the task with CoT, however many steps its seed needs, before internalization starts from it; "
                   "null: train to the end")
    steps_past_goal: int = option(
        0, resumable=True,
        help="then train this many optimizer steps more (a multiple of eval_every), saving the model at the end: "
             "time for a model that has only just learned the task to settle before internalization starts from it")

    def validate(self) -> None:
        super().validate()
        if self.steps_past_goal and self.stop_at_accuracy is None:
            raise UserError("config: steps_past_goal counts from the validation that reaches stop_at_accuracy: set it")
        if self.stop_at_accuracy is None:
            return
        if not 0 < self.stop_at_accuracy <= 1:
            raise UserError(f"config: stop_at_accuracy must be in (0, 1], got {self.stop_at_accuracy}")
        if not self.eval_every:
            raise UserError("config: stop_at_accuracy is checked at each validation: set eval_every")
        self.require_valid_file("stop_at_accuracy")
        if self.steps_past_goal < 0 or self.steps_past_goal % self.eval_every:
            raise UserError(f"config: steps_past_goal must be a non-negative multiple of eval_every ({self.eval_every}), "
                            f"got {self.steps_past_goal}")


class BaselineTrainer(Trainer):
    def __init__(self, config: BaselineConfig, resume: bool = False, best_dir=None):
        super().__init__(config, resume, best_dir)
        self.goal_step: int | None = None  # the step of the validation that reached stop_at_accuracy

    def goal_reached(self) -> bool:
        cfg, p = self.config, self.progress
        if cfg.stop_at_accuracy is None:
            return False
        if self.goal_step is None and self.reaches_goal_now():
            self.goal_step = p.step
        return self.goal_step is not None and p.step >= self.goal_step + cfg.steps_past_goal

    def reaches_goal_now(self) -> bool:
        """Every validation before the one that reaches stop_at_accuracy was below it, so that one is
        the best so far."""
        p = self.progress
        return self.from_main(float(p.best_step == p.step and p.best_score[0] >= self.config.stop_at_accuracy)) > 0

    def competes_for_best(self) -> bool:
        """Past the goal, each validation's model replaces the saved one: the run's model is its last."""
        return self.goal_step is None

    def method_state(self) -> dict:
        return {} if self.goal_step is None else {"goal_step": self.goal_step}

    def load_method_state(self, state: dict) -> None:
        self.goal_step = state.get("goal_step")


@dataclass
class ExplicitConfig(BaselineConfig):
    method: str = option("explicit", help="explicit: train on the whole CoT; the model writes it, then answers")


class ExplicitTrainer(BaselineTrainer):
    """Train on `input SEP cot SEP #### answer EOS`; the model writes its CoT, then answers."""

    config_class = ExplicitConfig

    def metadata(self) -> dict:
        return {"cot_removed": 0}


@dataclass
class NoCotConfig(BaselineConfig, RunningSumConfig):
    method: str = option("nocot", help="nocot: train without the CoT; the model answers at once")


class NoCotTrainer(BaselineTrainer):
    """Train on `input SEP SEP #### answer EOS`; the model answers at once. With running_sum_weight,
    a probe's running-sum loss is added (answer-only training + probe: Bai et al.'s regime)."""

    config_class = NoCotConfig
    drop_cot = True

    def __init__(self, config: NoCotConfig, resume: bool = False, best_dir=None):
        super().__init__(config, resume, best_dir)
        self.running_sum = RunningSum(config) if config.running_sum_weight > 0 else None

    @property
    def keeps_examples(self) -> bool:
        return self.running_sum is not None  # the operands of the running sums

    def build_model(self, tokenizer, model):
        return model if self.running_sum is None else self.running_sum.wrap(model)

    def prepare_data(self) -> None:
        if self.running_sum is not None:
            self.running_sum.label(self.train_data)
            self.train_data.examples = None  # only the values are needed from here on

    def training_batch(self, batch: dict) -> dict:
        if self.running_sum is not None:
            batch["values"] = self.running_sum.batch_values(self.train_data, batch, drop_cot=True)
        return batch

    def compute_loss(self, model, batch) -> Loss:
        if self.running_sum is None:
            return super().compute_loss(model, batch)
        out, predicted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"], use_cache=False)
        return self.running_sum.loss(token_scores(out.logits, batch["labels"]), predicted, batch["values"])

    def predictor(self, model) -> Predictor:
        return super().predictor(model.lm if isinstance(model, Probed) else model)

    def metadata(self) -> dict:
        return {"cot_removed": "all"}
