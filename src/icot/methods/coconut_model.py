"""Answering with a saved Coconut model: its predictor and loader (the registry's loader for
`coconut`). The trainer (coconut.py) imports the training loop; answering needs only this."""

from __future__ import annotations

import math
from dataclasses import dataclass

from icot.data.layout import EncodedSet
from icot.data.steps import token_step_ends
from icot.data.tokenizers import load_tokenizer
from icot.errors import UserError
from icot.methods.thoughts import ThoughtLM, ThoughtPredictor, ThoughtTokens, check_thought_tokens
from icot.models import load_model


def removed_and_thoughts(stage: int, step_ends: list[int], c_thought: int, max_latent_stage: int) -> tuple[int, int]:
    """(CoT tokens replaced, thoughts) of one row at `stage` (dataset.py, get_cot_latent_dataset)."""
    cot_tokens = step_ends[-1] if step_ends else 0
    if stage > max_latent_stage:
        return cot_tokens, max_latent_stage * c_thought
    replaced = step_ends[min(stage, len(step_ends)) - 1] if stage > 0 and step_ends else 0
    return replaced, stage * c_thought


@dataclass
class CoconutPredictor(ThoughtPredictor):
    """A Coconut model at `stage`: teacher forcing replaces the gold CoT's first steps, split as in
    training."""

    stage: int = 0
    c_thought: int = 1
    max_latent_stage: int = 1
    steps: str = "auto"
    step_separator: str | None = None

    @property
    def n_thoughts(self) -> int:
        return min(self.stage, self.max_latent_stage) * self.c_thought

    def plan(self, data: EncodedSet, indices) -> tuple[list[int], list[int]]:
        if self.stage > self.max_latent_stage:  # every step replaced: no split needed
            ends = [[int(data.n_cot[i])] for i in indices]
        else:
            ends = token_step_ends(self.tokenizer, [data.examples[i].cot for i in indices], self.steps, self.step_separator)
        plan = [removed_and_thoughts(self.stage, row_ends, self.c_thought, self.max_latent_stage) for row_ends in ends]
        return [r for r, _ in plan], [n for _, n in plan]


def load_coconut_predictor(path, meta: dict, device=None, dtype=None) -> CoconutPredictor:
    """A saved Coconut model: a plain Hugging Face directory, its stage and token ids in icot.json."""
    tokenizer = load_tokenizer(str(path))
    try:
        marks = ThoughtTokens(**meta["thought_tokens"])
        settings = {k: meta[k] for k in ("coconut_stage", "c_thought", "max_latent_stage", "steps")}
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}/icot.json: not a complete Coconut record (missing {e})") from None
    check_thought_tokens(tokenizer, marks, path)
    lm = load_model(str(path), dtype=dtype)
    if device is not None:
        lm = lm.to(device)
    lm.eval()
    return CoconutPredictor(ThoughtLM(lm, marks.latent), tokenizer, cot_removed=math.inf, stage=settings["coconut_stage"],
                            c_thought=settings["c_thought"], max_latent_stage=settings["max_latent_stage"], marks=marks,
                            steps=settings["steps"], step_separator=meta.get("step_separator"))
