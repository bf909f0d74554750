"""Probe settings, importable without torch (the CLI takes its defaults from here)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from icot.config import choice, option
from icot.errors import UserError

SITES = ("sep", "input")
TARGETS = ("auto", "mult", "cot")


@dataclass
class ProbeSettings:
    targets: str = choice(*TARGETS, default="auto",
                          help="mult: partial-product, running-sum and answer digits; cot: the k-th CoT token; auto: "
                               "mult for multiplication data, else cot")
    sites: tuple[str, ...] = option(SITES, help="where hidden states are read: sep (the SEP state), input (the input "
                                                "positions' states, concatenated)")
    max_examples: int | None = option(2000, help="probe the first this many examples of the data file (None: all)")
    held_out: float = option(0.25, help="fraction of examples the probes are measured on, never trained on")
    seed: int = option(0, help="the seed of the train/held-out split")
    l2: float = option(1e-2, help="L2 penalty on the probe weights (standardized features)")
    max_iter: int = option(30, help="L-BFGS iterations (converged by then, see linear.LinearProbes)")
    cot_tokens: int = option(32, help="CoT positions probed with targets cot")
    input_window: int = option(16, help="at most this many input positions before SEP")
    max_classes: int = option(50, help="the most classes per quantity: rarer values share one class")
    batch_size: int = option(256, help="prompts per forward pass")

    def validate(self) -> None:
        if self.targets not in TARGETS:
            raise UserError(f"--targets {self.targets}: expected one of {', '.join(TARGETS)}")
        unknown = [s for s in self.sites if s not in SITES]
        if unknown or not self.sites:
            raise UserError(f"--at {' '.join(self.sites)}: expected one or more of {', '.join(SITES)}")
        if not 0 < self.held_out < 1:
            raise UserError(f"--held-out {self.held_out}: expected a fraction between 0 and 1")
        if not 0 <= self.l2 < math.inf:
            raise UserError(f"--l2 {self.l2}: expected a finite number, 0 or more")
        for name in ("max_iter", "cot_tokens", "input_window", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.max_examples is not None and self.max_examples < 1:
            raise UserError(f"--max-examples {self.max_examples}: must be at least 1")
        if self.max_classes < 2:
            raise UserError(f"max_classes {self.max_classes}: must be at least 2")
        if "input" not in self.sites:
            self.require_unchanged("input_window", "--at input")

    def check_targets(self, kind: str) -> None:
        """Settings of the other kind of targets than `kind` (what --targets resolved to) cannot act."""
        if kind != "cot":
            self.require_unchanged("cot_tokens", f"--targets cot (the targets here are {kind})")

    def require_unchanged(self, name: str, condition: str) -> None:
        default = next(f.default for f in dataclasses.fields(self) if f.name == name)
        if getattr(self, name) != default:
            raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} is read only with {condition}; drop it "
                            "or set that")
