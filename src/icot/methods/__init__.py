"""The training methods, by name (registry.py), and loading any saved model for inference."""

from __future__ import annotations

from pathlib import Path

from icot.errors import UserError, warn
from icot.methods.registry import METHODS, get


def trainer_class(method: str):
    """The Trainer subclass of a method (its config: `.config_class`)."""
    return get(method).trainer_class()


def trainers() -> dict:
    """Every method's Trainer subclass, by name (imports them all)."""
    return {name: method.trainer_class() for name, method in METHODS.items()}


def load_predictor(path, device=None, dtype=None):
    """A saved model (ours or any Hugging Face causal LM directory/hub id) ready for inference (a Predictor)."""
    from icot.evaluate import load_plain_predictor
    from icot.models import check_vocabulary_fits, is_preset

    path = str(path)
    if is_preset(path) and not Path(path).exists():
        raise UserError(f"model {path}: a preset is an untrained model shape for 'icot train'; "
                        "give a trained model directory, e.g. RUN/best")
    meta = _local_metadata(path) if Path(path).is_dir() else {}
    method = METHODS.get(meta.get("method"))
    loader = (method.load_predictor() if method else None) or load_plain_predictor
    predictor = loader(path, meta, device=device, dtype=dtype)
    check_vocabulary_fits(path, predictor.tokenizer, predictor.model)
    check_reserved_positions(path, meta, predictor)
    return predictor


def _reserved_positions(meta: dict, predictor) -> dict[str, int]:
    """The positions icot.json sets aside beyond the question and answer, by the fields that set them."""
    if meta.get("method") == "coconut":
        return {"min(coconut_stage, max_latent_stage) * c_thought thoughts": predictor.n_thoughts}
    if meta.get("method") == "codi":
        return {"thoughts": predictor.n_thoughts}
    if predictor.keep_position:
        return {"position_gap": predictor.position_gap, "position_gap_from": predictor.position_gap_from}
    return {}


def check_reserved_positions(path, meta: dict, predictor) -> None:
    """A stepwise gap or Coconut/CODI thoughts that take the model's positions leave no room to answer
    (and would run past the position table, or for hours): one error naming the fields."""
    from icot.models import METADATA, max_positions

    limit, reserved = max_positions(predictor.model), _reserved_positions(meta, predictor)
    used = sum(reserved.values())
    if limit is not None and used >= limit:
        fields = ", ".join(f"{name} {value}" for name, value in reserved.items())
        raise UserError(f"{Path(path) / METADATA}: {fields} take {used} of the model's {limit} positions "
                        "(config.json); expected fewer, leaving room for the question and its answer")


def _local_metadata(path: str) -> dict:
    """icot.json of a model directory, with what answering needs; first, that the directory holds a
    tokenizer. Without icot.json, a warning: the model is decoded as a plain causal LM."""
    from icot.metadata import check_answering
    from icot.models import METADATA, check_tokenizer_files, read_metadata

    check_tokenizer_files(path)
    meta = read_metadata(path)
    if meta:
        check_answering(meta, Path(path) / METADATA)
    else:
        warn(f"model {path}: no icot.json beside it, so how it was trained (method, CoT removal, positions) is "
             "unknown; decoding it as a plain causal LM, which is wrong for a model trained otherwise")
    return meta
