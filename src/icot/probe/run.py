"""Probe one or more models on one data file: targets, hidden states, probes, results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from icot.data.format import read_examples
from icot.data.layout import encode
from icot.data.mult import describe_task
from icot.errors import UserError
from icot.models import max_positions, read_metadata
from icot.probe.features import PromptStates, check_tokenizable, input_window, prompt_states
from icot.probe.linear import CodedLabels, Split, code_labels, majority_accuracy, probe_accuracy
from icot.probe.results import ModelProbes, ProbeResults
from icot.probe.settings import ProbeSettings
from icot.probe.targets import Quantity, cot_token_quantities, informative, mult_quantities


def resolve_model_dir(path) -> str:
    """A run directory stands for its selected model, RUN/best."""
    path = Path(path)
    if (path / "best").is_dir() and not (path / "config.json").exists():
        return str(path / "best")
    return str(path)


def model_labels(model_dirs: list[str]) -> list[str]:
    """Each model's training method (icot.json), told apart by its run's name (or else its
    path) where two models share a method."""
    def run_name(model_dir: str) -> str:
        path = Path(model_dir)
        return path.parent.name if path.name == "best" else path.name

    methods = [read_metadata(d).get("method", run_name(d)) if Path(d).is_dir() else run_name(d) for d in model_dirs]
    labels = [m if methods.count(m) == 1 or run_name(d) == m else f"{m} ({run_name(d)})"
              for m, d in zip(methods, model_dirs)]
    if len(set(labels)) < len(labels):
        labels = [f"{m} ({d})" for m, d in zip(methods, model_dirs)]
    return labels


def resolve_targets(requested: str, examples) -> str:
    if requested != "auto":
        return requested
    return "mult" if describe_task(examples)["task"] == "mult" else "cot"


def probe_models(model_dirs, data_path, settings: ProbeSettings | None = None, device=None,
                 progress: bool = True) -> ProbeResults:
    """Held-out accuracy of linear probes, for every model, site, layer and quantity."""
    from icot.methods import load_predictor

    settings = settings or ProbeSettings()
    settings.validate()
    examples = read_examples(data_path)[: settings.max_examples]
    kind = resolve_targets(settings.targets, examples)
    settings.check_targets(kind)
    split = Split.random(len(examples), settings.held_out, settings.seed)
    dirs = [resolve_model_dir(d) for d in model_dirs]
    mult = mult_quantities(examples, data_path) if kind == "mult" else None  # computed from operands: any tokenizer
    targets = None
    models = []
    for model_dir, label in zip(dirs, model_labels(dirs)):
        predictor = load_predictor(model_dir, device=device)
        data = encode(predictor.tokenizer, predictor.layout, examples)
        check_tokenizable(predictor, data, data_path)
        _check_prompts_fit(predictor, data, data_path, model_dir)
        quantities = mult or cot_token_quantities(data, settings.cot_tokens, data_path, predictor.tokenizer)
        if targets is None:
            targets = _Targets.build(quantities, split, settings.max_classes)
        else:
            targets.check_same(quantities, data_path, model_dir)
        states = prompt_states(predictor, data, input_window(data, settings.input_window), settings.batch_size, progress)
        accuracy = _probe_all_sites(states, targets.coded, split, settings, label, progress)
        models.append(ModelProbes(label, model_dir, read_metadata(model_dir).get("method"), states.layer_names,
                                  states.window, accuracy))
    return ProbeResults(data=str(data_path), targets=kind, quantities=[q.name for q in targets.kept],
                        classes=targets.coded.n_classes, majority=targets.majority, left_out=targets.left_out,
                        train_examples=len(split.train), held_out_examples=len(split.held_out),
                        settings={k: v for k, v in vars(settings).items() if k != "batch_size"}, models=models)


@dataclass
class _Targets:
    """The quantities probed (the same for every model) and their coded labels."""

    kept: list[Quantity]
    left_out: dict[str, str]
    coded: CodedLabels
    majority: np.ndarray

    @classmethod
    def build(cls, quantities: list[Quantity], split: Split, max_classes: int) -> "_Targets":
        kept, left_out = informative(quantities)
        if not kept:
            raise UserError("every quantity is constant over these examples; nothing to probe (use more varied data)")
        coded = code_labels(np.stack([q.labels for q in kept], axis=1), split, max_classes)
        return cls(kept, left_out, coded, majority_accuracy(coded, split))

    def check_same(self, quantities: list[Quantity], data_path, model_dir) -> None:
        """CoT-token targets come from each model's tokenizer; comparing models needs them equal."""
        by_name = {q.name: q.labels for q in quantities}
        if any(q.name not in by_name or not np.array_equal(by_name[q.name], q.labels) for q in self.kept):
            raise UserError(f"{model_dir}: tokenizes the CoT of {data_path} differently from the first model; "
                            "CoT-token probes compare models with the same tokenizer (probe it separately)")


def _check_prompts_fit(predictor, data, data_path, model_dir) -> None:
    limit = max_positions(predictor.model)
    longest = int(data.n_prompt.max())
    if limit is not None and longest > limit:
        raise UserError(f"{data_path}: a prompt is {longest} tokens long but {model_dir} has only {limit} positions")


def _probe_all_sites(states: PromptStates, coded: CodedLabels, split: Split, settings: ProbeSettings, label: str,
                     progress: bool) -> dict[str, np.ndarray]:
    """{site: (layers, quantities) held-out accuracy}."""
    layers = len(states.layer_names)
    accuracy = {}
    with tqdm(total=len(settings.sites) * layers, desc=f"probes {label}", leave=False, disable=not progress) as bar:
        for site in settings.sites:
            rows = []
            for layer in range(layers):
                rows.append(probe_accuracy(states.site(site)[layer], coded, split, settings.l2, settings.max_iter))
                bar.update(1)
            accuracy[site] = np.stack(rows)
    return accuracy
