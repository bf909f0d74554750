"""Answer comparison for exact-match accuracy, in one of two modes (TrainConfig.answer_match,
`icot eval --answer-match`):

- `exact`: answers match when equal after whitespace normalisation alone (ends stripped,
  inner runs of whitespace made one space).
- `normalized` (the default): also, an answer that is a single number is compared as that
  number written plainly, so a `$` sign, thousands separators, a `+` sign, leading zeros and
  trailing fractional zeros do not count: `$1,000.50` = `1000.5`, `18.00` = `18`, `-$5` =
  `-5`, `-0` = `0`, `7.` = `7`. In any other answer, thousands separators are removed
  (`1,200 apples` = `1200 apples`). Space-separated digits (the multiplication answers) are
  not one number and compare as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from icot.errors import UserError

MODES = ("normalized", "exact")
_NUMBER = re.compile(r"(?P<sign>[+-]?)\$?(?P<sign_after_dollar>[+-]?)"
                     r"(?P<whole>\d{1,3}(?:,\d{3})+|\d*)(?:\.(?P<fraction>\d*))?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def plain_number(text: str) -> str | None:
    """`text` written plainly if it is one number (`-$1,000.50` -> `-1000.5`), else None."""
    match = _NUMBER.fullmatch(text)
    if match is None or not (match["whole"] or match["fraction"]):
        return None
    signs = match["sign"] + match["sign_after_dollar"]
    if len(signs) > 1:
        return None
    whole = match["whole"].replace(",", "").lstrip("0") or "0"
    fraction = (match["fraction"] or "").rstrip("0")
    digits = f"{whole}.{fraction}" if fraction else whole
    return f"-{digits}" if signs == "-" and digits != "0" else digits


@dataclass(frozen=True)
class AnswerMatcher:
    mode: str = "normalized"

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"answer matching '{self.mode}' is unknown; choose one of {', '.join(MODES)}")

    def normalize(self, answer: str) -> str:
        text = " ".join(answer.split())
        if self.mode == "exact":
            return text
        number = plain_number(text)
        return number if number is not None else _THOUSANDS.sub("", text)

    def same(self, predicted: str, reference: str) -> bool:
        return self.normalize(predicted) == self.normalize(reference)
