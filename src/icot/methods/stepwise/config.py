"""StepwiseConfig: the settings of Stepwise Internalization."""

from __future__ import annotations

import math
from dataclasses import dataclass

from icot.config import changed, choice, option
from icot.data.steps import KINDS, check_separator
from icot.errors import UserError
from icot.methods.running_sum import RunningSumConfig


@dataclass
class StepwiseConfig(RunningSumConfig):
    method: str = option("stepwise", help="stepwise: Stepwise Internalization (Deng, Choi, Shieber 2024)")
    remove_per_epoch: float = option(8.0, help="CoT tokens (with removal_unit step: steps) the schedule removes per "
                                               "epoch, with removal_pace fixed; this and every count below are in "
                                               "steps with removal_unit step (the paper's: 8)")
    removal_side: str = choice("left", "right", default="left",
                               help="remove CoT tokens from its start (the paper) or from its end")
    removal_smoothing_lambda: float = option(4.0, help="each example removes o tokens more than scheduled, "
                                                       "P(o) proportional to exp(-lambda o) (the paper's 4); inf: "
                                                       "no smoothing")
    remove_all_when_remove_beyond: float = option(math.inf, help="once the scheduled count reaches this, the whole "
                                                                 "CoT is removed; inf: never at once")
    pretrain_epochs: float = option(0, help="epochs of explicit-CoT training before removal begins (a fraction is "
                                            "allowed, e.g. for a from-scratch model)")
    remove_start_from: int = option(0, help="the scheduled count when removal begins (tokens, or steps)")
    reset_optimizer: bool = option(True, help="reset AdamW's state whenever the removal count rises (the paper)")
    warmup_after_reset: int = option(0, help="after each optimizer reset, warm the learning rate up again over this "
                                             "many optimizer steps; 0: no warm-up")
    removal_pace: str = choice("fixed", "adaptive", default="fixed",
                               help="fixed: remove_per_epoch on a schedule (the paper); adaptive: remove the next "
                                    "token once training accuracy recovers (pace_accuracy)")
    pace_accuracy: float = option(0.9, help="adaptive pace: remove the next token once this fraction of training "
                                            "sequences over the last pace_min_steps steps is predicted entirely right")
    pace_min_steps: int = option(50, help="adaptive pace: the fewest optimizer steps at one removal count (and the "
                                          "window pace_accuracy is measured over)")
    pace_max_steps: int | None = option(None, help="adaptive pace: remove the next token after this many optimizer "
                                                   "steps at one count at the latest; null: only by accuracy")
    pace_late_from: int | None = option(None, help="adaptive pace: from this many removed on (tokens or steps), one "
                                                   "count may take pace_late_max_steps; null: never")
    pace_late_max_steps: int | None = option(None, help="adaptive pace: the latest removal, in optimizer steps, from "
                                                        "pace_late_from on; set with pace_late_from")
    pace_late_until: int | None = option(None, help="adaptive pace: pace_late_max_steps holds up to (not including) "
                                                    "this many removed; null: to the end")
    keep_position: bool = option(False, help="kept tokens keep the positions they had with the whole CoT (the "
                                             "authors' option; see gap_placement); false: positions are renumbered "
                                             "0..n-1")
    gap_placement: str = choice("authors", "in_place", default="authors",
                                help="keep_position: the token before the removed span moves up to the last removed "
                                     "slot (the authors' code), or every kept token keeps its position (in_place)")
    max_len_train: int | None = option(None, help="skip training batches with a row longer than this many tokens "
                                                  "(as the authors' code); null: no limit")
    removal_unit: str = choice("token", "step", default="token",
                               help="what the schedule counts and removes: CoT tokens (the papers) or whole "
                                    "reasoning steps (`steps` says how a CoT splits; the schedule's counts are "
                                    "then in steps)")
    steps: str = choice(*KINDS, default="auto", help="removal_unit step: how a CoT splits into steps (data/steps.py)")
    step_separator: str | None = option(None, help="steps separator: the string between two steps in a CoT "
                                                   "(read only with it)")
    rewind_below: float | None = option(
        None, help="not in the paper: after rewind_after validations in a row below this exact match, go back to the "
                   "last (or best) one at or above it (weights, optimizer, removal count), or to the run's start, "
                   "and go on with new data; null: never rewind")
    rewind_after: int = option(8, help="rewind_below: validations in a row below the floor before a rewind")
    rewind_max: int = option(3, resumable=True, help="rewind_below: the most rewinds in a run")
    rewind_to: str = choice("last", "best", "start", default="last",
                            help="rewind_below: back to the last validation at or above the floor, to the best one "
                                 "since removal began, or to the start (a new draw of the whole run; only "
                                 "validations with every CoT token removed count)")

    def validate(self) -> None:
        super().validate()
        if self.removal_unit == "step":
            check_separator(self.steps, self.step_separator)
        elif self.steps != "auto" or self.step_separator:
            raise UserError("config: steps and step_separator are read only with removal_unit: step")
        if not self.remove_per_epoch > 0:
            raise UserError(f"config: remove_per_epoch must be positive, got {self.remove_per_epoch}")
        if self.removal_smoothing_lambda < 0:
            raise UserError("config: removal_smoothing_lambda must be >= 0 (inf disables smoothing), got "
                            f"{self.removal_smoothing_lambda}")
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
            if self.fsdp:
                raise UserError("config: rewind_below with fsdp: a rewind point is a whole copy of the weights kept in "
                                "checkpoints, which sharded training does not keep; expected rewind_below null")
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
                 "rewind_to": (self.rewind_below is not None, "rewind_below")}
        for name, (acts, condition) in needs.items():
            if not acts and changed(self, name):
                raise UserError(f"config: {name} {getattr(self, name)} is read only with {condition}; drop it or set that")
