"""How many CoT tokens (or reasoning steps) are removed at each optimizer step, and from which rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from icot.methods.stepwise.config import StepwiseConfig

MAX_OFFSET = 100


@dataclass(frozen=True)
class RemovalSchedule:
    """How many CoT tokens (or steps) are scheduled for removal at each optimizer step (0-based)."""

    steps_per_token: int
    pretrain_steps: int = 0
    start_from: int = 0
    remove_all_beyond: float = math.inf

    @classmethod
    def from_config(cls, config: StepwiseConfig, steps_per_epoch: int) -> "RemovalSchedule":
        return cls(steps_per_token=max(1, int(round(steps_per_epoch / config.remove_per_epoch))),
                   pretrain_steps=round(config.pretrain_epochs * steps_per_epoch),
                   start_from=config.remove_start_from,
                   remove_all_beyond=config.remove_all_when_remove_beyond)

    def in_pretraining(self, step: int) -> bool:
        return step < self.pretrain_steps

    def scheduled(self, step: int) -> float:
        count = self.start_from
        if not self.in_pretraining(step):
            count += (step - self.pretrain_steps) // self.steps_per_token
        return math.inf if count >= self.remove_all_beyond else count


@dataclass(frozen=True)
class AdaptivePace:
    """Not in the paper: remove the next token (or step) once the model has recovered from the last removal.

    The count rises when the share of training sequences predicted entirely right (teacher
    forced, a close proxy of exact match) over the last `min_steps` steps at the current count
    reaches `target_accuracy`, or after `max_steps` steps at the latest. Time goes to the CoT
    tokens that are hard to internalize instead of being spread evenly. From `late_from` tokens
    removed on, the latest is `late_max_steps`: near the end of a long CoT (4x4's last running sum)
    a model may need longer to recover, and removing more tokens while it is broken does not help it back.
    """

    target_accuracy: float
    min_steps: int
    max_steps: int | None = None
    pretrain_steps: int = 0
    start_from: int = 0
    remove_all_beyond: float = math.inf
    late_from: int | None = None
    late_max_steps: int | None = None
    late_until: float = math.inf

    @classmethod
    def from_config(cls, config: StepwiseConfig, steps_per_epoch: int) -> "AdaptivePace":
        return cls(config.pace_accuracy, config.pace_min_steps, config.pace_max_steps,
                   round(config.pretrain_epochs * steps_per_epoch), config.remove_start_from,
                   config.remove_all_when_remove_beyond,
                   config.pace_late_from, config.pace_late_max_steps,
                   math.inf if config.pace_late_until is None else config.pace_late_until)

    def in_pretraining(self, step: int) -> bool:
        return step < self.pretrain_steps

    def latest(self, count: float) -> int | None:
        """The most optimizer steps the count can last (None: no bound)."""
        late = self.late_from is not None and self.late_from <= count < self.late_until
        return self.late_max_steps if late else self.max_steps

    def latest_full_removal(self, longest: int) -> float:
        """The step by which every CoT of `longest` tokens (or steps) is removed at the latest: each count
        that comes before it lasts its latest number of steps (inf: a count without one)."""
        target = longest if math.isinf(self.remove_all_beyond) else min(longest, math.ceil(self.remove_all_beyond))
        bounds = [self.latest(count) for count in range(self.start_from, target)]
        return math.inf if None in bounds else self.pretrain_steps + sum(bounds)

    def next_count(self, step: int, count: float, steps_at_count: int, accuracy: float) -> float:
        if self.in_pretraining(step) or math.isinf(count):
            return count
        ready = steps_at_count >= self.min_steps and accuracy >= self.target_accuracy
        latest = self.latest(count)
        overdue = latest is not None and steps_at_count >= latest
        count = count + 1 if ready or overdue else count
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


@dataclass(frozen=True)
class StepUnits:
    """Removal counted in reasoning steps: `table[i, k]` is the number of CoT tokens in the first
    (left) or last (right) k steps of training example i, its whole CoT for k past its last step."""

    table: np.ndarray

    @classmethod
    def from_step_ends(cls, step_ends: list[list[int]], side: str = "left") -> "StepUnits":
        table = np.zeros((len(step_ends), max(map(len, step_ends), default=0) + 1), dtype=np.int64)
        for i, ends in enumerate(step_ends):
            prefix, n = [0, *ends], len(ends)
            table[i, : n + 1] = prefix if side == "left" else [prefix[n] - prefix[n - k] for k in range(n + 1)]
            table[i, n + 1 :] = prefix[n]
        return cls(table)

    @property
    def most(self) -> int:
        """The most steps any CoT has."""
        return self.table.shape[1] - 1

    def column(self, count: float) -> np.ndarray:
        """Tokens removed from every example by `count` steps."""
        return self.table[:, -1] if math.isinf(count) else self.table[:, min(int(count), self.most)]

    def tokens(self, count: float, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Per-row tokens for `count` + offset steps (all steps once count is infinite)."""
        steps = torch.full_like(offsets, self.most) if math.isinf(count) else (offsets + int(count)).clamp(max=self.most)
        return torch.from_numpy(self.table[rows.cpu().numpy(), steps.cpu().numpy()]).to(rows.device)
