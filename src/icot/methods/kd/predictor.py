"""How ICoT-KD models run at inference, and loading them from a saved directory.

The student is trained on `input SEP #### answer EOS`: one SEP, no CoT, as in the paper's code
(its no-CoT sequences are `input EOS #### answer EOS`). Generation therefore stops at the first
SEP/EOS, after the answer, and every generated token belongs to the answer segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from icot.data.batching import collate, remove_cot
from icot.data.layout import ANSWER_MARK
from icot.data.tokenizers import load_tokenizer
from icot.errors import UserError
from icot.evaluate import Predictor
from icot.generate import greedy_generate
from icot.methods.kd.modules import load_coupled, load_student
from icot.methods.kd.states import extract_teacher_states, parse_delta
from icot.models import load_model


def answer_only(batch: dict, pad_id: int) -> dict:
    """`input SEP #### answer EOS` from a collated batch: its CoT and the SEP closing it removed."""
    span = batch["cot_len"] + 1  # the CoT tokens and the second SEP, removed as one block
    return remove_cot({**batch, "cot_len": span}, span, "left", pad_id=pad_id)


def last_column(ids: torch.Tensor) -> torch.Tensor:
    """SEP's column in left-padded prompts: the last one, for every row."""
    return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded prompts, as generation assigns them."""
    return (mask.cumsum(1) - 1).clamp(min=0)


@dataclass
class AnswerOnlyPredictor(Predictor):
    """A model trained on `input SEP #### answer EOS`: it generates `#### answer EOS`."""

    cot_removed: float = math.inf

    def _on_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def teacher_forced(self, data, indices) -> dict[str, torch.Tensor]:
        return self._on_device(answer_only(collate(data, indices, self.layout.pad_id, drop_cot=True), self.layout.pad_id))

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return greedy_generate(self.model, prompts, self.layout.sep_id, self.layout.pad_id, max_new_tokens, stops=1,
                               prompt_context=self.prompt_context)

    def decode(self, tokens: list[int]) -> tuple[str, str]:
        sep = self.layout.sep_id
        answer = tokens[: tokens.index(sep)] if sep in tokens else tokens
        text = self.tokenizer.decode(answer, skip_special_tokens=True).strip()
        if text.startswith(ANSWER_MARK):
            text = text[len(ANSWER_MARK) :].strip()
        return "", text


@dataclass
class KDPredictor(AnswerOnlyPredictor):
    """The coupled model (stage c, `model` a CoupledModel): the emulator's thoughts at SEP, then
    the student's answer."""

    def forward_context(self, batch):
        return self.model.thinking(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["first_sep"])

    def prompt_context(self, ids, mask):
        return self.model.thinking(ids, mask, left_padded_positions(mask), last_column(ids))


@dataclass
class MindReadingPredictor(AnswerOnlyPredictor):
    """The stage-(a) student (`model` a MindReadingStudent) reading the teacher's states of each
    example's gold CoT.

    It answers only during evaluation: `teacher_forced` runs the teacher on the rows that the
    following forward pass and generation (same rows, same order, as `evaluate` does) use.
    """

    teacher: torch.nn.Module = None
    delta: str = "dynamic"
    subset: str = "diagonal"
    thoughts: torch.Tensor | None = None

    def teacher_forced(self, data, indices) -> dict[str, torch.Tensor]:
        full = self._on_device(collate(data, indices, self.layout.pad_id))
        self.thoughts = extract_teacher_states(self.teacher, full, parse_delta(self.delta), self.subset)
        return answer_only(full, self.layout.pad_id)

    def _thoughts_for(self, rows: int) -> torch.Tensor:
        if self.thoughts is None or len(self.thoughts) != rows:
            raise UserError("a mind-reading student (ICoT-KD stage a) answers only with its teacher's states of a gold CoT, "
                            "i.e. in evaluation (icot eval); use the coupled model (RUN/best) for new questions")
        return self.thoughts

    def forward_context(self, batch):
        return self.model.reading(self._thoughts_for(len(batch["input_ids"])), batch["first_sep"])

    def prompt_context(self, ids, mask):
        return self.model.reading(self._thoughts_for(len(ids)), last_column(ids))

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        self._thoughts_for(len(prompts))
        return super().generate(prompts, max_new_tokens)


def load_kd_predictor(path, meta: dict, device=None, dtype=None) -> Predictor:
    """The predictor of a saved ICoT-KD model: coupled (stage c) or mind-reading student (stage a)."""
    stage = meta.get("kd_stage")
    tokenizer = load_tokenizer(str(path))
    if stage == "coupled":
        model = load_coupled(path, dtype)
        return KDPredictor(model=_ready(model, device), tokenizer=tokenizer)
    if stage == "student":
        teacher = meta.get("teacher")
        if not teacher or not Path(teacher).is_dir():
            raise UserError(f"{path}: its teacher {teacher} is gone; a mind-reading student needs it to answer")
        student = _ready(load_student(path, dtype), device)
        return MindReadingPredictor(model=student, tokenizer=tokenizer, teacher=_ready(load_model(teacher, dtype), device),
                                    delta=meta["delta"], subset=meta["subset"])
    if stage == "emulator":
        raise UserError(f"{path}: an ICoT-KD thought emulator (stage b) predicts the teacher's hidden states, not answers; "
                        "evaluate a coupled model (RUN/best) instead")
    raise UserError(f"{path}: unknown ICoT-KD stage '{stage}' in icot.json (expected coupled, student or emulator)")


def _ready(model, device):
    if device is not None:
        model = model.to(device)
    return model.eval()
