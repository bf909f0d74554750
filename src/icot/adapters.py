"""LoRA adapters (through `peft`) and gradient checkpointing, on the causal LM inside a method's
model (the model itself, or the `lm` of a model with a method's modules), and the plain Hugging
Face model saved from adapters, merged into the weights."""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings

from icot.errors import UserError
from icot.models import LMWithModules


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserError("lora: needs the peft package: pip install 'implicit-cot[lora]' (or peft)") from None


def lm_of(model):
    """The causal LM a method's model trains: the model, or its `lm`."""
    return model.lm if isinstance(model, LMWithModules) else model


def _lora_config(settings, lm):
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, task_type="CAUSAL_LM",
                      target_modules=settings.target_modules, modules_to_save=settings.modules_to_save,
                      fan_in_fan_out=any(isinstance(m, Conv1D) for m in lm.modules()))  # GPT-2's layers store W^T


def _with_adapters(lm, settings):
    from peft import get_peft_model

    with warnings.catch_warnings():  # peft reads transformers' deprecated name of a property: harmless
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(lm, _lora_config(settings, lm))


def check_lora(settings, model_name: str, lm) -> None:
    """The adapters fit this model, before any work: peft finds its target modules."""
    require_peft()
    try:
        _with_adapters(copy.deepcopy(lm), settings)
    except (ValueError, TypeError) as e:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in lm.named_modules() if name})
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"lora.target_modules {settings.target_modules}: peft cannot adapt {model_name} ({first}); "
                        f"its modules are named {', '.join(names[:30])}") from None


def add_lora(model, settings):
    """The model with adapters on its LM: only they (and the method's own modules, and
    modules_to_save) train."""
    adapted = _with_adapters(lm_of(model), settings)
    if isinstance(model, LMWithModules):
        model.lm = adapted
        return model
    return adapted


def enable_gradient_checkpointing(model, model_name: str) -> None:
    lm = lm_of(model)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise UserError(f"gradient_checkpointing: {model_name} ({type(lm).__name__}) has no gradient checkpointing of "
                        "its own (transformers' supports_gradient_checkpointing); expected a model that has it, or "
                        "gradient_checkpointing false")
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.25's name for it
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def has_lora(model) -> bool:
    peft = sys.modules.get("peft")  # not imported: no model has adapters (peft is an optional extra)
    return peft is not None and isinstance(lm_of(model), peft.PeftModel)


@contextlib.contextmanager
def merged(model):
    """The model to save: its LM's adapters merged into a copy of its weights, a plain causal LM."""
    if not has_lora(model):
        yield model
        return
    lm = lm_of(model)
    plain = copy.deepcopy(lm).merge_and_unload()
    if not isinstance(model, LMWithModules):
        yield plain
        return
    model.lm = plain
    try:
        yield model
    finally:
        model.lm = lm
