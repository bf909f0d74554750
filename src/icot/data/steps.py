"""A CoT as a list of reasoning steps, and where each step ends in the CoT's tokens.

How a CoT splits into steps (`kind`):

- `gsm8k`: one step per `<<...>>` expression, as in the Coconut authors' GSM8K data
  (`<<16-3-4=9>> <<9*2=18>>` has two steps).
- `mult`: one step per partial product and one per running sum, in the order written:
  `8 3 7 0 + 0 5 1 6 0 ( 8 8 8 6 0 ) + 0 0 2 9 4 0` (3x3) has the four steps `8 3 7 0`,
  `+ 0 5 1 6 0`, `( 8 8 8 6 0 )`, `+ 0 0 2 9 4 0`; a 4x4 CoT has 4 partial products and 2 sums.
- `separator`: the CoT split at every occurrence of a string the user gives; the separator
  belongs to the step it closes, so replacing a step replaces its separator too.
- `auto`: `mult` for multiplication data, `gsm8k` when every CoT is made of `<<...>>` steps.

Step ends are counted in tokens by tokenizing each prefix of the CoT that ends with a step.
For tokenizers that split words at spaces (GPT-2's byte-level BPE, Llama's, our word-level
one) these are exact prefixes of the CoT's own tokens; anything else is refused.
"""

from __future__ import annotations

import re

from icot.data.format import Example
from icot.data.layout import token_lists, whitespace_vocab
from icot.data.mult import describe_task
from icot.errors import UserError

KINDS = ("auto", "gsm8k", "mult", "separator")

_GSM8K_BOUNDARY = re.compile(r"(?<=>>)\s+(?=<<)")
_MULT_BOUNDARY = re.compile(r" (?=[+(] )")  # before `+ partial` and before `( running sum )`


def check_separator(kind: str, separator: str | None) -> None:
    if kind == "separator" and not separator:
        raise UserError("config: steps 'separator' needs step_separator (the string between two steps)")
    if kind != "separator" and separator:
        raise UserError(f"config: step_separator {separator!r} is read only with steps: separator, got steps: {kind}")


def resolve_kind(kind: str, examples: list[Example], separator: str | None) -> str:
    """The concrete kind for `auto`, or `kind` itself once checked against the data."""
    check_separator(kind, separator)
    if kind != "auto":
        return kind
    if describe_task(examples).get("task") == "mult":
        return "mult"
    with_cot = [e.cot for e in examples[:1000] if e.cot]
    if with_cot and all(c.startswith("<<") and c.endswith(">>") for c in with_cot):
        return "gsm8k"
    raise UserError("config: cannot tell how these CoTs split into steps; set steps to gsm8k, mult or separator "
                    "(with step_separator)")


def setting_label(kind: str, resolved: str, separator: str | None) -> str:
    """The steps setting as given, with what `auto` chose: `steps auto (mult)`, `steps separator ';'`."""
    if kind == "separator":
        return f"steps separator {separator!r}"
    return f"steps {kind}" + (f" ({resolved})" if resolved != kind else "")


def unsplit_error(label: str, cots: list[str], consequence: str) -> UserError:
    """No training CoT splits into more than one step under the setting `label`; `consequence`:
    what a method would then do instead of acting step by step."""
    example = next((cot for cot in cots if cot), "")
    return UserError(f"{label}: no training CoT splits into more than one step (e.g. {example[:60]!r}), so "
                     f"{consequence}; expected steps that split it (mult for multiplication, gsm8k for <<...>> steps, "
                     "or separator with a step_separator the CoTs hold)")


def step_texts(cot: str, kind: str, separator: str | None = None) -> list[str]:
    """The steps of one CoT, in order; joined they give back the CoT (up to the whitespace between them)."""
    if not cot:
        return []
    if kind == "gsm8k":
        return _GSM8K_BOUNDARY.split(cot)
    if kind == "mult":
        return _MULT_BOUNDARY.split(cot)
    parts = cot.split(separator)
    steps = [part + separator for part in parts[:-1]] + [parts[-1]]
    return [s.strip() for s in steps if s.strip()]


def _char_ends(cot: str, steps: list[str]) -> list[int]:
    ends, start = [], 0
    for step in steps:
        start = cot.index(step, start) + len(step)
        ends.append(start)
    return ends


def token_step_ends(tokenizer, cots: list[str], kind: str, separator: str | None = None) -> list[list[int]]:
    """For each CoT, the token count of the CoT up to the end of each step (the last is the whole CoT)."""
    words = whitespace_vocab(tokenizer)
    char_ends = [_char_ends(cot, step_texts(cot, kind, separator)) for cot in cots]
    prefixes = [cot[:end] for cot, ends in zip(cots, char_ends) for end in ends]
    prefix_tokens = iter(token_lists(tokenizer, prefixes, words))
    whole = token_lists(tokenizer, cots, words)
    result = []
    for i, (ends, tokens) in enumerate(zip(char_ends, whole)):
        counts = []
        for _ in ends:
            prefix = next(prefix_tokens)
            if prefix != tokens[: len(prefix)]:
                raise UserError(f"example {i + 1}: the tokenizer does not split the CoT at its step boundaries "
                                f"({cots[i][:80]!r}); use steps 'separator' with a separator after which it does")
            counts.append(len(prefix))
        result.append(counts)
    return result
