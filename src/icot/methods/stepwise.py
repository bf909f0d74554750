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

Not in the paper: `removal_unit: step` counts (and smooths) whole reasoning steps instead of
tokens, so the CoT left always begins at a step boundary, never mid-number (with 16 tokens of a
4x4 CoT gone, the first token left is the 4th digit of a running sum). Measured on
multiplication, the larger jumps cost far more than the mid-number starts (docs/EXPERIMENTS.md).
Nor is `running_sum_weight`: an auxiliary regression of each digit's running column value from
the hidden states (Bai et al. 2025; methods/running_sum.py). Nor `rewind_below`: when validation
stays below a floor for `rewind_after` checks in a row, the weights, optimizer and removal count go
back to the last (or the best) check at or above it, while the data goes on (`Rewind`).
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from icot.config import choice
from icot.data.batching import remove_cot
from icot.data.steps import KINDS, check_separator, resolve_kind, setting_label, token_step_ends, unsplit_error
from icot.errors import UserError, warn
from icot.evaluate import Predictor, sequences_correct, token_scores
from icot.methods import running_sum
from icot.trainer import TrainConfig, Trainer, changed

MAX_OFFSET = 100


@dataclass
class StepwiseConfig(TrainConfig):
    method: str = "stepwise"
    remove_per_epoch: float = 8.0  # with removal_unit step, this and every count below are in steps
    removal_side: str = choice("left", "right", default="left")
    removal_smoothing_lambda: float = 4.0
    remove_all_when_remove_beyond: float = math.inf
    pretrain_epochs: float = 0  # explicit CoT first; a fraction of an epoch is allowed (a from-scratch model)
    remove_start_from: int = 0
    reset_optimizer: bool = True
    warmup_after_reset: int = 0
    removal_pace: str = choice("fixed", "adaptive", default="fixed")
    pace_accuracy: float = 0.9
    pace_min_steps: int = 50
    pace_max_steps: int | None = None
    pace_late_from: int | None = None  # from this many removed on (tokens or steps), one may take pace_late_max_steps
    pace_late_max_steps: int | None = None
    pace_late_until: int | None = None  # ... up to (not including) this many removed; None: to the end
    keep_position: bool = False
    gap_placement: str = choice("authors", "in_place", default="authors",
                                help="keep_position: the token before the removed span moves up to the last removed "
                                     "slot (the authors' code), or every kept token keeps its position (in_place)")
    max_len_train: int | None = None
    removal_unit: str = choice("token", "step", default="token",
                               help="what the schedule counts and removes: CoT tokens (the papers) or whole "
                                    "reasoning steps (`steps` says how a CoT splits; the schedule's counts are "
                                    "then in steps)")
    steps: str = choice(*KINDS, default="auto", help="removal_unit step: how a CoT splits into steps (data/steps.py)")
    step_separator: str | None = None
    running_sum_weight: float = 0.0  # not in the paper: Bai et al.'s auxiliary loss (methods/running_sum.py); 0 = off
    running_sum_layer: int = -1  # the decoder layer whose output the running-sum probe reads
    # not in the paper: after rewind_after validations in a row below rewind_below (exact match), go back to the
    # last (or best) one at or above it (weights, optimizer, removal count), or to the run's start, and go on with new
    # data; at most rewind_max times
    rewind_below: float | None = None
    rewind_after: int = 8
    rewind_max: int = 3
    rewind_to: str = choice("last", "best", "start", default="last",
                            help="rewind_below: back to the last validation at or above the floor, to the best one "
                                 "since removal began, or to the start (a new draw of the whole run; only "
                                 "validations with every CoT token removed count)")

    def validate(self) -> None:
        super().validate()
        if not self.running_sum_weight >= 0:
            raise UserError(f"config: running_sum_weight must be >= 0, got {self.running_sum_weight}")
        if self.removal_unit == "step":
            check_separator(self.steps, self.step_separator)
        elif self.steps != "auto" or self.step_separator:
            raise UserError("config: steps and step_separator are read only with removal_unit: step")
        if not self.remove_per_epoch > 0:
            raise UserError(f"config: remove_per_epoch must be positive, got {self.remove_per_epoch}")
        if self.removal_smoothing_lambda < 0:
            raise UserError(f"config: removal_smoothing_lambda must be >= 0 (inf disables smoothing), got {self.removal_smoothing_lambda}")
        if self.remove_all_when_remove_beyond < 0 or self.remove_start_from < 0 or self.pretrain_epochs < 0:
            raise UserError("config: remove_all_when_remove_beyond, remove_start_from and pretrain_epochs must not be negative")
        if self.warmup_after_reset < 0:
            raise UserError(f"config: warmup_after_reset must not be negative, got {self.warmup_after_reset}")
        if not 0 < self.pace_accuracy <= 1:
            raise UserError(f"config: pace_accuracy must be in (0, 1], got {self.pace_accuracy}")
        if self.pace_min_steps < 1 or (self.pace_max_steps is not None and self.pace_max_steps < self.pace_min_steps):
            raise UserError("config: pace_min_steps must be at least 1 and pace_max_steps (if set) at least pace_min_steps")
        if (self.pace_late_from is None) != (self.pace_late_max_steps is None):
            raise UserError("config: pace_late_from and pace_late_max_steps go together (set both or neither)")
        if self.pace_late_from is not None and self.removal_pace != "adaptive":
            raise UserError("config: pace_late_from and pace_late_max_steps need removal_pace: adaptive")
        if self.pace_late_from is not None and (self.pace_late_from < 0 or self.pace_late_max_steps < self.pace_min_steps):
            raise UserError("config: pace_late_from must not be negative and pace_late_max_steps must be at least pace_min_steps")
        if self.pace_late_until is not None and (self.pace_late_from is None or self.pace_late_until <= self.pace_late_from):
            raise UserError("config: pace_late_until needs pace_late_from and must be greater than it")
        if self.rewind_below is not None:
            if not 0 < self.rewind_below <= 1:
                raise UserError(f"config: rewind_below must be in (0, 1], got {self.rewind_below}")
            if self.rewind_after < 1 or self.rewind_max < 1:
                raise UserError("config: rewind_after and rewind_max must be at least 1")
            if self.removal_pace != "adaptive" or not self.eval_every:
                raise UserError("config: rewind_below needs removal_pace: adaptive (a fixed schedule counts steps, "
                                "so a rewound count would jump back) and eval_every (it watches validation)")
            self.require_valid_file("rewind_below")
        self.check_settings_act()

    def check_settings_act(self) -> None:
        """A setting read only beside another must not be given without it: it would do nothing."""
        needs = {"gap_placement": (self.keep_position, "keep_position: true"),
                 "pace_accuracy": (self.removal_pace == "adaptive", "removal_pace: adaptive"),
                 "pace_min_steps": (self.removal_pace == "adaptive", "removal_pace: adaptive"),
                 "pace_max_steps": (self.removal_pace == "adaptive", "removal_pace: adaptive"),
                 "remove_per_epoch": (self.removal_pace == "fixed", "removal_pace: fixed (adaptive removes by accuracy)"),
                 "warmup_after_reset": (self.reset_optimizer, "reset_optimizer: true"),
                 "rewind_after": (self.rewind_below is not None, "rewind_below"),
                 "rewind_max": (self.rewind_below is not None, "rewind_below"),
                 "rewind_to": (self.rewind_below is not None, "rewind_below"),
                 "running_sum_layer": (self.running_sum_weight > 0, "running_sum_weight above 0")}
        for name, (acts, condition) in needs.items():
            if not acts and changed(self, name):
                raise UserError(f"config: {name} {getattr(self, name)} is read only with {condition}; drop it or set that")


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
    a model needs longer to recover, and removing on while it is broken did not bring it back.
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
                   round(config.pretrain_epochs * steps_per_epoch), config.remove_start_from, config.remove_all_when_remove_beyond,
                   config.pace_late_from, config.pace_late_max_steps,
                   math.inf if config.pace_late_until is None else config.pace_late_until)

    def in_pretraining(self, step: int) -> bool:
        return step < self.pretrain_steps

    def next_count(self, step: int, count: float, steps_at_count: int, accuracy: float) -> float:
        if self.in_pretraining(step) or math.isinf(count):
            return count
        ready = steps_at_count >= self.min_steps and accuracy >= self.target_accuracy
        late = self.late_from is not None and self.late_from <= count < self.late_until
        latest = self.late_max_steps if late else self.max_steps
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


@dataclass
class Rewind:
    """Not in the paper: a way back from a removal the model does not recover from.

    Whether a from-scratch model recovers after 4x4's first running sum is decided by the run's own
    draw (docs/EXPERIMENTS.md, seed 7). So after `patience` validations in a row below `floor`,
    training goes back to the last validation at or above it (`to: last`), or to the best one since
    removal began (`to: best`), restoring weights, optimizer state and removal count, and goes on
    with the data that follows (the learning-rate drop and the end come as many steps later as were
    undone), as PaLM went back to a checkpoint before a loss spike and skipped the batches that led
    to it (Chowdhery et al. 2022). The point is a copy in CPU memory, and it travels in checkpoints.
    Measured on 4x4, seed 7, it did not rescue the run (docs/EXPERIMENTS.md, "Rewinding").

    `to: start` goes back to the run's first step (the initial weights, no optimizer state, nothing
    removed): a new draw of the whole removal, which on 4x4 succeeds about half the time, judged
    only once every CoT token is gone, where a draw that succeeds comes back (docs/EXPERIMENTS.md,
    "Restarts").
    """

    floor: float
    patience: int
    most: int
    to: str = "last"
    below: int = 0
    rewinds: int = 0
    steps_undone: int = 0  # the schedule's steps given back by rewinds: lr_drop_step comes as much later
    best: float = -math.inf  # the point's accuracy, with `to: best`
    point: dict | None = None

    def keeps(self, accuracy: float) -> bool:
        """Whether this validation becomes the point to go back to."""
        if self.to == "start" or accuracy < self.floor or (self.to == "best" and accuracy <= self.best):
            return False
        self.best = max(self.best, accuracy)
        return True

    def collapsed(self, accuracy: float) -> bool:
        """Count a validation result; True when training should go back to `point` now."""
        self.below = 0 if accuracy >= self.floor else self.below + 1
        return self.below >= self.patience and self.point is not None and self.rewinds < self.most


def _cpu_copy(state):
    return copy.deepcopy(send_to_device(state, "cpu"))  # on a CPU run the move alone would share the tensors


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
        self.schedule: RemovalSchedule | AdaptivePace | None = None
        # adaptive pace: steps at the current count, and (fully right, all) training sequences of recent steps
        self.steps_at_count = 0
        self.recent: deque[tuple[float, float]] = deque(maxlen=config.pace_min_steps)
        self.step_tokens = [0.0, 0.0]
        self.epoch_count: tuple[int, float] = (-1, self.current)
        self.begun_step: int | None = None
        self.units: StepUnits | None = None  # removal_unit step: tokens per step count, per training example
        self.values: np.ndarray | None = None  # running_sum_weight: ĉ / 10 of every training token
        self.probe_sums = torch.zeros(2, dtype=torch.float64)  # the probe's squared error, micro-batches
        self.probe_mse: float | None = None  # its mean over the last logging window
        self.rewind = None if config.rewind_below is None else Rewind(config.rewind_below, config.rewind_after,
                                                                      config.rewind_max, config.rewind_to)

    # ----- data ----------------------------------------------------------------------------

    @property
    def probed(self) -> bool:
        return self.config.running_sum_weight > 0

    def load_tokenizer_and_model(self, texts_for_vocab):
        tokenizer, model = super().load_tokenizer_and_model(texts_for_vocab)
        return tokenizer, running_sum.ProbedLM(model, self.config.running_sum_layer) if self.probed else model

    def encode_split(self, examples, name: str, keep: bool):
        # the CoTs split into steps, or the operands of the running-sum labels
        return super().encode_split(examples, name, keep or self.config.removal_unit == "step" or self.probed)

    def load_data(self) -> None:
        super().load_data()
        self.report_long_examples()
        cfg = self.config
        self.require_cot()
        if cfg.removal_unit == "step":
            examples = self.train_data.examples
            kind = resolve_kind(cfg.steps, examples, cfg.step_separator)
            ends = token_step_ends(self.tokenizer, [e.cot for e in examples], kind, cfg.step_separator)
            self.units = StepUnits.from_step_ends(ends, cfg.removal_side)
            self.check_steps_split(kind)
            self.warn_uneven_steps()
        self.check_counts_fit_the_cot()
        if self.probed:
            self.values = running_sum.value_table(self.train_data)
        self.train_data.examples = None  # only the step ends and values are needed from here on

    def check_steps_split(self, kind: str) -> None:
        """removal_unit step with steps that never split a CoT would remove every whole CoT at once."""
        cfg = self.config
        if self.units.most < 2:
            raise unsplit_error(setting_label(cfg.steps, kind, cfg.step_separator), [e.cot for e in self.train_data.examples],
                                "removal_unit step would remove every whole CoT at once (removal_unit token does not)")

    def check_counts_fit_the_cot(self) -> None:
        """Counts from the longest CoT on cannot act: a removal starting there trains without CoT from
        the first step; a full removal or a late pace from there begins once every CoT is gone."""
        cfg = self.config
        steps = cfg.removal_unit == "step"
        unit, longest = ("steps", self.units.most) if steps else ("tokens", int(self.train_data.n_cot.max()))
        if cfg.remove_start_from >= longest:
            raise UserError(f"config: remove_start_from {cfg.remove_start_from}: the longest training CoT has {longest} "
                            f"{unit}, so every CoT is gone from the first step (that is --method nocot); expected "
                            f"less than {longest}")
        for name in ("remove_all_when_remove_beyond", "pace_late_from"):
            count = getattr(cfg, name)
            if count is not None and count != math.inf and count >= longest:
                raise UserError(f"config: {name} {count}: the longest training CoT has {longest} {unit}, so every CoT "
                                f"is gone before the count reaches it; expected less than {longest}")

    def warn_past_end(self) -> None:
        """Pretraining that lasts the whole run removes no CoT token: the run is explicit-CoT training."""
        super().warn_past_end()
        pretrain = self.removal_schedule().pretrain_steps
        if pretrain >= self.total_steps and self.is_main:
            warn(f"pretrain_epochs {self.config.pretrain_epochs}: pretraining ({pretrain} steps) lasts the whole run "
                 f"({self.total_steps} steps, max_steps, epochs), so no CoT token is ever removed; expected "
                 "pretrain_epochs below epochs (--method explicit trains with the whole CoT)")

    def warn_uneven_steps(self) -> None:
        """keep_position with steps of different token lengths: each training row's position gap is
        its own steps' length, but generation knows no CoT and uses the median, so positions differ."""
        table = self.units.table
        uneven = (table != table[0]).any(axis=0)
        if self.config.keep_position and uneven.any() and self.is_main:
            k = int(uneven.argmax())  # the first step count whose token count varies
            warn(f"keep_position with removal_unit step: the first {k} steps have different token counts across "
                 f"examples ({table[:, k].min()} to {table[:, k].max()}); generation places the position gap "
                 f"by the median, so it matches training only on average (keep_position: false avoids this)")

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

    def removal_schedule(self) -> RemovalSchedule | AdaptivePace:
        if self.schedule is None:
            kind = AdaptivePace if self.config.removal_pace == "adaptive" else RemovalSchedule
            self.schedule = kind.from_config(self.config, self.steps_per_epoch)
        return self.schedule

    def batch_lengths(self, epoch: int) -> np.ndarray:
        """Row lengths after removing the count scheduled at the epoch's first step (the offsets of
        smoothing and the growth within the epoch are small beside it). The adaptive pace has no
        closed form, so its count at the epoch's start is remembered for resumed runs."""
        schedule = self.removal_schedule()
        if isinstance(schedule, RemovalSchedule):
            scheduled = schedule.scheduled(epoch * self.steps_per_epoch)
        else:
            if self.epoch_count[0] != epoch:
                self.epoch_count = (epoch, self.current)
            scheduled = self.epoch_count[1]
        data = self.train_data
        if self.units is not None:
            return data.lengths - self.units.column(scheduled)
        return data.lengths - np.minimum(data.n_cot, scheduled).astype(np.int64)

    def next_count(self, step: int) -> float:
        if isinstance(self.schedule, RemovalSchedule):
            return self.schedule.scheduled(step)
        if self.schedule.in_pretraining(step):
            return float(self.config.remove_start_from)
        if self.step_tokens[1]:  # a step trained since the last call (none at a run's or a restart's first step)
            self.recent.append(tuple(self.step_tokens))
            self.steps_at_count += 1
        accuracy = 0.0
        if len(self.recent) >= self.schedule.min_steps:  # only then is the accuracy consulted (one all-reduce)
            correct, total = self.accelerator.reduce(torch.tensor(self.recent, device=self.accelerator.device).sum(0),
                                                     reduction="sum").tolist()
            accuracy = correct / max(total, 1.0)
        count = self.schedule.next_count(step, self.current, self.steps_at_count, accuracy)
        if count != self.current:
            self.steps_at_count = 0
            self.recent.clear()
        return count

    def compute_loss(self, model, batch):
        if self.config.removal_pace == "fixed" and not self.probed:
            return super().compute_loss(model, batch)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        if self.probed:
            out, predicted = model(**inputs, use_cache=False)
        else:
            out = model(**inputs, use_cache=False)
        if self.config.removal_pace == "adaptive":
            self.step_tokens[0] += float(sequences_correct(out.logits, batch["labels"]))
            self.step_tokens[1] += len(batch["labels"])
        loss_sum, correct, count = token_scores(out.logits, batch["labels"])
        if self.probed:  # the trainer divides the sum by the token count
            mse = running_sum.probe_loss(predicted, batch["values"])
            self.probe_sums += torch.tensor([float(mse.detach()), 1.0], dtype=torch.float64)
            loss_sum = loss_sum + self.config.running_sum_weight * count * mse
        return loss_sum, correct, count

    def log_train(self, window, bar) -> None:
        if self.probed:
            sums = self.accelerator.reduce(self.probe_sums.to(self.accelerator.device), reduction="sum").cpu()
            self.probe_mse = round(float(sums[0] / sums[1].clamp(min=1)), 6)
            self.probe_sums.zero_()
        super().log_train(window, bar)

    def on_step_begin(self) -> None:
        self.removal_schedule()
        step = self.progress.step
        if step == self.begun_step:  # called again after a batch skipped by max_len_train: not a new step
            return
        self.begun_step = step
        if step == 0 and self.rewind is not None and self.rewind.to == "start":
            self.rewind.point = self.rewind_point()
        previous, self.current = self.current, self.next_count(step)
        self.step_tokens = [0.0, 0.0]
        if self.current > previous and step > 0:
            all_removed_before = self._all_processes(self.step_all_removed)
            reset = self.config.reset_optimizer and not all_removed_before
            if reset:
                self.optimizer.optimizer.state.clear()
                self.resets += 1
                self.last_reset_step = step
            self.log_event({"event": "removal", "step": step, **self.removed_state(), "optimizer_reset": reset})
        self.step_all_removed = True

    def _all_processes(self, flag: bool) -> bool:
        value = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() == self.accelerator.num_processes)

    def steps_undone(self) -> int:
        return self.rewind.steps_undone if self.rewind else 0

    def lr_factor(self, step: int) -> float:
        factor = super().lr_factor(step)
        warm = self.config.warmup_after_reset
        if warm and self.last_reset_step is not None:
            factor = min(factor, (step - self.last_reset_step + 1) / warm)
        return factor

    def training_batch(self, batch: dict) -> dict | None:
        cfg = self.config
        if self.schedule.in_pretraining(self.progress.step):
            count, offsets = cfg.remove_start_from, torch.zeros_like(batch["cot_len"])
        else:
            count = self.current
            offsets = torch.multinomial(self.offsets, len(batch["cot_len"]), replacement=True, generator=self.generator)
        if self.units is None:
            n = tokens_to_remove(count, batch["cot_len"], offsets)
        else:
            n = self.units.tokens(count, batch["index"], offsets.to(batch["cot_len"].device))
        all_removed = bool((n >= batch["cot_len"]).all())
        if not all_removed:
            self.progress.forget_best()  # the best model is chosen after full removal
        self.step_all_removed &= all_removed
        if self.probed:  # removal moves them with their tokens
            batch["values"] = running_sum.batch_values(self.values, self.train_data, batch["index"],
                                                       batch["input_ids"].shape[1]).to(batch["input_ids"].device)
        if (n > 0).any():
            batch = remove_cot(batch, n, cfg.removal_side, cfg.keep_position, self.layout.pad_id, cfg.gap_placement)
        if cfg.max_len_train and self._longest_anywhere(batch) > cfg.max_len_train:
            self.log_event({"event": "skipped_long_batch", "step": self.progress.step, "length": batch["input_ids"].shape[1]})
            return None
        return batch

    def _longest_anywhere(self, batch) -> int:
        width = torch.tensor([batch["input_ids"].shape[1]], device=self.accelerator.device)
        return int(self.accelerator.reduce(width, reduction="max").item())

    # ----- rewinding from a collapse ----------------------------------------------------------

    def validate(self) -> None:
        super().validate()
        watch = self.rewind
        if watch is None or self.removal_schedule().in_pretraining(self.progress.step):
            return
        if watch.to == "start" and not self._all_processes(self.step_all_removed):
            return  # a draw that succeeds comes back once its CoT is gone
        accuracy = self.from_main(self.last_val_accuracy)
        if watch.keeps(accuracy):
            watch.point = self.rewind_point()
        if watch.collapsed(accuracy):
            self.go_back()

    def rewind_point(self) -> dict:
        return {"step": self.progress.step, "schedule_step": self.progress.step - self.steps_undone(), **self.pace_state(),
                "model": _cpu_copy(self.unwrapped_model.state_dict()), "optimizer": _cpu_copy(self.optimizer.state_dict())}

    def go_back(self) -> None:
        """Weights, optimizer and removal count as at the point; the data, the offsets' draws and the
        step counter go on."""
        watch, point = self.rewind, self.rewind.point
        self.unwrapped_model.load_state_dict(point["model"])
        self.optimizer.load_state_dict(point["optimizer"])
        self.load_pace_state(point)
        watch.rewinds += 1
        watch.below = 0
        # the schedule goes back to the point's own step (points taken before an earlier rewind have none)
        watch.steps_undone = self.progress.step - point.get("schedule_step", point["step"])
        self.log_event({"event": "rewind", "step": self.progress.step, "to_step": point["step"], **self.removed_state(),
                        "rewinds": watch.rewinds})
        if self.is_main:
            tqdm.write(f"step {self.progress.step}: validation below {watch.floor} for {watch.patience} checks; back to "
                       f"step {point['step']}'s weights and removal count (rewind {watch.rewinds} of {watch.most})")

    # ----- state, inference, metadata ---------------------------------------------------------

    def removed_tokens(self) -> float:
        """CoT tokens the current count removes: with step units, from the median training example
        (inf once every step is gone); what validation, the position gap and the plots use."""
        if self.units is None:
            return self.current
        return math.inf if self.current >= self.units.most else float(np.median(self.units.column(self.current)))

    def removed_state(self) -> dict:
        """The count removed, in tokens (the curves of every run share that axis) and in steps."""
        state = {"removed": self.removed_tokens()}
        if self.units is not None:
            state["removed_steps"] = self.current
        return state

    def method_state(self) -> dict:
        state = {**self.removed_state(), "optimizer_resets": self.resets}
        if self.probe_mse is not None:
            state["running_sum_mse"] = self.probe_mse  # of ĉ / 10, over the last logging window
        if self.rewind is not None:
            state["rewinds"] = self.rewind.rewinds
        if self.config.removal_pace == "fixed":
            schedule = self.schedule or RemovalSchedule.from_config(self.config, getattr(self, "steps_per_epoch", 1))
            state["steps_per_token"] = schedule.steps_per_token
        else:
            state["steps_at_count"] = self.steps_at_count
        return state

    def method_state_for_checkpoint(self) -> dict:
        return {**self.method_state(), **self.pace_state(), "generator": self.generator.get_state().tolist(),
                "last_reset_step": self.last_reset_step, "epoch_count": list(self.epoch_count), "rewind": self.rewind_state()}

    def pace_state(self) -> dict:
        """The removal count, the adaptive pace's window and whether the last step had CoT left (it
        decides the optimizer reset when the count next rises): what checkpoints and rewind points keep."""
        return {**self.removed_state(), "steps_at_count": self.steps_at_count, "recent": list(self.recent),
                "step_tokens": list(self.step_tokens), "all_removed": self.step_all_removed}

    def load_pace_state(self, state: dict) -> None:
        self.current = float(state["removed_steps" if self.units is not None else "removed"])
        self.steps_at_count = state["steps_at_count"]
        self.recent.clear()
        self.recent.extend(tuple(r) for r in state["recent"])
        self.step_tokens = list(state["step_tokens"])
        self.step_all_removed = state.get("all_removed", False)  # checkpoints from before it was kept: a reset, as then

    def rewind_state(self) -> dict | None:
        if self.rewind is None:
            return None
        return {k: getattr(self.rewind, k) for k in ("below", "rewinds", "steps_undone", "best", "point")}

    def load_method_state(self, state: dict) -> None:
        self.load_pace_state(state)
        self.resets = state["optimizer_resets"]
        self.last_reset_step = state["last_reset_step"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.epoch_count = tuple(state["epoch_count"])
        if self.rewind is not None and state.get("rewind"):  # floor, patience, most and to: as configured now
            for key, value in state["rewind"].items():
                setattr(self.rewind, key, value)

    def position_gap(self) -> tuple[int, int]:
        """(size, from_token) of the position gap at inference (keep_position): the removed count, at
        most a typical CoT. It starts at the token before the removed span (the prompt's SEP, or for
        right-side removal the last CoT token kept), or with in_place at the token after it."""
        cfg = self.config
        if not cfg.keep_position:
            return 0, 0
        typical = int(np.median(self.train_data.n_cot))
        size = int(min(self.removed_tokens(), typical))
        start = typical - size if cfg.removal_side == "right" else 0
        return size, start + (cfg.gap_placement == "in_place")

    def predictor(self, model) -> Predictor:
        cfg = self.config
        size, start = self.position_gap()
        if isinstance(model, running_sum.ProbedLM):
            model = model.lm
        return Predictor(model, self.tokenizer, cot_removed=self.removed_tokens(), removal_side=cfg.removal_side,
                         keep_position=cfg.keep_position, position_gap=size, position_gap_from=start,
                         gap_placement=cfg.gap_placement)

    def save_best(self) -> None:
        if not self.probed:
            return super().save_best()
        self.unwrapped_model.save(self.tokenizer, self.best_dir, self.full_metadata())

    def metadata(self) -> dict:
        cfg = self.config
        size, start = self.position_gap()
        meta = {"cot_removed": self.removed_label(), "removal_side": cfg.removal_side,
                "keep_position": cfg.keep_position, "position_gap": size, "position_gap_from": start,
                "gap_placement": cfg.gap_placement}
        if self.rewind is not None:
            meta["rewinds"] = self.rewind.rewinds
        return meta

    def removed_label(self) -> str | int:
        """The count removed, or 'all' once it reaches the longest CoT (the schedule counts on past it)."""
        removed = self.removed_tokens()
        return "all" if removed >= int(self.train_data.n_cot.max(initial=0)) else int(removed)

    def postfix(self) -> dict:
        return {"removed": self.removed_label()}
