"""Checkpoint directories: their names, the `latest` pointer, and which old ones go."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from icot.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def unused_checkpoint_name(root: Path, step: int) -> str:
    """`step-00000100`, or `step-00000100-2`, `-3`, ... when that step has been saved already."""
    name = base = f"step-{step:08d}"
    while (root / name).exists():
        name = f"{base}-{checkpoint_order(name)[1] + 1}"
    return name


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """(step, save) of a checkpoint directory's name, in the order they were written; None for other names."""
    match = re.fullmatch(r"step-(\d{8})(?:-(\d+))?", name)
    return (int(match[1]), int(match[2] or 1)) if match else None


def rotate(root: Path, latest: str, keep: int) -> None:
    """Delete the earlier saves of `latest`'s step, then, beyond `keep`, the later steps
    a resume from an earlier checkpoint abandoned and the oldest; never `latest` itself."""
    step = checkpoint_order(latest)[0]
    saved = sorted((d for d in root.iterdir() if d.is_dir() and checkpoint_order(d.name) and d.name != latest),
                   key=lambda d: (checkpoint_order(d.name)[0] < step, checkpoint_order(d.name)))
    superseded = [d for d in saved if checkpoint_order(d.name)[0] == step]
    rest = [d for d in saved if d not in superseded]
    for old in superseded + rest[: max(0, len(rest) + 1 - keep)]:
        shutil.rmtree(old)


def latest(run_dir: Path) -> Path:
    """The checkpoint `checkpoints/latest` names, which must exist."""
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        raise UserError(f"{run_dir}: no checkpoint to resume from")
    try:
        name = pointer.read_text().strip()
    except UnicodeDecodeError:
        name = ""
    checkpoint = pointer.parent / name
    if not name or "/" in name or not checkpoint.is_dir():
        raise UserError(f"{pointer}: names a checkpoint that does not exist ({name!r}); point it at one of "
                        f"{pointer.parent}/step-* or start a new run")
    return checkpoint


def last_good(run_dir: Path) -> str:
    """Where training can go on from: checkpoints hold finite weights only."""
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.exists():
        return "no checkpoint had been saved yet"
    return f"the last good checkpoint is {run_dir / CHECKPOINTS / pointer.read_text().strip()}"
