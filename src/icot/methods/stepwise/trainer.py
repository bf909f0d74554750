"""StepwiseTrainer: the loop's hooks for Stepwise Internalization (the method: the package docstring)."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from tqdm.auto import tqdm

from icot.data.batching import remove_cot
from icot.data.steps import resolve_kind, setting_label, token_step_ends, unsplit_error
from icot.errors import UserError, warn
from icot.evaluate import Predictor, sequences_correct, token_scores
from icot.methods import running_sum
from icot.methods.stepwise.config import StepwiseConfig
from icot.methods.stepwise.rewind import Rewind, cpu_copy
from icot.methods.stepwise.schedule import AdaptivePace, RemovalSchedule, StepUnits, offset_distribution, tokens_to_remove
from icot.trainer import Loss, Trainer


class StepwiseTrainer(Trainer):
    config_class = StepwiseConfig

    def __init__(self, config: StepwiseConfig, resume: bool = False):
        super().__init__(config, resume)
        self.offsets = offset_distribution(config.removal_smoothing_lambda)
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
        self.running_sum = running_sum.RunningSum(config) if config.running_sum_weight > 0 else None
        self.rewind = None if config.rewind_below is None else Rewind(config.rewind_below, config.rewind_after,
                                                                      config.rewind_max, config.rewind_to)

    # ----- data ----------------------------------------------------------------------------

    @property
    def probed(self) -> bool:
        return self.running_sum is not None

    @property
    def keeps_examples(self) -> bool:
        return self.config.removal_unit == "step" or self.probed  # the CoTs split into steps, or the operands of the running sums

    def build_model(self, tokenizer, model):
        return self.running_sum.wrap(model) if self.probed else model

    def prepare_data(self) -> None:
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
            self.running_sum.label(self.train_data)
        self.train_data.examples = None  # only the step ends and values are needed from here on

    def check_steps_split(self, kind: str) -> None:
        """removal_unit step with steps that never split a CoT would remove every whole CoT at once."""
        cfg = self.config
        if self.units.most < 2:
            raise unsplit_error(setting_label(cfg.steps, kind, cfg.step_separator), [e.cot for e in self.train_data.examples],
                                "removal_unit step would remove every whole CoT at once (removal_unit token does not)")

    def longest_cot(self) -> tuple[str, int]:
        """The unit removal counts in ("steps" or "tokens") and the longest training CoT in it."""
        if self.units is not None:
            return "steps", self.units.most
        return "tokens", int(self.train_data.n_cot.max())

    def check_counts_fit_the_cot(self) -> None:
        """Counts from the longest CoT on cannot act: a removal starting there trains without CoT from
        the first step; a full removal or a late pace from there begins once every CoT is gone."""
        cfg = self.config
        unit, longest = self.longest_cot()
        if cfg.remove_start_from >= longest:
            raise UserError(f"config: remove_start_from {cfg.remove_start_from}: the longest training CoT has {longest} "
                            f"{unit}, so every CoT is gone from the first step (that is --method nocot); expected "
                            f"less than {longest}")
        for name in ("remove_all_when_remove_beyond", "pace_late_from"):
            count = getattr(cfg, name)
            if count is not None and count != math.inf and count >= longest:
                raise UserError(f"config: {name} {count}: the longest training CoT has {longest} {unit}, so every CoT "
                                f"is gone before the count reaches it; expected less than {longest}")

    def check_run_length(self) -> None:
        """Pretraining that lasts the whole run removes no CoT token: the run is explicit-CoT training."""
        super().check_run_length()
        pretrain = self.removal_schedule().pretrain_steps
        if pretrain >= self.total_steps and self.is_main:
            warn(f"pretrain_epochs {self.config.pretrain_epochs}: pretraining ({pretrain} steps) lasts the whole run "
                 f"({self.total_steps} steps, max_steps, epochs), so no CoT token is ever removed; expected "
                 "pretrain_epochs below epochs (--method explicit trains with the whole CoT)")
        elif isinstance(self.schedule, RemovalSchedule) and self.is_main:
            self.warn_partial_removal()
        elif self.is_main:
            self.warn_slow_pace()

    def warn_partial_removal(self) -> None:
        """A fixed schedule that ends with CoT left saves a model still trained with part of its CoT."""
        schedule, cfg = self.schedule, self.config
        unit, longest = self.longest_cot()
        last = schedule.scheduled(self.total_steps - 1)
        if last >= longest:
            return
        beyond = schedule.remove_all_beyond
        target = longest if math.isinf(beyond) else min(longest, math.ceil(beyond))
        needed = schedule.pretrain_steps + (target - schedule.start_from) * schedule.steps_per_token + 1
        warn(f"remove_per_epoch {cfg.remove_per_epoch}: the fixed schedule removes {last} of the longest CoT's {longest} "
             f"{unit} by the run's last step ({self.total_steps}), so best/ will hold a model still trained with CoT "
             f"left; full removal needs max_steps {needed} (or a higher remove_per_epoch)")

    def warn_slow_pace(self) -> None:
        """An adaptive pace whose latest removals (pace_max_steps) end after the run may leave CoT; it
        usually goes faster, and the end record says what happened."""
        unit, longest = self.longest_cot()
        latest = self.schedule.latest_full_removal(longest)
        if self.total_steps <= latest < math.inf:  # the count reached at step `latest` trains from that step on
            warn(f"pace_max_steps {self.config.pace_max_steps}: the adaptive pace may take until step {latest} to remove "
                 f"the longest CoT's {longest} {unit}, and the run ends at step {self.total_steps}; if it does, best/ "
                 f"will hold a model still trained with CoT left (expected max_steps above {latest}, or a lower "
                 "pace_max_steps)")

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

    def compute_loss(self, model, batch) -> Loss:
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
        scores = token_scores(out.logits, batch["labels"])
        return self.running_sum.loss(scores, predicted, batch["values"]) if self.probed else Loss(*scores)

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
            all_removed_before = self.all_processes(self.step_all_removed)
            reset = self.config.reset_optimizer and not all_removed_before
            if reset:
                self.reset_optimizer_state()
                self.resets += 1
                self.last_reset_step = step
            self.log_event({"event": "removal", "step": step, **self.removed_state(), "optimizer_reset": reset})
        self.step_all_removed = True

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
            offsets = torch.multinomial(self.offsets, len(batch["cot_len"]), replacement=True, generator=self.rng)
        if self.units is None:
            n = tokens_to_remove(count, batch["cot_len"], offsets)
        else:
            n = self.units.tokens(count, batch["index"], offsets.to(batch["cot_len"].device))
        self.step_all_removed &= bool((n >= batch["cot_len"]).all())
        if self.probed:  # removal moves them with their tokens
            batch["values"] = self.running_sum.batch_values(self.train_data, batch)
        if (n > 0).any():
            batch = remove_cot(batch, n, cfg.removal_side, cfg.keep_position, self.layout.pad_id, cfg.gap_placement)
        if cfg.max_len_train and self.max_over_processes(batch["input_ids"].shape[1]) > cfg.max_len_train:
            self.log_event({"event": "skipped_long_batch", "step": self.progress.step, "length": batch["input_ids"].shape[1]})
            return None
        return batch

    def in_final_form(self) -> bool:
        """The count removes every CoT, the longest included: the model answers without CoT."""
        return self.current >= self.longest_cot()[1]

    # ----- rewinding from a collapse ----------------------------------------------------------

    def after_validation(self, accuracy: float) -> None:
        watch = self.rewind
        if watch is None or self.removal_schedule().in_pretraining(self.progress.step):
            return
        if watch.to == "start" and not self.all_processes(self.step_all_removed):
            return  # a draw that succeeds comes back once its CoT is gone
        if watch.keeps(accuracy):
            watch.point = self.rewind_point()
        if watch.collapsed(accuracy):
            self.go_back()

    def rewind_point(self) -> dict:
        return {"step": self.progress.step, "schedule_step": self.progress.step - self.steps_undone(), **self.pace_state(),
                "model": cpu_copy(self.unwrapped_model.state_dict()), "optimizer": cpu_copy(self.optimizer.state_dict())}

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
        if self.rewind is not None:
            state["rewinds"] = self.rewind.rewinds
        if self.config.removal_pace == "fixed":
            schedule = self.schedule or RemovalSchedule.from_config(self.config, self.steps_per_epoch or 1)
            state["steps_per_token"] = schedule.steps_per_token
        else:
            state["steps_at_count"] = self.steps_at_count
        return state

    def method_state_for_checkpoint(self) -> dict:
        return {**self.method_state(), **self.pace_state(), "last_reset_step": self.last_reset_step,
                "epoch_count": list(self.epoch_count), "rewind": self.rewind_state()}

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
        if isinstance(model, running_sum.Probed):
            model = model.lm
        return Predictor(model, self.tokenizer, cot_removed=self.removed_tokens(), removal_side=cfg.removal_side,
                         keep_position=cfg.keep_position, position_gap=size, position_gap_from=start,
                         gap_placement=cfg.gap_placement)

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
