"""Probe settings, importable without torch (the CLI takes its defaults from here)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from icot.errors import UserError

SITES = ("sep", "input")
TARGETS = ("auto", "mult", "cot")


@dataclass
class ProbeSettings:
    targets: str = "auto"  # mult: partial-product, running-sum, answer digits; cot: the k-th CoT token
    sites: tuple[str, ...] = SITES  # sep: the SEP state; input: the input positions' states, concatenated
    max_examples: int | None = 2000  # the first examples of the data file
    held_out: float = 0.25  # fraction of examples the probes are measured on, never trained on
    seed: int = 0  # of the train/held-out split
    l2: float = 1e-2  # penalty on the probe weights (standardized features)
    max_iter: int = 30  # L-BFGS iterations (converged by then, see linear.LinearProbes)
    cot_tokens: int = 32  # CoT positions probed with targets 'cot'
    input_window: int = 16  # at most this many input positions before SEP
    max_classes: int = 50  # rarer values of a quantity share one class
    batch_size: int = 256  # prompts per forward pass

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
