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
4x4 CoT gone, the first token left is the 4th digit of a running sum). On multiplication it does
far worse than token-by-token removal (docs/RESULTS.md).
Nor is `running_sum_weight`: an auxiliary regression of each digit's running column value from
the hidden states (Bai et al. 2025; methods/running_sum.py). Nor `rewind_below`: when validation
stays below a floor for `rewind_after` checks in a row, the weights, optimizer and removal count go
back to the last (or the best) check at or above it, while the data goes on (`Rewind`).
"""

from icot.methods.stepwise.config import StepwiseConfig
from icot.methods.stepwise.trainer import StepwiseTrainer

__all__ = ["StepwiseConfig", "StepwiseTrainer"]
