"""The checks of icot.json, the metadata icot saves beside a model (how it was trained, how to
decode it).

models.read_metadata runs them on every read, so an edited or damaged file is one error naming
the file, the field and what is expected, before any loader reads a field. Fields absent here
are not checked (a later icot may add some); a field a method's loader needs must be present.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Callable

from icot.errors import UserError


@dataclass(frozen=True)
class Rule:
    test: Callable[[object], bool]
    expected: str


def whole(low: int = 0) -> Rule:
    # type(...) is int: JSON true/false load as bool, a subclass of int, and are no count
    return Rule(lambda v: type(v) is int and v >= low, f"a whole number of at least {low}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: isinstance(v, str) and v in choices, "one of " + ", ".join(f'"{c}"' for c in choices))


def _real(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


TEXT = Rule(lambda v: isinstance(v, str), "a string")
FLAG = Rule(lambda v: type(v) is bool, "true or false (not a string)")
OBJECT = Rule(lambda v: isinstance(v, dict), "a JSON object")
COT_REMOVED = Rule(lambda v: v == "all" or (type(v) is int and v >= 0), '"all" or a whole number of at least 0')
THOUGHT_TOKENS = Rule(lambda v: isinstance(v, dict) and sorted(v) == ["begin", "end", "latent"]
                      and all(type(i) is int and i >= 0 for i in v.values()),
                      'an object {"begin": ID, "end": ID, "latent": ID} of token ids')
PROJECTION = Rule(lambda v: v is None or (isinstance(v, dict) and sorted(v) == ["dim", "dropout", "layer_norm"]
                                          and whole(1).test(v["dim"]) and _real(v["dropout"]) and 0 <= v["dropout"] < 1
                                          and FLAG.test(v["layer_norm"])),
                  'null or an object {"dim": whole number >= 1, "dropout": number in [0, 1), "layer_norm": true/false}')


def _delta(value) -> bool:
    from icot.methods.kd.states import parse_delta

    if not isinstance(value, str):
        return False
    try:
        parse_delta(value)
    except ValueError:
        return False
    return True


@functools.cache
def _rules() -> tuple[dict[str, Rule], dict[str, dict[str, Rule]], dict[str, dict[str, Rule]]]:
    """(every field's rule, the fields each method or ICoT-KD stage needs to load, those it needs
    besides to answer); built on first use, as the choices come from modules that import this
    one's caller."""
    from icot.answers import MODES
    from icot.data.steps import KINDS
    from icot.methods.registry import METHODS
    from icot.methods.kd.modules import MIXTURES
    from icot.methods.kd.states import SUBSETS

    fields = {
        "method": one_of(*METHODS), "answer_match": one_of(*MODES), "cot_removed": COT_REMOVED,
        "task": one_of("mult", "text"), "digits": TEXT, "icot_version": TEXT, "base_model": TEXT, "train_file": TEXT,
        "train_examples": whole(), "parameters": whole(), "step": whole(), "epoch": whole(), "config": OBJECT,
        "evaluation": OBJECT,
        # the positions of a stepwise model (evaluate.load_plain_predictor)
        "removal_side": one_of("left", "right"), "keep_position": FLAG, "position_gap": whole(),
        "position_gap_from": whole(), "gap_placement": one_of("authors", "in_place"), "rewinds": whole(),
        # Coconut and CODI
        "thought_tokens": THOUGHT_TOKENS, "coconut_stage": whole(), "c_thought": whole(1), "max_latent_stage": whole(),
        "thoughts": whole(), "projection": PROJECTION,
        # null: a CODI model that keeps the last step (include_last_step) splits no CoT
        "steps": Rule(lambda v: v is None or one_of(*KINDS).test(v), "null or " + one_of(*KINDS).expected),
        "step_separator": Rule(lambda v: v is None or isinstance(v, str), "null or a string"),
        # ICoT-KD
        "kd_stage": one_of("coupled", "student", "emulator"), "teacher": TEXT, "student": TEXT, "emulator": TEXT,
        "delta": Rule(_delta, '"dynamic" or a positive whole number written as a string'), "subset": one_of(*SUBSETS),
        "mixture": one_of(*MIXTURES), "mixture_size": whole(1), "freeze_emulator": FLAG,
        "softmax_temperature": Rule(lambda v: _real(v) and v > 0, "a positive number"),
    }
    needs = {"": {"method": fields["method"]},
             "coconut": {**{k: fields[k] for k in ("thought_tokens", "coconut_stage", "c_thought", "max_latent_stage")},
                         "steps": one_of(*KINDS)},
             "codi": {"thought_tokens": THOUGHT_TOKENS, "thoughts": whole(1), "projection": PROJECTION},
             "kd": {"kd_stage": fields["kd_stage"]},
             # positions kept (stepwise): the gap the removed CoT leaves
             "keep_position": {"position_gap": fields["position_gap"]},
             "kd emulator": {k: fields[k] for k in ("mixture_size", "softmax_temperature")}}
    # a mind-reading student answers from its teacher's states (stage c loads it without them)
    answering = {"kd student": {k: fields[k] for k in ("teacher", "delta", "subset")}}
    return fields, needs, answering


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _require(meta: dict, file, needs: dict[str, dict[str, Rule]]) -> None:
    """Each field that this icot.json's method (its ICoT-KD stage, its kept positions) needs is there and right."""
    kinds = ["", meta.get("method")] + ([f"kd {meta.get('kd_stage')}"] if meta.get("method") == "kd" else [])
    kinds += ["keep_position"] if meta.get("keep_position") is True else []
    for name, rule in [item for kind in kinds for item in needs.get(kind, {}).items()]:
        if name not in meta:
            model = f"an icot {meta['method']}" if "method" in meta else "an icot"
            raise UserError(f"{file}: field '{name}' is missing; {model} model's metadata needs it ({rule.expected})")
        if not rule.test(meta[name]):
            raise UserError(f"{file}: field '{name}' is {_shown(meta[name])}; expected {rule.expected}")


def check_metadata(meta, file) -> None:
    """A UserError naming `file` and the first field of `meta` (icot.json's content) that is wrong
    or that loading its model needs and is missing."""
    if not isinstance(meta, dict):
        raise UserError(f"{file}: expected a JSON object of icot's metadata, got {_shown(meta)}")
    fields, needs, _ = _rules()
    for name, rule in fields.items():
        if name in meta and not rule.test(meta[name]):
            raise UserError(f"{file}: field '{name}' is {_shown(meta[name])}; expected {rule.expected}")
    _require(meta, file, needs)


def check_answering(meta: dict, file) -> None:
    """The fields a model needs to answer questions besides those it needs to load (check_metadata)."""
    _require(meta, file, _rules()[2])
