"""Accuracy and speed of a trained model on a data file.

Exact match compares the answer text after `####` (whitespace-normalised, plus the optional
normalisation of `answers.py`); token accuracy is teacher-forced next-token accuracy on the
model's own training layout (e.g. with its CoT removed); throughput counts examples per second
of generation alone.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from icot.answers import AnswerMatcher
from icot.data.batching import IGNORE, batch_indices_by_length, collate, remove_cot
from icot.data.layout import ANSWER_MARK, EncodedSet, Layout
from icot.errors import UserError, warn
from icot.generate import PositionGap, greedy_generate, split_generation


@dataclass
class Predictor:
    """A trained model as it runs at inference: the network, its tokenizer, and its layout.

    cot_removed is the number of CoT tokens the model was trained without (inf: all of them);
    it defines the teacher-forced layout for token accuracy. Methods that act on hidden
    states (ICoT-KD) subclass this and override `prompt_context` and `forward_context`.
    """

    model: torch.nn.Module
    tokenizer: object
    cot_removed: float = 0
    removal_side: str = "left"
    keep_position: bool = False
    position_gap: int = 0
    position_gap_from: int = 0
    gap_placement: str = "authors"
    layout: Layout = field(init=False)

    def __post_init__(self):
        self.layout = Layout.for_tokenizer(self.tokenizer)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def teacher_forced(self, data: EncodedSet, indices) -> dict[str, torch.Tensor]:
        drop_all = math.isinf(self.cot_removed)
        batch = collate(data, indices, self.layout.pad_id, drop_cot=drop_all and not self.keep_position)
        if self.cot_removed > 0 and batch["cot_len"].any():  # keep_position: the positions as in training
            n = batch["cot_len"] if drop_all else torch.full_like(batch["cot_len"], int(self.cot_removed))
            batch = remove_cot(batch, n, self.removal_side, self.keep_position, self.layout.pad_id, self.gap_placement)
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward_context(self, batch):
        """Context for a teacher-forced forward pass (None: plain forward)."""
        return None

    def prompt_context(self, ids, mask):
        """Context for the prompt's forward pass during generation (None: plain forward)."""
        return None

    def gap(self) -> PositionGap:
        if not self.keep_position:
            return PositionGap()
        return PositionGap(self.position_gap, self.position_gap_from)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return greedy_generate(self.model, prompts, self.layout.sep_id, self.layout.pad_id, max_new_tokens,
                               gap=self.gap(), prompt_context=self.prompt_context)

    def finished(self, tokens: list[int], max_new_tokens: int) -> bool:
        """Whether a generation ended by its stop token, not cut at the token budget (an answer cut
        short may look right: a model that writes zeros forever 'answers' 0*0)."""
        return len(tokens) < max_new_tokens or tokens[-1:] == [self.layout.sep_id]

    def decode(self, tokens: list[int]) -> tuple[str, str]:
        """(cot text, answer text) of one generation."""
        cot, answer, _ = split_generation(tokens, self.layout.sep_id)
        cot_text = self.tokenizer.decode(cot, skip_special_tokens=True).strip()
        answer_text = self.tokenizer.decode(answer, skip_special_tokens=True).strip()
        if answer_text.startswith(ANSWER_MARK):
            answer_text = answer_text[len(ANSWER_MARK) :].strip()
        return cot_text, answer_text


def load_plain_predictor(path, meta: dict, device=None, dtype=None) -> Predictor:
    """A saved causal LM directory (or hub id) and its icot.json metadata, ready for inference."""
    from icot.data.tokenizers import load_tokenizer
    from icot.models import load_model

    model = load_model(str(path), dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    side = meta.get("removal_side", "left")
    before_0_2 = _before_0_2(meta)
    if before_0_2 and side == "right":
        warn(f"{path} was trained by icot before 0.2 with keep_position and right-side removal, whose "
             "positions at inference this version cannot reproduce; retrain it")
    removed, gap = meta.get("cot_removed", 0), saved_gap(meta)
    return Predictor(model, load_tokenizer(str(path)), cot_removed=math.inf if removed == "all" else float(removed),
                     removal_side=side, keep_position=meta.get("keep_position", False),
                     position_gap=meta.get("position_gap", 0), position_gap_from=gap.from_token,
                     gap_placement="in_place" if before_0_2 else meta.get("gap_placement", "authors"))


def _before_0_2(meta: dict) -> bool:
    """A model saved with kept positions by icot before 0.2: its gap was in place, after the SEP."""
    return bool(meta.get("keep_position")) and "position_gap_from" not in meta


def saved_gap(meta: dict) -> PositionGap:
    """The position gap a saved model answers with, from its icot.json (none without keep_position)."""
    if not meta.get("keep_position"):
        return PositionGap()
    return PositionGap(meta.get("position_gap", 0), 1 if _before_0_2(meta) else meta.get("position_gap_from", 0))


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of `text` that the tokenizer maps to its unknown token (a word-level vocabulary's gaps)."""
    unk = tokenizer.unk_token_id
    if unk is None or unk not in tokenizer(text, add_special_tokens=False)["input_ids"]:
        return []
    return [w for w in text.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]


def describe_unknown(words: list[str]) -> str:
    """`the model's vocabulary has no '٣'` and, for digits other than 0-9, what to write instead."""
    foreign = any(c.isdigit() and not c.isascii() for word in words for c in word)
    return (f"the model's vocabulary has no {', '.join(repr(w) for w in words[:5])}"
            + ("; write digits as ASCII 0-9" if foreign else ""))


def check_known_tokens(tokenizer, data: EncodedSet, where: str, numbered_lines: bool) -> None:
    """Questions or reference answers with tokens the model cannot read or write (its tokenizer's
    unknown token) score wrong whatever it answers: a warning naming the first one, or an error
    when every example has some."""
    unk = tokenizer.unk_token_id
    if unk is None or len(data) == 0:
        return
    at = np.flatnonzero(data.tokens == unk)
    row_of = np.searchsorted(data.offsets, at, side="right") - 1
    inside = at - data.offsets[row_of]
    after_cot = data.n_prompt[row_of] + data.n_cot[row_of]
    for part, rows in (("question", row_of[inside < data.n_prompt[row_of]]), ("answer", row_of[inside >= after_cot])):
        _check_part(tokenizer, data, np.unique(rows), part, where, numbered_lines)


def _check_part(tokenizer, data: EncodedSet, rows: np.ndarray, part: str, where: str, numbered_lines: bool) -> None:
    """`rows`: the examples whose `part` (question or answer) holds unknown tokens."""
    if len(rows) == 0:
        return
    first = int(rows[0])
    place = f"{where}:{first + 1}" if numbered_lines else f"{where}, example {first + 1}"
    text = data.examples[first].question if part == "question" else data.examples[first].answer
    problem = f"{place}: {describe_unknown(unknown_words(tokenizer, text))}"
    if len(rows) == len(data):
        raise UserError(f"{problem}, and no {part} can be read whole; expected {part}s written like the model's "
                        "training data")
    warn(f"{problem}; {len(rows)} of {len(data)} {part}s have words it cannot {'read' if part == 'question' else 'write'} "
         "and will score wrong")


def token_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss, correct tokens, target tokens) of next-token prediction.

    Only the positions with a target are scored, as rows of a (targets, vocabulary) matrix: the
    softmax runs along contiguous memory and skips the prompt and padding (3-5x faster than
    cross-entropy over the (batch, vocabulary, length) view on a CPU with a 4k vocabulary).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE
    scored, wanted = logits[:, :-1][mask].float(), targets[mask]
    loss = torch.nn.functional.cross_entropy(scored, wanted, reduction="sum")
    correct = (scored.argmax(-1) == wanted).sum()
    return loss, correct, mask.sum()


def sequences_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many rows have every target token predicted right (teacher forcing)."""
    targets = labels[:, 1:]
    right = (logits[:, :-1].argmax(-1) == targets) | (targets == IGNORE)
    return right.all(dim=1).sum()


@dataclass
class EvalResult:
    accuracy: float
    token_accuracy: float
    loss: float
    examples_per_s: float
    mean_generated_tokens: float
    examples: int
    generation_seconds: float
    predictions: list[dict]

    def metrics(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "predictions"}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(predictor: Predictor, data: EncodedSet, batch_size: int = 64, max_new_tokens: int | None = None,
             matcher: AnswerMatcher | None = None, progress: bool = True, desc: str = "eval") -> EvalResult:
    """Greedy-decode every example in batches of similar length; score answers and tokens."""
    matcher = matcher or AnswerMatcher()
    model = predictor.model
    was_training = model.training
    model.eval()
    if max_new_tokens is None:
        max_new_tokens = int((data.lengths - data.n_prompt).max()) + 8
    loss_sum = correct_tokens = target_tokens = 0.0
    outputs: list[list[int] | None] = [None] * len(data)
    seconds = 0.0
    batches = batch_indices_by_length(data.n_prompt + data.n_cot, batch_size)
    for indices in tqdm(batches, desc=desc, leave=False, disable=not progress):
        batch = predictor.teacher_forced(data, indices)
        context = predictor.forward_context(batch)
        with context if context is not None else nullcontext():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits
        loss, correct, count = token_scores(logits, batch["labels"])
        loss_sum += loss.item()
        correct_tokens += correct.item()
        target_tokens += count.item()
        prompts = [data.prompt(i) for i in indices]
        _sync(predictor.device)
        start = time.perf_counter()
        generated = predictor.generate(prompts, max_new_tokens)
        _sync(predictor.device)
        seconds += time.perf_counter() - start
        for i, tokens in zip(indices, generated):
            outputs[i] = tokens
    model.train(was_training)
    predictions, right = [], 0
    for i, tokens in enumerate(outputs):
        cot, answer = predictor.decode(tokens)
        reference = data.examples[i].answer if data.examples else ""
        ok = predictor.finished(tokens, max_new_tokens) and matcher.same(answer, reference)
        right += ok
        predictions.append({"question": data.examples[i].question if data.examples else "", "reference": reference,
                            "cot": cot, "answer": answer, "correct": ok, "generated_tokens": len(tokens)})
    n = len(data)
    return EvalResult(
        accuracy=right / n,
        token_accuracy=correct_tokens / max(target_tokens, 1),
        loss=loss_sum / max(target_tokens, 1),
        examples_per_s=n / seconds if seconds > 0 else float("nan"),
        mean_generated_tokens=float(np.mean([len(t) for t in outputs])),
        examples=n,
        generation_seconds=seconds,
        predictions=predictions,
    )
