"""Plots and tables from run directories (metrics.jsonl)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from icot.errors import UserError, warn
from icot.paths import replacing


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN/metrics.jsonl. Lines that are not whole JSON records (a killed run
    leaves half a line; a damaged file, bytes that are not UTF-8) are skipped with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no metrics.jsonl)")
    records, skipped = [], []
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped.append(lineno)
    if skipped:
        lines = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        warn(f"{path}: skipped {len(skipped)} unreadable line(s) ({lines}); read the {len(records)} whole records")
    return records


def removed_value(value):
    """Removed-token counts are numbers or 'inf'/'all' (whole CoT); None for runs without one."""
    if value in ("inf", "all"):
        return math.inf
    return value


def plot_run(run_dir) -> Path | None:
    """RUN/plots/training.png: loss, validation accuracy and CoT tokens removed against step."""
    out = Path(run_dir) / "plots"
    if not _training_records(read_metrics(run_dir)):
        return None
    out.mkdir(exist_ok=True)
    return plot_runs([run_dir], out / "training.png")


def _training_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "event" not in r and "loss" in r]


def run_labels(run_dirs) -> list[str]:
    """Each run's directory name, or its whole path where two runs share a name."""
    names = [Path(run).name for run in run_dirs]
    return [name if names.count(name) == 1 else str(run) for name, run in zip(names, run_dirs)]


def plot_runs(run_dirs, path) -> Path | None:
    """One figure, every run overlaid: training loss, validation accuracy and (for runs that
    remove CoT tokens) tokens removed, against step. None when no run has training records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(label, read_metrics(run)) for label, run in zip(run_labels(run_dirs), run_dirs)]
    runs = [(label, records) for label, records in runs if _training_records(records)]
    if not runs:
        return None
    colors = {label: f"C{i % 10}" for i, (label, _) in enumerate(runs)}  # one color per run in every panel
    removals = {label: _removal_points(records) for label, records in runs}
    panels = 4 if any(removals.values()) else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.4))
    for label, records in runs:
        train = _training_records(records)
        valid = [r for r in records if r.get("event") == "validation" and "val_accuracy" in r]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], color=colors[label], label=label)
        axes[1].plot([r["step"] for r in valid], [r["val_accuracy"] for r in valid], marker="o", markersize=3,
                     color=colors[label], label=label)
    axes[0].set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    axes[1].set(xlabel="step", ylabel="exact match", ylim=(-0.02, 1.02), title="validation accuracy")
    if panels == 4:
        _plot_removal(axes[2], removals, colors, max(_longest_cot(records) for _, records in runs))
        _plot_accuracy_vs_removed(axes[3], runs, colors)
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Write the figure; step axes read 10k, 20k (whole numbers collide past ~10,000 steps)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    for ax in fig.axes:
        if ax.get_xlabel() == "step":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    fig.tight_layout()
    with replacing(path, binary=True) as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def _longest_cot(records: list[dict]) -> float:
    """The run's longest training CoT (inf for runs logged before it was recorded)."""
    return next((r["longest_cot"] for r in records if r.get("event") == "start" and "longest_cot" in r), math.inf)


def _removal_points(records: list[dict]) -> list[tuple[int, float]]:
    """(step, CoT tokens removed) of a run, clipped at its longest CoT (the scheduled count may run
    past it, and 'all' is that longest CoT); runs logged before `longest_cot` was recorded keep inf."""
    longest = _longest_cot(records)
    return [(r["step"], min(removed_value(r["removed"]), longest)) for r in _training_records(records) if "removed" in r]


def _plot_accuracy_vs_removed(ax, runs: list[tuple[str, list[dict]]], colors: dict[str, str]) -> None:
    """Validation accuracy against CoT tokens removed, in training order: where internalization hurts."""
    for label, records in runs:
        longest = _longest_cot(records)
        validations = [r for r in records if r.get("event") == "validation" and "removed" in r]
        points = [(min(removed_value(r["removed"]), longest), r["val_accuracy"]) for r in validations]
        points = [(x, a) for x, a in points if not math.isinf(x)]  # 'all' of a run without longest_cot
        if points:
            ax.plot([x for x, _ in points], [a for _, a in points], marker="o", markersize=3, color=colors[label], label=label)
    ax.set(xlabel="CoT tokens removed", ylabel="exact match", ylim=(-0.02, 1.02), title="validation accuracy vs removal")


KD_STAGES = ("teacher", "student", "emulator", "couple")


def plot_kd_stages(run_dir, path) -> Path | None:
    """One panel per ICoT-KD stage of RUN: validation accuracy against step (the emulator:
    emulation loss, and how often its token mixture picks the teacher's token). None when no stage
    of RUN has validation records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(s, [r for r in read_metrics(Path(run_dir) / s) if r.get("event") == "validation"])
              for s in KD_STAGES if (Path(run_dir) / s / "metrics.jsonl").is_file()]
    stages = [(s, records) for s, records in stages if records]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for ax, (stage, records) in zip(axes[0], stages):
        steps = [r["step"] for r in records]
        if stage == "emulator":
            ax.plot(steps, [r["val_emulation_loss"] for r in records], marker="o", markersize=3, color="C3")
            ax.set(xlabel="step", ylabel="emulation loss", yscale="log", title="(b) emulator")
            if "val_thought_token_accuracy" in records[0]:
                twin = ax.twinx()
                twin.plot(steps, [r["val_thought_token_accuracy"] for r in records], marker="s", markersize=3, color="C2")
                twin.set(ylabel="teacher's token picked", ylim=(-0.02, 1.02))
        else:
            ax.plot(steps, [r["val_accuracy"] for r in records], marker="o", markersize=3)
            title = {"teacher": "teacher (explicit CoT)", "student": "(a) student, gold states", "couple": "(c) coupled, no CoT"}
            ax.set(xlabel="step", ylabel="exact match", ylim=(-0.02, 1.02), title=title[stage])
    return save_figure(fig, path)


def plot_accuracy_vs_removed(run_dirs, path) -> Path | None:
    """One figure: validation accuracy against CoT tokens removed for every run that removes CoT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(label, read_metrics(run)) for label, run in zip(run_labels(run_dirs), run_dirs)]
    runs = [(label, records) for label, records in runs if _removal_points(records)]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    _plot_accuracy_vs_removed(ax, runs, {label: f"C{i % 10}" for i, (label, _) in enumerate(runs)})
    if len(runs) > 1:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _plot_removal(ax, removals: dict[str, list], colors: dict[str, str], longest: float) -> None:
    """Removed CoT tokens per step, up to the longest CoT; runs logged without it draw 'all removed'
    (inf) one above their largest count."""
    finite = [v for points in removals.values() for _, v in points if not math.isinf(v)]
    cap = max(finite, default=0) + 1
    for label, points in removals.items():
        if points:
            ax.step([s for s, _ in points], [cap if math.isinf(v) else v for _, v in points], where="post",
                    color=colors[label], label=label)
    title = f"removal (top = all, {cap:g})" if math.isinf(longest) else f"removal (longest CoT {longest:g})"
    ax.set(xlabel="step", ylabel="CoT tokens removed", title=title)
    if not math.isinf(longest):
        ax.set_ylim(-0.02 * longest, 1.02 * longest)


# ----- comparing runs ----------------------------------------------------------------------------

def training_cost(run) -> dict:
    """Examples, wall seconds and CPU seconds of a run's training (CPU seconds: None for runs older than
    that record), from its last end record; ICoT-KD's is that of its stages."""
    run = Path(run)
    if not (run / "metrics.jsonl").exists() and (run / "couple").is_dir():
        costs = [training_cost(run / stage) for stage in KD_STAGES if (run / stage).is_dir()]
        return {key: None if any(c[key] is None for c in costs) else sum(c[key] for c in costs) for key in costs[0]}
    records = read_metrics(run)
    end = [r for r in records if r.get("event") == "end"][-1]  # a run resumed after its end has several
    trained = [r["examples"] for r in records if "loss" in r]
    return {"train_examples": trained[-1] if trained else 0, "train_seconds": end["train_seconds"],
            "train_cpu_seconds": end.get("train_cpu_seconds")}


TABLE_COLUMNS = ["run", "method", "model", "accuracy", "measured on", "eval examples/s", "mean generated tokens",
                 "training examples", "training time (s)"]


def summarize_run(run_dir, label: str | None = None) -> dict:
    """One row of the comparison table.

    Accuracy, speed and generated tokens come from one evaluation: the test set if the run
    was tested, else the validation of the selected (best) model, else, for a run still
    training, its latest validation.
    """
    records = read_metrics(run_dir)
    config = _read_config(run_dir)
    train = _training_records(records)
    end = next((r for r in reversed(records) if r.get("event") == "end"), None)
    evaluation, source, prefix = _chosen_evaluation(records, end)
    last = train[-1] if train else {}
    seconds = end["train_seconds"] if end and "train_seconds" in end else last.get("train_seconds")
    return {
        "run": label or Path(run_dir).name,
        "method": config.get("method"),
        "model": config.get("model"),
        "accuracy": evaluation.get(prefix + "accuracy") if evaluation else None,
        "measured on": source,
        "eval examples/s": evaluation.get(prefix + "examples_per_s") if evaluation else None,
        "mean generated tokens": evaluation.get(prefix + "mean_generated_tokens") if evaluation else None,
        "training examples": last.get("examples"),
        "training time (s)": seconds,
    }


def _chosen_evaluation(records: list[dict], end: dict | None) -> tuple[dict | None, str | None, str]:
    """(record, what it measured, key prefix) of the evaluation that stands for the run."""
    if end and end.get("test_accuracy") is not None:
        return end, "test", "test_"
    validations = [r for r in records if r.get("event") == "validation"]
    if end and end.get("best_step") is not None:
        best = [r for r in validations if r["step"] == end["best_step"]]
        if best:
            return best[-1], "best validation", "val_"
    if validations:
        return validations[-1], "latest validation", "val_"
    return None, None, ""


def _read_config(run_dir) -> dict:
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; expected the run's YAML settings") from None
    return config if isinstance(config, dict) else {}


def comparison_table(rows: list[dict]) -> str:
    """Markdown table of run summaries (`summarize_run`); '-' where a run has no value."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(column, row[column]) for column in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "accuracy":
        return f"{value:.3f}"
    if column in ("eval examples/s", "mean generated tokens"):
        return f"{value:.1f}"
    if column == "training time (s)":
        return f"{value:.0f}"
    return str(value)
