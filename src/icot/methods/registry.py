"""The methods, one record each: its trainer, how a saved model of it loads, and what its model
card says. The command line's method list and help come from here.

A record names its trainer and loader as `module:attribute` and imports them when first asked,
so that answering with a saved model never imports the training loop. A new method is a module
with a config dataclass and a `Trainer` subclass (docs/ARCHITECTURE.md) and one `register` call.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from icot.errors import UserError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line: `icot train --help`
    card: str  # what the model is, as its model card says it ("trained by implicit-cot with ...")
    trainer: str  # "module:Class", a Trainer subclass whose config_class is the method's config
    loader: str | None = None  # "module:function(path, meta, device, dtype)" of a saved model; None: a plain causal LM
    usage: str = ""  # the model card's note on what answering outside icot involves

    def trainer_class(self):
        return _load(self.trainer)

    def load_predictor(self):
        return _load(self.loader) if self.loader else None


def _load(target: str):
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; its name is what `--method` and icot.json's `method` say."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name} is registered already")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"method '{name}' is unknown; choose one of {', '.join(METHODS)}")
    return METHODS[name]


_PLAIN_USAGE = "It ends generation after the answer, at the second SEP (plain `generate` stops at the first)."
_GAP_USAGE = ("It ends generation after the answer, and runs the positions with the gap the removed CoT left "
              "(`position_gap`), as in training.")
_THOUGHTS = "It ends generation after the answer, and runs the continuous thoughts"

register(Method("explicit", "explicit CoT: the model writes its chain of thought, then the answer (also the teacher)",
                "explicit chain of thought: it writes its chain of thought (CoT), then the answer",
                "icot.methods.baselines:ExplicitTrainer", usage=_PLAIN_USAGE))
register(Method("nocot", "no CoT: trained to answer at once (the baseline below every implicit method)",
                "no chain of thought: trained to answer at once",
                "icot.methods.baselines:NoCotTrainer", usage=_PLAIN_USAGE))
register(Method("stepwise", "Stepwise Internalization (ICoT-SI): CoT tokens removed on a schedule until none is left",
                "Stepwise Internalization (ICoT-SI; Deng, Choi, Shieber 2024): trained with explicit CoT whose tokens "
                "were removed on a schedule until none was left; it answers without writing a CoT",
                "icot.methods.stepwise:StepwiseTrainer", usage=_GAP_USAGE))
register(Method("kd", "ICoT-KD: a teacher's hidden states distilled into a student that reasons across its layers",
                "Implicit CoT via Knowledge Distillation (ICoT-KD; Deng et al. 2023): an explicit-CoT teacher's hidden "
                "states distilled into models that reason across their layers instead of writing a CoT",
                "icot.methods.kd.pipeline:KDTrainer", "icot.methods.kd.predictor:load_kd_predictor",
                usage="But they are the student's alone: answering needs the ICoT-KD modules beside them "
                      "(`kd_modules.safetensors`, `emulator/`), which icot loads; `icot export` cannot give it "
                      "remote code (docs/methods/kd.md)."))
register(Method("coconut", "Coconut: a curriculum replaces the CoT's steps by continuous thoughts",
                "Coconut (chain of continuous thought; Hao et al. 2024): trained on a curriculum that replaces the "
                "CoT's steps, one stage at a time, by continuous thoughts (the last hidden state fed back as the next "
                "input); it thinks in continuous thoughts, then answers",
                "icot.methods.coconut:CoconutTrainer", "icot.methods.coconut_model:load_coconut_predictor",
                usage=f"{_THOUGHTS} (each the last hidden state fed back as the next input, between the thought "
                      "tokens) after the prompt."))
register(Method("codi", "CODI: explicit-CoT teacher and continuous-thought student in one model, self-distilled",
                "CODI (continuous CoT via self-distillation; Shen et al. 2025): one model trained on explicit CoT (the "
                "teacher task) and on answering after a fixed number of continuous thoughts (the student task), its "
                "hidden states before the answer distilled from the teacher's; it thinks in continuous thoughts, then "
                "answers",
                "icot.methods.codi:CodiTrainer", "icot.methods.codi_model:load_codi_predictor",
                usage=f"{_THOUGHTS} after the prompt, through the projection beside the weights "
                      "(`codi_projection.safetensors`)."))
