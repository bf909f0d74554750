"""`icot predict`: answer one question typed by a user.

Multiplication can be typed with ordinary numbers (`3719*3349`, `3719 x 3349`); the answer is
then shown in ordinary digit order too, and checked. Any other text is taken as a question in
the data-file format (`9 1 7 3 * 9 4 3 3`, or a whole `input||cot #### answer` line).
"""

from __future__ import annotations

import re

from icot.data.format import parse_line
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


def predict(predictor: Predictor, text: str, max_new_tokens: int = 512) -> str:
    question, operands = question_of(text)
    ids = _check_vocabulary(predictor, question)
    prompt = predictor.layout.prefix + ids + [predictor.layout.sep_id]
    limit = max_positions(predictor.model)
    budget = max_new_tokens if limit is None else max(1, min(max_new_tokens, limit - len(prompt)))
    (tokens,) = predictor.generate([prompt], budget)
    cot, answer = predictor.decode(tokens)
    lines = [f"question: {question}"]
    if cot:
        lines.append(f"cot: {cot}")
    if operands is None:
        lines.append(f"answer: {answer}")
        return "\n".join(lines)
    a, b = operands
    shown = ordinary(answer)
    verdict = "correct" if shown == str(a * b) else f"wrong, {a}*{b} = {a * b}"
    lines.append(f"answer: {shown}  ({verdict}; model wrote '{answer}')")
    return "\n".join(lines)
