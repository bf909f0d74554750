"""The training methods, by name, and loading any saved model for inference."""

from __future__ import annotations

from pathlib import Path

from icot.errors import UserError
from icot.evaluate import Predictor, load_plain_predictor
from icot.methods.baselines import ExplicitTrainer, NoCotTrainer
from icot.methods.codi import CodiTrainer, load_codi_predictor
from icot.methods.coconut import CoconutTrainer, load_coconut_predictor
from icot.methods.kd import KDTrainer, load_kd_predictor
from icot.methods.stepwise import StepwiseTrainer

TRAINERS = {"explicit": ExplicitTrainer, "nocot": NoCotTrainer, "stepwise": StepwiseTrainer, "kd": KDTrainer,
            "coconut": CoconutTrainer, "codi": CodiTrainer}


def trainer_class(method: str):
    if method not in TRAINERS:
        raise UserError(f"method '{method}' is unknown; choose one of {', '.join(TRAINERS)}")
    return TRAINERS[method]


def load_predictor(path, device=None, dtype=None) -> Predictor:
    """A saved model (ours or any Hugging Face causal LM directory/hub id) ready for inference."""
    from icot.models import is_preset, read_metadata

    path = str(path)
    if is_preset(path) and not Path(path).exists():
        raise UserError(f"model {path}: a preset is an untrained model shape for 'icot train'; "
                        "give a trained model directory, e.g. RUN/best")
    meta = read_metadata(path) if Path(path).is_dir() else {}
    if meta.get("method") == "kd":
        return load_kd_predictor(path, meta, device=device, dtype=dtype)
    if meta.get("method") == "coconut":
        return load_coconut_predictor(path, meta, device=device, dtype=dtype)
    if meta.get("method") == "codi":
        return load_codi_predictor(path, meta, device=device, dtype=dtype)
    return load_plain_predictor(path, meta, device=device, dtype=dtype)
