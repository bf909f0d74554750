"""Answer comparison. Answers match when equal after normalisation: surrounding and repeated
spaces always; by default also thousands separators (`1,200` = `1200`) and a trailing
`.0`/`.00` (`18.00` = `18`). `exact=True` keeps only the whitespace normalisation."""

from __future__ import annotations

import re
from dataclasses import dataclass

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_TRAILING_ZEROS = re.compile(r"^(-?\d+)\.0+$")


@dataclass(frozen=True)
class AnswerMatcher:
    exact: bool = False

    def normalize(self, answer: str) -> str:
        text = " ".join(answer.split())
        if self.exact:
            return text
        text = _THOUSANDS.sub("", text)
        return _TRAILING_ZEROS.sub(r"\1", text)

    def same(self, predicted: str, reference: str) -> bool:
        return self.normalize(predicted) == self.normalize(reference)
