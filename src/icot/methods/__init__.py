"""The training methods, by name, and loading any saved model for inference."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from icot.errors import UserError
from icot.evaluate import Predictor
from icot.methods.baselines import ExplicitTrainer, NoCotTrainer
from icot.methods.kd import KDTrainer, load_kd_predictor
from icot.methods.stepwise import StepwiseTrainer

TRAINERS = {"explicit": ExplicitTrainer, "nocot": NoCotTrainer, "stepwise": StepwiseTrainer, "kd": KDTrainer}


def trainer_class(method: str):
    if method not in TRAINERS:
        raise UserError(f"method '{method}' is unknown; choose one of {', '.join(TRAINERS)}")
    return TRAINERS[method]


def load_predictor(path, device=None, dtype=None) -> Predictor:
    """A saved model (ours or any Hugging Face causal LM directory/hub id) ready for inference."""
    from icot.data.tokenizers import load_tokenizer
    from icot.models import is_preset, load_model, read_metadata

    path = str(path)
    if is_preset(path) and not Path(path).exists():
        raise UserError(f"model {path}: a preset is an untrained model shape for 'icot train'; "
                        "give a trained model directory, e.g. RUN/best")
    meta = read_metadata(path) if Path(path).is_dir() else {}
    if meta.get("method") == "kd":
        return load_kd_predictor(path, meta, device=device, dtype=dtype)
    model = load_model(path, dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    if meta.get("keep_position") and "position_gap_from" not in meta:
        print(f"warning: {path} was trained with keep_position by icot before 0.2, which left the position gap after "
              "the first SEP; this version puts it before SEP as the authors' code does, so retrain it", file=sys.stderr)
    removed = meta.get("cot_removed", 0)
    return Predictor(model, load_tokenizer(path), cot_removed=math.inf if removed == "all" else float(removed),
                     removal_side=meta.get("removal_side", "left"), keep_position=meta.get("keep_position", False),
                     position_gap=meta.get("position_gap", 0), position_gap_from=meta.get("position_gap_from", 0))
