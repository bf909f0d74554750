"""`icot compare SPEC`: methods trained over several seeds at an equal budget, measured alike on one test file.

A spec (YAML) names the data directory, the test file, the methods (each a config file with overrides),
the seeds, the budget (the same training examples, or the same wall time, for every run) and the output
directory. Each method x seed trains in OUT/runs/NAME-seedS; a finished run is reused, an interrupted one
resumed, a missing one started. Then every best model is measured on the test file, one at a time (its
accuracy, examples/s at batch 1 and 64, generated tokens; cached in OUT/evaluations/), and OUT/compare.md,
compare.json and compare.png summarise each method over its seeds. docs/compare.md describes the spec.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from icot import config as cfg, paths
from icot.errors import UserError, located

SPEC_KEYS = ("data", "test", "methods", "seeds", "budget", "out", "speed_examples")
ENTRY_KEYS = ("name", "config", "overrides")
SET_BY_SPEC = ("out", "seed", "overwrite", "data", "train_file", "valid_file", "test_file")  # never an entry's
BUDGET_FIELD = {"examples": "max_steps", "wall": "max_train_seconds"}  # the config field each budget sets
SPEED_EXAMPLES = 200  # test lines timed at batch 1, unless the spec says
UNITS = {"s": 1, "m": 60, "h": 3600}


# ----- the spec -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """What every run gets alike: `examples` training examples (whole optimizer steps, rounded up) or
    `wall` seconds of training."""

    kind: str
    amount: float

    def describe(self) -> str:
        return f"{int(self.amount)} training examples" if self.kind == "examples" else f"{self.amount:g} s of training"

    def to_json(self) -> dict:
        return {self.kind: int(self.amount) if self.kind == "examples" else self.amount}


@dataclass(frozen=True)
class Entry:
    """One method of the comparison: its name (the run directories' prefix), config file (None: the
    overrides alone) and overrides, and the spec line it starts on."""

    name: str
    config: str | None
    overrides: dict
    line: int


@dataclass(frozen=True)
class Spec:
    path: Path
    data: str
    test: str
    entries: tuple
    seeds: tuple
    budget: Budget
    out: Path
    speed_examples: int

    def to_json(self) -> dict:
        return {"spec": str(self.path), "data": self.data, "test": self.test, "seeds": list(self.seeds),
                "budget": self.budget.to_json(), "out": str(self.out), "speed_examples": self.speed_examples,
                "methods": [{"name": e.name, "config": e.config, "overrides": _plain(e.overrides)} for e in self.entries]}


class _Mapping(dict):
    """A YAML mapping with the line of each key (`lines`) and its own (`line`)."""


class _List(list):
    """A YAML sequence with the line of each item (`lines`) and its own (`line`)."""


class _SpecLoader(cfg.Loader):
    """The config loader (plain scalars keep their text), whose mappings and sequences know their lines."""


def _mapping(loader, node):
    loader.flatten_mapping(node)
    value = _Mapping(loader.construct_mapping(node, deep=True))
    value.lines = {loader.construct_object(key, deep=True): key.start_mark.line + 1 for key, _ in node.value}
    value.line = node.start_mark.line + 1
    return value


def _sequence(loader, node):
    value = _List(loader.construct_sequence(node, deep=True))
    value.lines = [item.start_mark.line + 1 for item in node.value]
    value.line = node.start_mark.line + 1
    return value


_SpecLoader.add_constructor("tag:yaml.org,2002:map", _mapping)
_SpecLoader.add_constructor("tag:yaml.org,2002:seq", _sequence)


def _value(item):
    """A scalar as YAML reads it (icot.config.Plain keeps the text beside the value)."""
    return item.value if isinstance(item, cfg.Plain) else item


def _plain(value):
    """Mappings, lists and scalars as JSON holds them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return _value(value)


def read_spec_file(path: Path) -> _Mapping:
    if not path.is_file():
        raise UserError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}; expected a comparison "
                        "spec (YAML, docs/compare.md)")
    try:
        values = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_SpecLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise located(path, mark.line + 1 if mark else None, f"invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; expected a comparison spec (YAML)") from None
    if not isinstance(values, _Mapping):
        raise located(path, 1, "expected a mapping of data, test, methods, seeds, budget, out (docs/compare.md)")
    unknown = [key for key in values if key not in SPEC_KEYS]
    if unknown:
        raise located(path, values.lines[unknown[0]], f"unknown key '{unknown[0]}'; valid keys: {', '.join(SPEC_KEYS)}")
    return values


def load_spec(path, seeds=None, budget: str | None = None, out=None, methods=None) -> Spec:
    """The spec in `path`, with the command line's `seeds` (a list), `budget` ('examples=N', 'wall=20m')
    and `out` in place of its own, and only the entries `methods` names (a list). Every problem is one
    UserError at its file:line, before any work."""
    path = Path(path)
    values = read_spec_file(path)

    def line(key):
        return values.lines.get(key, values.line)

    def required(key):
        if key not in values:
            raise located(path, values.line, f"no '{key}'; expected data, methods, seeds, budget and out (docs/compare.md)")
        return values[key]

    data = _text(required("data"), "data", path, line("data"))
    if not Path(data).is_dir():
        raise located(path, line("data"), f"data: {data} is not a directory; expected one with train.txt (and valid.txt)")
    test = _text(values["test"], "test", path, line("test")) if "test" in values else _default_test(data, path, line("data"))
    if not Path(test).is_file():
        raise located(path, line("test"), f"test: {test}: no such file; expected the test file every model is measured on")
    chosen_seeds = _seeds(seeds, "--seeds", None, None) if seeds is not None else \
        _seeds(required("seeds"), "seeds", path, line("seeds"))
    chosen_budget = parse_budget(budget, "--budget") if budget is not None else \
        _spec_budget(required("budget"), path, line("budget"))
    where_out = Path(out) if out is not None else Path(_text(required("out"), "out", path, line("out")))
    speed = _value(values.get("speed_examples", SPEED_EXAMPLES))
    if isinstance(speed, bool) or not isinstance(speed, int) or speed < 1:
        raise located(path, line("speed_examples"), f"speed_examples {speed}: expected a whole number of at least 1")
    entries = _entries(required("methods"), path, line("methods"), chosen_budget)
    if methods is not None:
        entries = _chosen(entries, methods, path)
    return Spec(path, data, test, entries, chosen_seeds, chosen_budget, where_out, speed)


def _chosen(entries: tuple, names: list, path: Path) -> tuple:
    """The entries `--methods` names, in the spec's order."""
    known = [e.name for e in entries]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(f"--methods {unknown[0]}: no such entry in {path}; expected some of: {', '.join(known)}")
    return tuple(e for e in entries if e.name in names)


def _text(value, key: str, path: Path, line: int) -> str:
    if not isinstance(value, str) or isinstance(value, (_Mapping, _List)) or not value.strip():
        raise located(path, line, f"{key}: expected a path, got {_plain(value)!r}")
    return str(value)


def _default_test(data: str, path: Path, line: int) -> str:
    found = next((Path(data) / name for name in ("test.txt", "test.jsonl") if (Path(data) / name).is_file()), None)
    if found is None:
        raise located(path, line, f"data: {data} has no test.txt or test.jsonl; give the test file as test: FILE")
    return str(found)


def _seeds(value, key: str, path, line) -> tuple:
    def error(message):
        return located(path, line, message) if path is not None else UserError(message)

    items = value if isinstance(value, list) else [value]
    seeds = [_value(item) for item in items]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32 for s in seeds):
        raise error(f"{key} {_plain(value)}: expected a list of whole numbers from 0 to 2**32 - 1, e.g. [1, 2, 3]")
    if len(set(seeds)) < len(seeds):
        raise error(f"{key} {_plain(value)}: a seed is repeated; expected distinct seeds")
    return tuple(seeds)


def _spec_budget(value, path: Path, line: int) -> Budget:
    if not isinstance(value, dict) or len(value) != 1:
        raise located(path, line, f"budget: expected one of `examples: N` (training examples per run) or `wall: 20m` "
                                  f"(training time per run), got {_plain(value)!r}")
    (kind, amount), = value.items()
    try:
        return _budget(str(kind), str(amount), "budget")
    except UserError as e:
        raise located(path, line, str(e)) from None


def parse_budget(text: str, flag: str) -> Budget:
    """'examples=N' or 'wall=DURATION' (90s, 20m, 1.5h; a bare number is seconds)."""
    kind, sep, amount = text.partition("=")
    if not sep:
        raise UserError(f"{flag} {text}: expected examples=N (training examples per run) or wall=DURATION "
                        "(training time per run, e.g. wall=20m)")
    return _budget(kind.strip(), amount.strip(), flag)


def _budget(kind: str, amount: str, where: str) -> Budget:
    if kind == "examples":
        if not re.fullmatch(r"[0-9]+", amount) or int(amount) < 1:
            raise UserError(f"{where} examples {amount}: expected a whole number of at least 1")
        return Budget("examples", int(amount))
    if kind == "wall":
        return Budget("wall", _seconds(amount, where))
    raise UserError(f"{where} {kind}: unknown budget; expected examples (training examples per run) or wall "
                    "(training time per run)")


def _seconds(text: str, where: str) -> float:
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([smh]?)", text)
    seconds = float(match.group(1)) * UNITS[match.group(2) or "s"] if match else 0.0
    if not seconds > 0:
        raise UserError(f"{where} wall {text}: expected a positive duration such as 90s, 20m or 1.5h")
    return seconds


def _entries(value, path: Path, line: int, budget: Budget) -> tuple:
    if not isinstance(value, _List) or not value:
        raise located(path, line, "methods: expected a list of entries, each with a name, a config and overrides")
    entries = []
    for item, item_line in zip(value, value.lines):
        entries.append(_entry(item, path, item_line, budget))
        names = [e.name for e in entries]
        if names.count(names[-1]) > 1:
            raise located(path, item_line, f"methods: the name '{names[-1]}' is given twice; expected distinct names")
    return tuple(entries)


def _entry(item, path: Path, line: int, budget: Budget) -> Entry:
    if not isinstance(item, _Mapping):
        raise located(path, line, f"methods: expected an entry `{{name: N, config: FILE, overrides: {{...}}}}`, "
                                  f"got {_plain(item)!r}")
    unknown = [key for key in item if key not in ENTRY_KEYS]
    if unknown:
        raise located(path, item.lines[unknown[0]], f"unknown key '{unknown[0]}' in a method entry; valid keys: "
                                                    f"{', '.join(ENTRY_KEYS)}")
    name = _value(item.get("name"))
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise located(path, line, f"methods: name {name!r}: expected a name of letters, digits, '.', '_' and '-' "
                                  "(it names the runs' directories)")
    config = item.get("config")
    if config is not None:
        config = _text(config, "config", path, item.lines["config"])
        if not Path(config).is_file():
            raise located(path, item.lines["config"], f"{name}: config {config}: no such file")
    overrides = item.get("overrides", _Mapping())
    if not isinstance(overrides, dict):
        raise located(path, item.lines["overrides"], f"{name}: overrides: expected a mapping of config fields")
    reserved = (*SET_BY_SPEC, BUDGET_FIELD[budget.kind])
    taken = [key for key in overrides if key in reserved]
    if taken:
        raise located(path, overrides.lines[taken[0]], f"{name}: overrides: {taken[0]} is set by the comparison (data, "
                                                        "test, seeds, out, budget); drop it")
    return Entry(name, config, dict(overrides), line)


# ----- the runs -------------------------------------------------------------------------------------

@dataclass
class Run:
    """One entry trained with one seed: its directory, trainer class, config and state."""

    entry: Entry
    seed: int
    dir: Path
    trainer_class: type
    config: object
    state: str  # new, finished, stopped (resumable from a checkpoint), started (no checkpoint: starts afresh)

    @property
    def name(self) -> str:
        return self.dir.name


def plan_runs(spec: Spec) -> list[Run]:
    """Every entry x seed, its config built and checked, and the state of its directory; a run done or
    stopped with other settings than the spec gives now is refused. Nothing is written."""
    runs = []
    for entry in spec.entries:
        for seed in spec.seeds:
            folder = spec.out / "runs" / f"{entry.name}-seed{seed}"
            trainer_cls, config = run_config(spec, entry, seed, folder)
            state = run_state(folder)
            if state in ("finished", "stopped"):
                check_same_settings(folder, config)
            if state == "started":
                config = dataclasses.replace(config, overwrite=True)
            runs.append(Run(entry, seed, folder, trainer_cls, config, state))
    return runs


def run_config(spec: Spec, entry: Entry, seed: int, folder: Path):
    """(trainer class, config) of `entry` with `seed` in `folder`: its config file, its overrides, the
    spec's data and test file, then the budget."""
    from icot.methods import trainer_class

    def where(message):
        return located(spec.path, entry.line, f"{entry.name}: {message}")

    values = cfg.load_yaml(entry.config) if entry.config else {}
    values = cfg.merge(values, entry.overrides)
    values.update(data=spec.data, train_file=None, valid_file=None, test_file=spec.test, seed=seed, out=str(folder),
                  overwrite=False)
    try:
        method = str(values.get("method", "explicit"))
        trainer_cls = trainer_class(method)
        unbudgeted = cfg.build(trainer_cls.config_class, values)
        return trainer_cls, cfg.build(trainer_cls.config_class, with_budget(values, unbudgeted, spec.budget))
    except UserError as e:
        raise where(str(e)) from None


def with_budget(values: dict, config, budget: Budget) -> dict:
    """`values` with the budget as the config field that sets it: max_steps (the examples over the
    examples per optimizer step, rounded up) or max_train_seconds. A config of stages (ICoT-KD:
    `stages()`) shares it out evenly among the stages it trains, in each stage's section."""
    stages = config.stages() if hasattr(config, "stages") else None
    parts = [(getattr(config, stage), stage) for stage in stages] if stages else [(config, None)]
    share = budget.amount / len(parts)
    values = dict(values)
    for section, stage in parts:
        if budget.kind == "examples":
            per_step = (getattr(section, "batch_size", None) or config.batch_size) * config.grad_accum
            setting = {"max_steps": math.ceil(share / per_step)}
        else:
            setting = {"max_train_seconds": share}
        if stage is None:
            values.update(setting)
        else:
            values[stage] = {**values.get(stage, {}), **setting}
    return values


def run_state(folder: Path) -> str:
    """new: no run there yet; finished: its best model and an end record after its last start or resume
    (in each stage, for ICoT-KD); stopped: a checkpoint to resume from; started: neither."""
    if not (folder / "config.yaml").is_file():
        return "new"
    if finished(folder):
        return "finished"
    parts = [folder, *(p for p in folder.iterdir() if p.is_dir())]
    return "stopped" if any((p / "checkpoints" / "latest").is_file() for p in parts) else "started"


def finished(folder: Path) -> bool:
    from icot.report import KD_STAGES, read_metrics

    if not (folder / "best").is_dir():
        return False
    parts = [folder] if (folder / "metrics.jsonl").is_file() else \
        [folder / s for s in KD_STAGES if (folder / s / "metrics.jsonl").is_file()]

    def ended(part):
        events = [r.get("event") for r in read_metrics(part) if r.get("event") in ("start", "resume", "end")]
        return events[-1:] == ["end"]

    return bool(parts) and all(ended(part) for part in parts)


def check_same_settings(folder: Path, config) -> None:
    """A run reused or resumed must be the run the spec asks for: its saved settings are the config's."""
    from icot.api import changed_fields

    saved_file = folder / "config.yaml"
    saved = cfg.load_yaml(saved_file)
    if saved.get("method") != config.method:
        raise UserError(f"{folder}: a run of method {saved.get('method')}, and the spec now gives {config.method}; "
                        f"use another --out, or remove {folder} to train it again")
    before = cfg.build(type(config), {**saved, "out": str(folder)}, str(saved_file))
    changed = {k: v for k, v in changed_fields(cfg.to_dict(before), cfg.to_dict(config)).items() if k != "overwrite"}
    if changed:
        key, (old, new) = next(iter(changed.items()))
        raise UserError(f"{folder}: trained with {key} {old}, and the spec now gives {new}; a comparison reuses only "
                        f"runs of its own settings: restore them, use another --out, or remove {folder} to train it again")


def train_runs(runs: list[Run]) -> None:
    """Each run not finished, one after the other: resumed from its checkpoint, or started."""
    from tqdm.auto import tqdm

    from icot.api import trainer_for

    with tqdm(total=len(runs), desc="compare: training", unit="run") as bar:
        for run in runs:
            if run.state == "finished":
                bar.write(f"{run.dir}: finished earlier, reused")
            elif run.state == "stopped":
                bar.write(f"{run.dir}: resuming from its checkpoint")
                trainer_for(None, {}, resume=run.dir).fit()
            else:
                bar.write(f"{run.dir}: training")
                run.trainer_class(run.config).fit()
            bar.update(1)


# ----- measuring -----------------------------------------------------------------------------------

def measure(model_dir, test_file, speed_examples: int, device=None) -> dict:
    """As `icot eval` measures a model: accuracy and examples/s on the whole test file at batch 64, mean
    generated tokens; examples/s at batch 1 (the papers' speed measure) on its first `speed_examples` lines."""
    from icot.api import load

    model = load(model_dir, device=device)
    full = model.evaluate(test_file, batch_size=64)
    one = model.evaluate(test_file, batch_size=1, max_examples=speed_examples)
    return {"accuracy": full["accuracy"], "examples_per_s_batch1": one["examples_per_s"],
            "examples_per_s_batch64": full["examples_per_s"], "generated_tokens": full["mean_generated_tokens"]}


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def evaluate_runs(spec: Spec, runs: list[Run]) -> dict:
    """Each run's best model measured (`measure`) and its training cost, by run name. A measurement is
    kept in OUT/evaluations/RUN.json with what it depends on (the model's icot.json, the test file, the
    lines timed) and reused while they are unchanged."""
    from tqdm.auto import tqdm

    from icot.models import METADATA, read_metadata
    from icot.report import training_cost

    folder = spec.out / "evaluations"
    folder.mkdir(exist_ok=True)
    test_digest = _digest(Path(spec.test))
    results = {}
    for run in tqdm(runs, desc="compare: measuring", unit="run"):
        key = {"model": _digest(run.dir / "best" / METADATA), "test": test_digest, "speed_examples": spec.speed_examples}
        cache = folder / f"{run.name}.json"
        kept = json.loads(cache.read_text()) if cache.is_file() else {}
        if kept.get("key") != key:
            kept = {"key": key, "measured": measure(run.dir / "best", spec.test, spec.speed_examples)}
            paths.write_file(cache, json.dumps(kept, indent=2) + "\n")
        final = read_metadata(run.dir / "best").get("final_form")  # None: saved before icot kept it
        results[run.name] = {"method": run.entry.name, "seed": run.seed, "run": str(run.dir), **kept["measured"],
                             "final_form": final, **training_cost(run.dir)}
    return results


# ----- the summary -----------------------------------------------------------------------------------

def summarize(spec: Spec, results: dict) -> dict:
    """Per method: its seeds, accuracy mean, standard deviation (over seeds; 0 for one) and range, and
    the means of the other measures."""
    summary = {}
    for entry in spec.entries:
        rows = [r for r in results.values() if r["method"] == entry.name]
        accuracies = [r["accuracy"] for r in rows]

        def mean(key):
            values = [r[key] for r in rows if r[key] is not None]
            return statistics.fmean(values) if values else None

        summary[entry.name] = {
            "seeds": [r["seed"] for r in rows], "accuracy_mean": statistics.fmean(accuracies),
            "seeds_short_of_final_form": [r["seed"] for r in rows if r["final_form"] is False],
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracy_min": min(accuracies), "accuracy_max": max(accuracies),
            **{key: mean(key) for key in ("examples_per_s_batch1", "examples_per_s_batch64", "generated_tokens",
                                          "train_examples", "train_seconds")}}
    return summary


def table(summary: dict) -> str:
    """The summary as a Markdown table; seeds whose run ended short of the method's final form are
    counted beside the seeds and explained below the table."""
    lines = ["| method | seeds | accuracy (mean ± std) | min-max | examples/s (batch 1) | examples/s (batch 64) | "
             "generated tokens | training examples | training time |", "|" + "---|" * 9]
    for name, s in summary.items():
        short = len(s["seeds_short_of_final_form"])
        seeds = f"{len(s['seeds'])} ({short} short †)" if short else len(s["seeds"])
        lines.append(f"| {name} | {seeds} | {s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f} | "
                     f"{s['accuracy_min']:.3f}-{s['accuracy_max']:.3f} | {s['examples_per_s_batch1']:.1f} | "
                     f"{s['examples_per_s_batch64']:.0f} | {s['generated_tokens']:.1f} | {s['train_examples']:.0f} | "
                     f"{duration(s['train_seconds'])} |")
    if any(s["seeds_short_of_final_form"] for s in summary.values()):
        lines.append("\n† runs that ended before the method's final form (stepwise: CoT left to remove; Coconut: an "
                     "earlier stage): their best model, of an earlier stage, is what the row measures; a larger "
                     "budget lets them finish.")
    return "\n".join(lines) + "\n"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def report(spec: Spec, summary: dict) -> str:
    return (f"# icot compare: {spec.path}\n\n{table(summary)}\n"
            f"Test file: {spec.test}; budget: {spec.budget.describe()} per run; seeds: "
            f"{', '.join(map(str, spec.seeds))}. Means over the seeds; the standard deviation is the sample one. "
            f"Examples/s at batch 1 on the first {spec.speed_examples} test lines; training examples and time are "
            f"those of each run's records.\n")


def plot(spec: Spec, summary: dict, results: dict, path: Path) -> Path:
    """Accuracy per method: each seed's run as a dot, the mean as a bar with the standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from icot.report import save_figure

    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 1.5), 3.6))
    for i, name in enumerate(names):
        s = summary[name]
        ax.errorbar([i], [s["accuracy_mean"]], yerr=[s["accuracy_std"]], fmt="_", markersize=24, capsize=6,
                    color=f"C{i % 10}")
        accuracies = [r["accuracy"] for r in results.values() if r["method"] == name]
        offsets = [0.0] if len(accuracies) == 1 else [-0.15 + 0.3 * k / (len(accuracies) - 1) for k in range(len(accuracies))]
        ax.scatter([i + o for o in offsets], accuracies, s=18, color=f"C{i % 10}", zorder=3)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="test accuracy (exact match)", ylim=(-0.02, 1.02), xlim=(-0.6, len(names) - 0.4),
           title=f"{Path(spec.test).name}: {spec.budget.describe()} per run")
    return save_figure(fig, path)


# ----- the command ----------------------------------------------------------------------------------

def compare(spec_file, seeds=None, budget: str | None = None, out=None, methods=None) -> dict:
    """`icot compare`: the spec read and every run planned (nothing written before), then OUT locked
    against any other command meanwhile (paths.one_writer) while it trains, measures and reports."""
    spec = load_spec(spec_file, seeds, budget, out, methods)
    inputs = [spec.path, spec.data, spec.test, *(e.config for e in spec.entries if e.config)]
    paths.check_output_dir(spec.out, "--out")
    paths.refuse_overlap(spec.out, "--out", inputs)
    if spec.out.exists() and any(spec.out.iterdir()) and not paths.is_ours(spec.out):
        raise UserError(f"--out {spec.out}: exists, is not empty and icot did not write it; choose another directory")
    runs = plan_runs(spec)
    with paths.one_writer(spec.out):
        spec.out.mkdir(parents=True, exist_ok=True)
        paths.mark_as_ours(spec.out)
        train_runs(runs)
        results = evaluate_runs(spec, runs)
        summary = summarize(spec, results)
        text = report(spec, summary)
        paths.write_file(spec.out / "compare.md", text)
        record = {"spec": spec.to_json(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "methods": summary, "runs": results}
        paths.write_file(spec.out / "compare.json", json.dumps(record, indent=2) + "\n")
        figure = plot(spec, summary, results, spec.out / "compare.png")
    print(f"\n{text}\n{spec.out / 'compare.md'}\n{spec.out / 'compare.json'}\n{figure}")
    return record
