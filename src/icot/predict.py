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

from icot.answers import AnswerMatcher
from icot.data.format import Example, format_line, parse_line
from icot.data.mult import mult_example, operand_digits, parse_operands
from icot.errors import UserError, warn
from icot.evaluate import Predictor, describe_unknown, unknown_words
from icot.models import max_positions

_ORDINARY = re.compile(r"^\s*([0-9]+)\s*[*x×]\s*([0-9]+)\s*$")  # not \d: the vocabulary has no other digits


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


def ordinary(reversed_digits: str, keep_zeros: bool = False) -> str:
    """`1 3 9 4 5 4 2 1` (least significant first) as `12454931`; leading zeros dropped unless kept."""
    digits = "".join(reversed(reversed_digits.split()))
    if not digits.isdigit():
        return reversed_digits
    return digits if keep_zeros else digits.lstrip("0") or "0"


def _check_vocabulary(predictor: Predictor, question: str) -> list[int]:
    ids = predictor.tokenizer(question, add_special_tokens=False)["input_ids"]
    words = unknown_words(predictor.tokenizer, question)
    if words:
        raise UserError(f"'{question}': {describe_unknown(words)}; it answers questions written like its training data")
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
    matcher: AnswerMatcher = AnswerMatcher()  # as `icot eval` compares answers (the model's answer_match)
    reference: str | None = None  # a multiplication's answer as the data writes it (None: as mult_example does)
    finished: bool = True  # False: cut at the token budget before its stop token

    @property
    def ordinary_answer(self) -> str:
        """The answer; a multiplication's in ordinary digit order (`503385`, not `5 8 3 3 0 5`)."""
        return ordinary(self.answer) if self.operands else self.answer

    def line(self) -> str:
        """`907*555 = 503385  (correct)`: the question as typed (a multiplication in ordinary digits),
        the answer, whether it is right (as `icot eval` would score it), and the CoT if the model
        wrote one."""
        answer = self.ordinary_answer or "(no answer)"
        if self.operands is None:
            shown = self.question if "||" in self.text else self.text.strip()
            return f"{shown} => {answer}" + (f"  (CoT: {self.cot})" if self.cot else "")
        a, b = self.operands
        shown = self.text.strip() if _ORDINARY.match(self.text) else f"{a}*{b}"
        right = self.finished and self.matcher.same(self.answer, self.reference or mult_example(a, b).answer)
        if not right:  # with its zeros: a leading zero, or a padding zero left out, is what is wrong
            answer = ordinary(self.answer, keep_zeros=True) or "(no answer)"
        cot = f"; CoT: {ordinary_cot(self.cot)}" if self.cot else ""
        return f"{shown} = {answer}  ({'correct' if right else self._mistake()}{cot})"

    def _mistake(self) -> str:
        """`wrong: 9*9 = 81`, and how the data writes the product when only the zeros differ."""
        a, b = self.operands
        text = f"wrong: {a}*{b} = {a * b}"
        written = self.reference or mult_example(a, b).answer  # zero-padded to as many digits as a and b are written with
        if not self.finished:
            return f"{text}; its answer did not end within the token budget"
        if ordinary(written) != str(a * b):
            return f"wrong against the line's reference {ordinary(written, keep_zeros=True)} (not the product {a * b})"
        if ordinary(self.answer) != str(a * b):
            return text
        return f"{text}, written with {len(written.split())} digits in the data: {ordinary(written, keep_zeros=True)}"

    def papers_line(self) -> str:
        """The data-file line `question||cot #### answer`, digits least significant first as the papers write them."""
        return format_line(Example(self.question, self.cot, self.answer))


def ordinary_cot(cot: str) -> str:
    """A multiplication CoT with each number in ordinary digit order: `5 3 5 4 + 0 5 3 5 4` -> `4535 + 45350`."""
    parts = []
    for is_digit, words in groupby(cot.split(), key=lambda word: len(word) == 1 and word.isdigit()):
        parts += [ordinary(" ".join(words))] if is_digit else list(words)
    return " ".join(parts)


def predict(predictor: Predictor, text: str, max_new_tokens: int = 512,
            matcher: AnswerMatcher = AnswerMatcher()) -> Prediction:
    question, operands = question_of(text)
    ids = _check_vocabulary(predictor, question)
    prompt = predictor.layout.prefix + ids + [predictor.layout.sep_id]
    limit = max_positions(predictor.model)
    room = None if limit is None else limit - len(prompt) - predictor.position_gap  # the gap shifts what follows
    if room is not None and room < 1:
        raise UserError(f"'{question}': with its position_gap {predictor.position_gap} (icot.json), the model's {limit} "
                        "positions leave no room to answer; expected a shorter question or a smaller gap")
    budget = max_new_tokens if room is None else min(max_new_tokens, room)
    (tokens,) = predictor.generate([prompt], budget)
    cot, answer = predictor.decode(tokens)
    reference = reference_of(text, question, operands)
    return Prediction(text, question, operands, cot, answer, matcher, reference, predictor.finished(tokens, budget))


def reference_of(text: str, question: str, operands: tuple[int, int] | None) -> str | None:
    """What `icot eval` would compare a multiplication's answer with: a whole data line's own answer
    (with a warning when it is not the product), else the product zero-padded to as many digits as
    the operands are written with (`1 0 0 * 1 0 0`: six)."""
    if operands is None:
        return None
    a, b = operands
    if "||" in text:
        reference = parse_line(text, "input", 1).answer
        if ordinary(reference) != str(a * b):
            warn(f"'{text}': its reference answer {reference!r} is not {a}*{b} = {a * b}; judged against the "
                 "reference, as icot eval scores the line")
        return reference
    width = sum(len(digits) for digits in operand_digits(question))
    return " ".join(reversed(str(a * b).zfill(width)))
