"""Multi-digit multiplication in the papers' format.

Numbers are written least-significant digit first with single spaces between digits.
For a (n digits) times b (m digits), with b_i the i-th digit of b from the right:
partial i = a*b_i*10^i padded to n+1+i digits; the CoT is partial 0, then for i >= 1
`+ partial_i` followed (except after the last) by the running sum `( ... )` padded to
n+1+i digits; the answer is a*b padded to n+m digits.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import numpy as np

from icot.data.format import Example
from icot.errors import UserError


def _digits(value: int, width: int) -> str:
    """`value` zero-padded to `width` digits, least significant first, space separated."""
    return " ".join(reversed(str(value).zfill(width)))


def mult_example(a: int, b: int) -> Example:
    n, m = len(str(a)), len(str(b))
    steps = []
    running = 0
    for i, digit in enumerate(reversed(str(b))):
        partial = a * int(digit) * 10**i
        running += partial
        width = n + 1 + i
        if i == 0:
            steps.append(_digits(partial, width))
            continue
        steps.append(f"+ {_digits(partial, width)}")
        if i < m - 1:
            steps.append(f"( {_digits(running, width)} )")
    question = f"{_digits(a, n)} * {_digits(b, m)}"
    return Example(question, " ".join(steps), _digits(a * b, n + m))


def _column_values(a_digits: np.ndarray, b_digits: np.ndarray, rows: range, width: int) -> np.ndarray:
    """ĉ_k of a * (sum of b_j 10^j over `rows`) for k < width, for each row of digit arrays (least
    significant first): the digit products of column k plus the carry from column k-1 (ĉ_{k-1} // 10);
    ĉ_k mod 10 is the number's digit k."""
    n = a_digits.shape[1]
    products = np.zeros((len(a_digits), width), dtype=np.int64)
    for j in rows:
        end = min(width, j + n)
        products[:, j:end] += a_digits[:, : end - j] * b_digits[:, j : j + 1]
    values, carry = np.empty_like(products), 0
    for k in range(width):
        values[:, k] = products[:, k] + carry
        carry = values[:, k] // 10
    return values.astype(np.float32)


def running_values(a_digits, b_digits) -> tuple[np.ndarray, np.ndarray]:
    """The running column value ĉ behind every word of mult_example(a, b)'s CoT and answer, NaN for
    `+`, `(` and `)`: for a digit of partial i, of the running sum after partial i, or of the answer,
    ĉ of its column in that product. The quantity Bai et al. (2025) find a model must hold to
    multiply without CoT, and regress from its hidden states as an auxiliary loss.

    a_digits, b_digits: the operands' digits, least significant first, one row per pair (or one pair);
    returns (CoT values, answer values), one row per pair."""
    a_digits, b_digits = np.atleast_2d(a_digits).astype(np.int64), np.atleast_2d(b_digits).astype(np.int64)
    n, m = a_digits.shape[1], b_digits.shape[1]
    gap = np.full((len(a_digits), 1), np.nan, dtype=np.float32)
    cot = []
    for i in range(m):
        width = n + 1 + i
        if i > 0:
            cot.append(gap)
        cot.append(_column_values(a_digits, b_digits, range(i, i + 1), width))
        if 0 < i < m - 1:
            cot += [gap, _column_values(a_digits, b_digits, range(i + 1), width), gap]
    return np.concatenate(cot, axis=1), _column_values(a_digits, b_digits, range(m), n + m)


def operand_digits(question: str) -> tuple[list[int], list[int]]:
    """The digits of a question like `9 1 7 3 * 9 4 3 3`, as written (least significant first);
    ValueError if it is not one."""
    parts = question.split(" * ")
    if len(parts) != 2:
        raise ValueError("expected 'DIGITS * DIGITS'")
    numbers = []
    for part in parts:
        digits = part.split(" ")
        if not digits or not all(len(d) == 1 and d.isdigit() for d in digits):
            raise ValueError("operands must be single digits separated by spaces")
        numbers.append([int(d) for d in digits])
    return numbers[0], numbers[1]


def parse_operands(question: str) -> tuple[int, int]:
    """(a, b) from a question like `9 1 7 3 * 9 4 3 3`; ValueError if it is not one."""
    a_digits, b_digits = operand_digits(question)
    return int("".join(map(str, reversed(a_digits)))), int("".join(map(str, reversed(b_digits))))


def parse_number(text: str) -> int:
    """An ordinary decimal number such as `3719`; ValueError otherwise."""
    text = text.strip()
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"'{text}' is not a non-negative whole number")
    return int(text)


@dataclass(frozen=True)
class MultTask:
    a_digits: int
    b_digits: int

    @classmethod
    def parse(cls, spec: str) -> "MultTask":
        parts = spec.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise UserError(f"--digits {spec!r}: expected AxB with whole numbers A, B >= 1, e.g. 4x4 or 3x5")
        return cls(int(parts[0]), int(parts[1]))

    @property
    def a_range(self) -> tuple[int, int]:
        return (1 if self.a_digits == 1 else 10 ** (self.a_digits - 1)), 10**self.a_digits

    @property
    def b_range(self) -> tuple[int, int]:
        return (1 if self.b_digits == 1 else 10 ** (self.b_digits - 1)), 10**self.b_digits

    @property
    def num_pairs(self) -> int:
        (a_lo, a_hi), (b_lo, b_hi) = self.a_range, self.b_range
        return (a_hi - a_lo) * (b_hi - b_lo)

    def contains(self, a: int, b: int) -> bool:
        (a_lo, a_hi), (b_lo, b_hi) = self.a_range, self.b_range
        return a_lo <= a < a_hi and b_lo <= b < b_hi

    def pair(self, index: int) -> tuple[int, int]:
        (a_lo, _), (b_lo, b_hi) = self.a_range, self.b_range
        return a_lo + index // (b_hi - b_lo), b_lo + index % (b_hi - b_lo)

    def index(self, a: int, b: int) -> int:
        (a_lo, _), (b_lo, b_hi) = self.a_range, self.b_range
        return (a - a_lo) * (b_hi - b_lo) + (b - b_lo)


def sample_splits(task: MultTask, sizes: dict[str, int], seed: int, exclude=()) -> dict[str, list[tuple[int, int]]]:
    """Distinct operand pairs for each split, in `sizes` order; no pair in two splits or in `exclude`.

    One draw without replacement over the whole operand space, so splits are disjoint by
    construction and the same seed always gives the same pairs.
    """
    excluded = {task.index(a, b) for a, b in exclude if task.contains(a, b)}
    wanted = sum(sizes.values())
    available = task.num_pairs - len(excluded)
    if wanted > available:
        raise UserError(
            f"asked for {wanted} examples but only {available} distinct "
            f"{task.a_digits}x{task.b_digits} operand pairs exist"
            + (f" outside the {len(excluded)} excluded ones" if excluded else "")
        )
    rng = random.Random(seed)
    if task.num_pairs <= sys.maxsize:
        drawn = rng.sample(range(task.num_pairs), wanted + len(excluded))
        chosen = [i for i in drawn if i not in excluded][:wanted]
    else:
        chosen = _draw_distinct(rng, task.num_pairs, wanted, excluded)
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = [task.pair(i) for i in chosen[start : start + size]]
        start += size
    return splits


def _draw_distinct(rng: random.Random, space: int, wanted: int, excluded: set[int]) -> list[int]:
    """`wanted` distinct indices below `space`, none excluded, without materialising the space:
    random.sample's own method for a large population, which cannot take one past sys.maxsize
    (10x10 digits and more). Repeats are rare, since `wanted` is tiny next to `space`."""
    seen, chosen = set(excluded), []
    while len(chosen) < wanted:
        index = rng.randrange(space)
        if index not in seen:
            seen.add(index)
            chosen.append(index)
    return chosen


def describe_task(examples, sample: int = 1000) -> dict:
    """{'task': 'mult', 'digits': 'AxB'} if the (first) questions are multiplications, else {'task': 'text'}."""
    shapes = set()
    for example in examples[:sample]:
        try:
            a, b = parse_operands(example.question)
        except ValueError:
            return {"task": "text"}
        shapes.add(f"{len(str(a))}x{len(str(b))}")
    return {"task": "mult", "digits": shapes.pop() if len(shapes) == 1 else "mixed"}


def task_label(task: dict) -> str | None:
    """'2x2 multiplication' or 'non-multiplication text' from describe_task's (or icot.json's) fields."""
    if task.get("task") == "mult":
        return f"{task.get('digits')} multiplication"
    return "non-multiplication text" if task.get("task") == "text" else None
