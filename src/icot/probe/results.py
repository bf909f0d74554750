"""Probe results: JSON numbers, markdown tables (layers x quantities) and a heatmap figure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from icot.paths import replacing


@dataclass
class ModelProbes:
    label: str
    path: str
    method: str | None
    layers: list[str]
    input_window: int
    accuracy: dict[str, np.ndarray]  # site -> (layers, quantities) held-out accuracy

    def site_title(self, site: str) -> str:
        if site == "sep":
            return f"{self.label}: at SEP"
        return f"{self.label}: last {self.input_window} input positions, concatenated"


@dataclass
class ProbeResults:
    data: str
    targets: str
    quantities: list[str]
    classes: list[int]
    majority: np.ndarray  # (quantities,) held-out accuracy of the most frequent training value
    left_out: dict[str, str]
    train_examples: int
    held_out_examples: int
    settings: dict
    models: list[ModelProbes]

    def to_json(self) -> dict:
        def by_quantity(values) -> dict:
            return {q: round(float(v), 4) for q, v in zip(self.quantities, values)}

        return {
            "data": self.data,
            "targets": self.targets,
            "train_examples": self.train_examples,
            "held_out_examples": self.held_out_examples,
            "settings": self.settings,
            "quantities": [{"name": q, "classes": c} for q, c in zip(self.quantities, self.classes)],
            "left_out": self.left_out,
            "majority": by_quantity(self.majority),
            "models": [{
                "label": m.label, "path": m.path, "method": m.method, "input_window": m.input_window,
                "accuracy": {site: {layer: by_quantity(row) for layer, row in zip(m.layers, table)}
                             for site, table in m.accuracy.items()},
            } for m in self.models],
        }

    def markdown(self) -> str:
        lines = [f"Held-out accuracy (%) of linear probes on {self.data} ({self.train_examples} probe-training, "
                 f"{self.held_out_examples} held-out examples). Rows: hidden states entering each layer "
                 f"(emb = embeddings; the last row is the final state); majority: always the most frequent value."]
        if self.left_out:
            lines.append("Not probed: " + ", ".join(f"{q} ({why})" for q, why in self.left_out.items()) + ".")
        header = "| layer | " + " | ".join(self.quantities) + " | mean |"
        rule = "|---" * (len(self.quantities) + 2) + "|"
        majority_row = _markdown_row("majority", self.majority)
        for model in self.models:
            for site, table in model.accuracy.items():
                rows = [_markdown_row(layer, row) for layer, row in zip(model.layers, table)]
                lines += ["", f"### {model.site_title(site)}", "", header, rule, *rows, majority_row]
        return "\n".join(lines) + "\n"

    def plot(self, path) -> Path:
        """One heatmap panel (layers x quantities) per model and site, and the majority baseline."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [(m.site_title(site), m.layers, table) for m in self.models for site, table in m.accuracy.items()]
        panels.append(("majority baseline (always the most frequent value)", ["majority"], self.majority[None, :]))
        heights = [len(rows) for _, rows, _ in panels]
        width = max(6.0, 0.34 * len(self.quantities) + 2.0)
        fig, axes = plt.subplots(len(panels), 1, figsize=(width, 0.3 * sum(heights) + 0.55 * len(panels) + 0.9),
                                 gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, (title, rows, table) in zip(axes[:, 0], panels):
            image = _heatmap(ax, table, rows, self.quantities, title)
        axes[-1, 0].set_xticks(range(len(self.quantities)), self.quantities, rotation=90, fontsize=7)
        fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.02, pad=0.01, label="held-out accuracy")
        path = Path(path)
        with replacing(path, binary=True) as f:
            fig.savefig(f, dpi=110, bbox_inches="tight", format="png")
        plt.close(fig)
        return path


def _markdown_row(name: str, values: np.ndarray) -> str:
    cells = [f"{100 * v:.0f}" for v in values]
    return f"| {name} | " + " | ".join(cells) + f" | {100 * float(np.mean(values)):.0f} |"


def _heatmap(ax, table: np.ndarray, rows: list[str], columns: list[str], title: str):
    image = ax.imshow(table, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    for (r, c), value in np.ndenumerate(table):
        ax.text(c, r, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                color="black" if value > 0.6 else "white")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8, loc="left")
    return image
