"""Stepwise Internalization (ICoT-SI; Deng, Choi, Shieber 2024).

Start from explicit-CoT training and delete CoT tokens from one end of the CoT on a schedule
while training continues, until none is left. Defaults are the paper's published settings.

Schedule, in optimizer steps (S per epoch): after `pretrain_epochs`, the scheduled count
starts at `remove_start_from` and grows by one every round(S / remove_per_epoch) steps; once
it reaches `remove_all_when_remove_beyond` the whole CoT is dropped. Each example removes
`scheduled + o` tokens, o ~ P(o) ∝ exp(-λ o) on 0..99 (λ = inf: o = 0), clipped to its CoT.
Whenever the count rises, AdamW's state is reset unless the previous step already had every
CoT fully removed. While any CoT remains, the best-model record is reset, so the model kept in
RUN/best is the best one after full removal.

One difference from the paper's code, on purpose: its counter advances per micro-batch, ours
per optimizer step, so `batch_size 32` and `batch_size 16, grad_accum 2` schedule alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from icot.config import choice
from icot.data.batching import remove_cot
from icot.errors import UserError
from icot.evaluate import Predictor
from icot.train import TrainConfig, Trainer

MAX_OFFSET = 100


@dataclass
class StepwiseConfig(TrainConfig):
    method: str = "stepwise"
    remove_per_epoch: float = 8.0
    removal_side: str = choice("left", "right", default="left")
    removal_smoothing_lambda: float = 4.0
    remove_all_when_remove_beyond: float = math.inf
    pretrain_epochs: int = 0
    remove_start_from: int = 0
    reset_optimizer: bool = True
    warmup_after_reset: int = 0
    keep_position: bool = False
    max_len_train: int | None = None

    def validate(self) -> None:
        super().validate()
        if not self.remove_per_epoch > 0:
            raise UserError(f"config: remove_per_epoch must be positive, got {self.remove_per_epoch}")
        if self.removal_smoothing_lambda < 0:
            raise UserError(f"config: removal_smoothing_lambda must be >= 0 (inf disables smoothing), got {self.removal_smoothing_lambda}")
        if self.remove_all_when_remove_beyond < 0 or self.remove_start_from < 0 or self.pretrain_epochs < 0:
            raise UserError("config: remove_all_when_remove_beyond, remove_start_from and pretrain_epochs must not be negative")
        if self.warmup_after_reset < 0:
            raise UserError(f"config: warmup_after_reset must not be negative, got {self.warmup_after_reset}")


@dataclass(frozen=True)
class RemovalSchedule:
    """How many CoT tokens are scheduled for removal at each optimizer step (0-based)."""

    steps_per_token: int
    pretrain_steps: int = 0
    start_from: int = 0
    remove_all_beyond: float = math.inf

    @classmethod
    def from_config(cls, config: StepwiseConfig, steps_per_epoch: int) -> "RemovalSchedule":
        return cls(steps_per_token=max(1, int(round(steps_per_epoch / config.remove_per_epoch))),
                   pretrain_steps=config.pretrain_epochs * steps_per_epoch,
                   start_from=config.remove_start_from,
                   remove_all_beyond=config.remove_all_when_remove_beyond)

    def in_pretraining(self, step: int) -> bool:
        return step < self.pretrain_steps

    def scheduled(self, step: int) -> float:
        count = self.start_from
        if not self.in_pretraining(step):
            count += (step - self.pretrain_steps) // self.steps_per_token
        return math.inf if count >= self.remove_all_beyond else count


def offset_distribution(lam: float, size: int = MAX_OFFSET) -> torch.Tensor:
    """P(o) ∝ exp(-λ o) for o = 0..size-1; λ = inf puts all mass on 0."""
    if math.isinf(lam):
        probs = torch.zeros(size, dtype=torch.float64)
        probs[0] = 1.0
        return probs
    logits = -lam * torch.arange(size, dtype=torch.float64)
    return torch.softmax(logits, dim=0)


def tokens_to_remove(scheduled: float, cot_len: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-row count: scheduled + offset, the whole CoT once scheduled is infinite."""
    if math.isinf(scheduled):
        return cot_len.clone()
    return offsets.to(cot_len.device) + int(scheduled)


class StepwiseTrainer(Trainer):
    config_class = StepwiseConfig

    def __init__(self, config: StepwiseConfig, resume: bool = False):
        super().__init__(config, resume)
        self.offsets = offset_distribution(config.removal_smoothing_lambda)
        self.generator = torch.Generator().manual_seed(config.seed + 7919 * self.accelerator.process_index)
        self.current = float(config.remove_start_from)
        self.step_all_removed = False  # every CoT of every micro-batch of this step fully removed
        self.resets = 0
        self.last_reset_step: int | None = None
        self.schedule: RemovalSchedule | None = None

    # ----- data ----------------------------------------------------------------------------

    def load_data(self) -> None:
        super().load_data()
        self.report_long_examples()

    def report_long_examples(self) -> None:
        """Say how much data max_len_train keeps out. Batches longer than it are skipped (as in
        the paper), and a skipped batch does not advance the removal schedule, which counts
        optimizer steps: with long data (GSM8K and a small-vocabulary BPE) removal comes later."""
        limit = self.config.max_len_train
        if limit is None:
            return
        with_cot = self.train_data.lengths
        without_cot = with_cot - self.train_data.n_cot
        if (without_cot > limit).all():
            raise UserError(f"max_len_train {limit}: every training example is longer even without its CoT "
                            f"(the shortest has {int(without_cot.min())} tokens); raise max_len_train")
        longer = {"with_cot": float((with_cot > limit).mean()), "without_cot": float((without_cot > limit).mean())}
        self.log_event({"event": "longer_than_max_len_train", "max_len_train": limit, **longer})
        if longer["with_cot"] > 0 and self.is_main:
            tqdm.write(f"max_len_train {limit}: {longer['with_cot']:.1%} of training examples are longer with their "
                       f"whole CoT, {longer['without_cot']:.1%} without it; batches holding them are skipped")

    # ----- schedule ------------------------------------------------------------------------

    def on_step_begin(self) -> None:
        if self.schedule is None:
            self.schedule = RemovalSchedule.from_config(self.config, self.steps_per_epoch)
        step = self.progress.step
        previous, self.current = self.current, self.schedule.scheduled(step)
        if self.current > previous and step > 0:
            all_removed_before = self._all_processes(self.step_all_removed)
            reset = self.config.reset_optimizer and not all_removed_before
            if reset:
                self.optimizer.optimizer.state.clear()
                self.resets += 1
                self.last_reset_step = step
            self.log_event({"event": "removal", "step": step, "removed": self.current, "optimizer_reset": reset})
        self.step_all_removed = True

    def _all_processes(self, flag: bool) -> bool:
        value = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() == self.accelerator.num_processes)

    def lr_factor(self, step: int) -> float:
        factor = super().lr_factor(step)
        warm = self.config.warmup_after_reset
        if warm and self.last_reset_step is not None:
            factor = min(factor, (step - self.last_reset_step + 1) / warm)
        return factor

    def training_batch(self, batch: dict) -> dict | None:
        cfg = self.config
        pretraining = self.schedule.in_pretraining(self.progress.step)
        if pretraining:
            n = torch.full_like(batch["cot_len"], cfg.remove_start_from)
        else:
            offsets = torch.multinomial(self.offsets, len(batch["cot_len"]), replacement=True, generator=self.generator)
            n = tokens_to_remove(self.current, batch["cot_len"], offsets)
        all_removed = bool((n >= batch["cot_len"]).all())
        if not all_removed:
            self.progress.best_accuracy = -math.inf  # the best model is chosen after full removal
        self.step_all_removed &= all_removed
        if (n > 0).any():
            batch = remove_cot(batch, n, cfg.removal_side, cfg.keep_position, self.layout.pad_id)
        if cfg.max_len_train and self._longest_anywhere(batch) > cfg.max_len_train:
            self.log_event({"event": "skipped_long_batch", "step": self.progress.step, "length": batch["input_ids"].shape[1]})
            return None
        return batch

    def _longest_anywhere(self, batch) -> int:
        width = torch.tensor([batch["input_ids"].shape[1]], device=self.accelerator.device)
        return int(self.accelerator.reduce(width, reduction="max").item())

    # ----- state, inference, metadata ---------------------------------------------------------

    def method_state(self) -> dict:
        schedule = self.schedule or RemovalSchedule.from_config(self.config, getattr(self, "steps_per_epoch", 1))
        return {"removed": self.current, "steps_per_token": schedule.steps_per_token, "optimizer_resets": self.resets}

    def method_state_for_checkpoint(self) -> dict:
        return {**self.method_state(), "generator": self.generator.get_state().tolist(), "last_reset_step": self.last_reset_step}

    def load_method_state(self, state: dict) -> None:
        self.current = float(state["removed"])
        self.resets = state["optimizer_resets"]
        self.last_reset_step = state["last_reset_step"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))

    def position_gap(self) -> int:
        """Position ids skipped at inference (keep_position): the removed count, at most a typical CoT."""
        typical = int(np.median(self.train_data.n_cot))
        return int(min(self.current, typical))

    def predictor(self, model) -> Predictor:
        cfg = self.config
        return Predictor(model, self.tokenizer, cot_removed=self.current, removal_side=cfg.removal_side,
                         keep_position=cfg.keep_position, position_gap=self.position_gap() if cfg.keep_position else 0)

    def metadata(self) -> dict:
        cfg = self.config
        return {"cot_removed": "all" if math.isinf(self.current) else int(self.current), "removal_side": cfg.removal_side,
                "keep_position": cfg.keep_position, "position_gap": self.position_gap() if cfg.keep_position else 0}

    def postfix(self) -> dict:
        return {"removed": "all" if math.isinf(self.current) else int(self.current)}
