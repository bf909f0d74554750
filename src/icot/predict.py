"""`icot predict`: answer one question typed by a user.

Multiplication can be typed with ordinary numbers (`3719*3349`, `3719 x 3349`); any other text is
taken as a question in the data-file format (`9 1 7 3 * 9 4 3 3`, or a whole `input||cot ####
answer` line). A multiplication's answer is shown in ordinary digit order and checked, or, on
request, as the data-file line the model wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import groupby

from icot.data.format import Example, format_line, parse_line
from icot.data.mult import parse_operands, mult_example
from icot.errors import UserError
from icot.evaluate import Predictor
from icot.models import max_positions

_ORDINARY = re.compile(r"^\s*(\d+)\s*[*x×]\s*(\d+)\s*$")


def question_of(text: str) -> tuple[str, tuple[int, int] | None]:
    """(question in the model's format, operands if it is a multiplication)."""
    if not text.strip():
        raise UserError("empty input; expected a question such as '3719*3349'")
    match = _ORDINARY.match(text)
    if match:
        a, b = int(match.group(1)), int(match.group(2))
        if str(a) != match.group(1) or str(b) != match.group(2):
            raise UserError(f"'{text}': numbers must not have leading zeros")
        return mult_example(a, b).question, (a, b)
    question = parse_line(text, "input", 1).question if "||" in text else text.strip()
    try:
        return question, parse_operands(question)
    except ValueError:
        return question, None


def ordinary(reversed_digits: str) -> str:
    """`1 3 9 4 5 4 2 1` (least significant first) as `12454931`."""
    digits = "".join(reversed(reversed_digits.split()))
    return digits.lstrip("0") or "0" if digits.isdigit() else reversed_digits


def _check_vocabulary(predictor: Predictor, question: str) -> list[int]:
    tokenizer = predictor.tokenizer
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids:
        words = [w for w in question.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
        raise UserError(f"'{question}': the model's vocabulary has no {', '.join(repr(w) for w in words[:5])}; "
                        "it answers questions written like its training data")
    limit = max_positions(predictor.model)
    if limit is not None and len(ids) + 2 > limit:
        raise UserError(f"input is {len(ids)} tokens long; the model has {limit} positions")
    return ids


@dataclass(frozen=True)
class Prediction:
    """What a model wrote for one question typed by a user."""

    text: str  # the question as typed
    question: str  # in the model's (data-file) format
    operands: tuple[int, int] | None  # a multiplication's numbers
    cot: str  # as the model wrote them
    answer: str

    @property
    def ordinary_answer(self) -> str:
        """The answer; a multiplication's in ordinary digit order (`503385`, not `5 8 3 3 0 5`)."""
        return ordinary(self.answer) if self.operands else self.answer

    def line(self) -> str:
        """`907*555 = 503385  (correct)`: the question as typed (a multiplication in ordinary digits),
        the answer, whether it is right, and the CoT if the model wrote one."""
        answer = self.ordinary_answer or "(no answer)"
        if self.operands is None:
            shown = self.question if "||" in self.text else self.text.strip()
            return f"{shown} => {answer}" + (f"  (CoT: {self.cot})" if self.cot else "")
        a, b = self.operands
        shown = self.text.strip() if _ORDINARY.match(self.text) else f"{a}*{b}"
        verdict = "correct" if answer == str(a * b) else f"wrong: {a}*{b} = {a * b}"
        cot = f"; CoT: {ordinary_cot(self.cot)}" if self.cot else ""
        return f"{shown} = {answer}  ({verdict}{cot})"

    def papers_line(self) -> str:
        """The data-file line `question||cot #### answer`, digits least significant first as the papers write them."""
        return format_line(Example(self.question, self.cot, self.answer))


def ordinary_cot(cot: str) -> str:
    """A multiplication CoT with each number in ordinary digit order: `5 3 5 4 + 0 5 3 5 4` -> `4535 + 45350`."""
    parts = []
    for is_digit, words in groupby(cot.split(), key=lambda word: len(word) == 1 and word.isdigit()):
        parts += [ordinary(" ".join(words))] if is_digit else list(words)
    return " ".join(parts)


def predict(predictor: Predictor, text: str, max_new_tokens: int = 512) -> Prediction:
    question, operands = question_of(text)
    ids = _check_vocabulary(predictor, question)
    prompt = predictor.layout.prefix + ids + [predictor.layout.sep_id]
    limit = max_positions(predictor.model)
    budget = max_new_tokens if limit is None else max(1, min(max_new_tokens, limit - len(prompt)))
    (tokens,) = predictor.generate([prompt], budget)
    cot, answer = predictor.decode(tokens)
    return Prediction(text, question, operands, cot, answer)
