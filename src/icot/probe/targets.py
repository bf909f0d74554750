"""What the probes decode: one integer label per example for each named quantity.

Multiplication quantities are digits of the partial products, running sums and answer,
computed from the operands rather than read from the CoT, so a model that never saw a CoT
can be probed for them too. For any task, `cot[k]` is the k-th CoT token of the example.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icot.data.format import Example
from icot.data.layout import EncodedSet
from icot.data.mult import parse_operands
from icot.errors import UserError, located

MISSING = -1  # label of an example that has no value for a quantity (a CoT shorter than k tokens)


@dataclass
class Quantity:
    name: str
    labels: np.ndarray  # int64, one per example; MISSING where undefined


def digits_lsb_first(value: int, width: int) -> list[int]:
    """`value` zero-padded to `width` digits, least significant first (the data's digit order)."""
    return [int(d) for d in reversed(str(value).zfill(width))]


def mult_digits(a: int, b: int) -> dict[str, int]:
    """Every digit the explicit CoT of a*b writes, plus the answer's, in CoT order.

    `p{i}[j]` is digit j (least significant first) of partial product i = a*b_i*10^i, padded
    to n+1+i digits; `s{i}[j]` of the running sum of partials 0..i (written for 1 <= i <= m-2);
    `ans[j]` of a*b, padded to n+m digits.
    """
    n, m = len(str(a)), len(str(b))
    values: dict[str, int] = {}
    running = 0
    for i, digit in enumerate(reversed(str(b))):
        partial = a * int(digit) * 10**i
        running += partial
        for j, d in enumerate(digits_lsb_first(partial, n + 1 + i)):
            values[f"p{i}[{j}]"] = d
        if 1 <= i < m - 1:
            for j, d in enumerate(digits_lsb_first(running, n + 1 + i)):
                values[f"s{i}[{j}]"] = d
    for j, d in enumerate(digits_lsb_first(a * b, n + m)):
        values[f"ans[{j}]"] = d
    return values


def mult_quantities(examples: list[Example], path) -> list[Quantity]:
    """Partial-product, running-sum and answer digits of every example (all of one AxB shape)."""
    operands = []
    for lineno, example in enumerate(examples, 1):
        try:
            operands.append(parse_operands(example.question))
        except ValueError as e:
            raise located(path, lineno, f"not a multiplication input ({e}); multiplication quantities need "
                                        "questions like '9 1 7 3 * 9 4 3 3' (use --targets cot for other tasks)") from None
    shapes = {(len(str(a)), len(str(b))) for a, b in operands}
    if len(shapes) > 1:
        listed = ", ".join(f"{n}x{m}" for n, m in sorted(shapes))
        raise UserError(f"{path}: mixes multiplication shapes ({listed}); probe one AxB shape at a time")
    rows = [mult_digits(a, b) for a, b in operands]
    return [Quantity(name, np.array([row[name] for row in rows], dtype=np.int64)) for name in rows[0]]


def cot_token_quantities(data: EncodedSet, count: int, path, tokenizer) -> list[Quantity]:
    """`cot[k]`: the k-th CoT token of each example, for k below `count`.

    Labels index the token's text, not its id, so that two models whose tokenizers split the
    data alike (a word vocabulary rebuilt from the same files) get the same labels.
    """
    longest = int(data.n_cot.max()) if len(data) else 0
    if longest == 0:
        raise UserError(f"{path}: no example has a chain of thought; CoT-token quantities need 'input||cot #### answer' lines")
    quantities = []
    for k in range(min(count, longest)):
        labels = np.full(len(data), MISSING, dtype=np.int64)
        has_k = data.n_cot > k
        ids = data.tokens[data.offsets[:-1][has_k] + data.n_prompt[has_k] + k]
        texts = np.array(tokenizer.convert_ids_to_tokens(ids.tolist()), dtype=object)
        labels[has_k] = np.unique(texts, return_inverse=True)[1]
        quantities.append(Quantity(f"cot[{k}]", labels))
    return quantities


def informative(quantities: list[Quantity]) -> tuple[list[Quantity], dict[str, str]]:
    """Quantities worth probing, and why each other one was left out.

    A constant (e.g. the zero padding of a shifted partial product) is decoded perfectly by any
    probe and says nothing; a duplicate of an earlier quantity (a running sum's low digits are
    the previous sum's) would only repeat its column.
    """
    kept: list[Quantity] = []
    left_out: dict[str, str] = {}
    for quantity in quantities:
        defined = quantity.labels[quantity.labels != MISSING]
        if len(np.unique(defined)) < 2:
            left_out[quantity.name] = "constant"
            continue
        same = next((q.name for q in kept if np.array_equal(q.labels, quantity.labels)), None)
        if same is not None:
            left_out[quantity.name] = f"same as {same}"
            continue
        kept.append(quantity)
    return kept, left_out
