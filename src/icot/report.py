"""Plots and tables from run directories (metrics.jsonl)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from icot.errors import UserError


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no metrics.jsonl)")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return records


def removed_value(value):
    """Removed-token counts are numbers or 'inf'/'all' (whole CoT); None for runs without one."""
    if value in ("inf", "all"):
        return math.inf
    return value


def plot_run(run_dir) -> Path | None:
    """RUN/plots/training.png: loss, validation accuracy and CoT tokens removed against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "event" not in r and "loss" in r]
    valid = [r for r in records if r.get("event") == "validation" and "val_accuracy" in r]
    removed = [(r["step"], removed_value(r["removed"])) for r in train if "removed" in r]
    if not train:
        return None
    panels = 3 if removed else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    axes[1].plot([r["step"] for r in valid], [r["val_accuracy"] for r in valid], marker="o")
    axes[1].set(xlabel="step", ylabel="exact match", ylim=(-0.02, 1.02), title="validation accuracy")
    if removed:
        finite = max((v for _, v in removed if not math.isinf(v)), default=0)
        cap = finite + 1
        axes[2].step([s for s, _ in removed], [cap if math.isinf(v) else v for _, v in removed], where="post")
        axes[2].set(xlabel="step", ylabel="CoT tokens removed", title=f"removal (top = all, {cap})")
    fig.tight_layout()
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    fig.savefig(out / "training.png", dpi=120)
    plt.close(fig)
    return out / "training.png"
