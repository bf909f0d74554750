"""Experiment trackers (TensorBoard, W&B, MLflow, ...) through Accelerate's own tracker support.

`report_to` names them as Accelerate does (`tensorboard`, `wandb`, `mlflow`, ..., comma-separated
for several, `all` for every installed one, `none`). The Trainer hands Accelerate the resolved
config as hyperparameters and every metrics.jsonl record as scalars named `<event>/<key>`:
`train/loss`, `validation/val_accuracy`, `removal/removed`, `end/test_accuracy`.
"""

from __future__ import annotations

import math
from pathlib import Path

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from icot.errors import UserError, warn

EXTRAS = {"tensorboard", "wandb", "mlflow"}  # trackers with an optional extra in pyproject.toml


def requested(report_to: str) -> list[str]:
    """The tracker names in `report_to` ([] for none); an unknown name is a UserError."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    known = ["all", "none", *LOGGER_TYPE_TO_CLASS]
    for name in names:
        if name not in known:
            raise UserError(f"config: report_to: '{name}' is not one of {', '.join(known)}")
    return [name for name in names if name != "none"]


def log_with(report_to: str) -> list[str]:
    """The trackers to hand Accelerate, `all` expanded to the installed ones. Accelerate silently
    skips a tracker whose package is missing: refuse it instead, before any work."""
    installed = sorted(str(tracker) for tracker in get_available_trackers())
    names = requested(report_to)
    for name in names:
        if name != "all" and name not in installed:
            package = f"'implicit-cot[{name}]'" if name in EXTRAS else name
            raise UserError(f"--report-to {name} needs the {name} package: pip install {package}")
    if "all" not in names:
        return names
    if not installed:
        warn("report_to all: no tracker package is installed; the run is recorded in metrics.jsonl only")
    return installed


def flatten(values: dict, prefix: str = "") -> dict:
    """Nested dicts as one level, keys joined with '/' (KD's per-stage sections)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value
    return flat


def hparams(config: dict) -> dict:
    """The config as trackers take hyperparameters: flat, each value a number, bool or string."""
    def simple(value):
        return value if isinstance(value, (bool, int, float, str)) else str(value)  # None -> 'None', lists

    return {key: simple(value) for key, value in flatten(config).items()}


def scalars(record: dict) -> dict:
    """The numbers of a metrics.jsonl record, as `<event>/<key>` (`train` for training records).
    Strings, None and non-finite numbers stay out: trackers plot numbers, and an infinite one
    (CoT removal's count once everything is removed) would flatten the chart."""
    section = record.get("event", "train")
    numbers = {}
    for key, value in flatten(record).items():
        if key in ("event", "step") or not isinstance(value, (bool, int, float)) or not math.isfinite(value):
            continue
        numbers[f"{section}/{key}"] = int(value) if isinstance(value, bool) else value
    return numbers


def init_kwargs(run_dir: Path, resumed_step: int | None) -> dict:
    """Per-tracker settings: runs named by their directory; a resumed run's TensorBoard curves
    drop the points past its checkpoint (written before the interruption, redone now)."""
    name = str(run_dir)
    tensorboard = {"purge_step": resumed_step + 1} if resumed_step is not None else {}
    return {"tensorboard": tensorboard, "wandb": {"name": name}, "mlflow": {"run_name": name}}
