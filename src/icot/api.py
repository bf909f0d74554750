"""The Python API: what the `icot` command does, as functions (the command calls these).

    import icot

    icot.generate_mult("2x2", "data/2x2", train=2000, valid=100, test=100)
    run = icot.train(method="explicit", data="data/2x2", model="micro", out="runs/2x2", max_steps=300)
    model = icot.load(run / "best")
    model.predict("12*34")                          # '408' (if it learned)
    model.evaluate("data/2x2/test.txt")["accuracy"]

Bad input raises icot.UserError with the one-line message the command prints. Imports are made
inside the functions, so that `import icot` stays quick.
"""

from __future__ import annotations

import contextlib
import os
from numbers import Integral
from pathlib import Path

from icot.errors import UserError, warn

# ----- data ----------------------------------------------------------------------------------------

def generate_mult(digits: str, out, train: int = 808000, valid: int = 1000, test: int = 1000, seed: int = 0,
                  exclude=(), overwrite: bool = False) -> dict[str, Path]:
    """Multiplication data in the papers' format: OUT/{train,valid,test}.txt with distinct operand
    pairs (none in two splits, none in the `exclude` files); a split of size 0 is not written
    (with `overwrite`, an old file of it is removed: it would overlap the new splits). The splits
    replace the old ones together, once all are written. `digits` is AxB, e.g. '4x4'. Returns
    {split: file}."""
    _check_generate_mult_arguments(digits, out, {"train": train, "valid": valid, "test": test}, seed, exclude, overwrite)
    from icot import paths
    from icot.data.format import write_to
    from icot.data.mult import MultTask, mult_example, sample_splits

    task = MultTask.parse(digits)
    counts = {"train": train, "valid": valid, "test": test}
    for name, count in {**counts, "seed": seed}.items():
        if count < 0:
            raise UserError(f"--{name} {count}: must not be negative")
    if not any(counts.values()):
        raise UserError("--train, --valid and --test are all 0: nothing to write; expected at least one split")
    excluded = [pair for path in exclude for pair in _excluded_pairs(path, task, digits)]
    out = Path(out)
    sizes = {name: counts[name] for name in ("test", "valid", "train") if counts[name] > 0}
    files = {name: out / f"{name}.txt" for name in sizes}
    stale = [out / f"{name}.txt" for name in counts if name not in sizes and (out / f"{name}.txt").exists()]
    paths.check_output_dir(out, "--out")
    for file in [*files.values(), *stale]:
        paths.check_output_file(file, "--out", overwrite, exclude)
    splits = sample_splits(task, sizes, seed, excluded)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:  # the splits replace the old ones together, once all are whole
        for name, pairs in splits.items():
            write_to(stack.enter_context(paths.replacing(files[name])), (mult_example(a, b) for a, b in pairs), jsonl=False)
    for file in stale:
        file.unlink()
    return files


def _excluded_pairs(path, task, digits: str) -> list[tuple[int, int]]:
    """The operand pairs of an --exclude file, which must hold some of the task's size (others
    could never be drawn, so excluding them would do nothing)."""
    from icot.data.format import read_examples
    from icot.data.mult import operand_digits, parse_operands

    pairs, sizes = [], set()
    for lineno, example in enumerate(read_examples(path), 1):
        try:
            a, b = operand_digits(example.question)
            pairs.append(parse_operands(example.question))
        except ValueError as e:
            raise UserError(f"{path}:{lineno}: not a multiplication input ({e})") from None
        sizes.add((len(a), len(b)))
    if (task.a_digits, task.b_digits) not in sizes:
        found = ", ".join(f"{x}x{y}" for x, y in sorted(sizes))
        raise UserError(f"--exclude {path}: its questions are {found}, none {digits}, so it excludes nothing; "
                        f"expected a file of {digits} questions")
    return pairs


# ----- training ------------------------------------------------------------------------------------

def train(config=None, *, resume=None, **overrides) -> Path:
    """Train a model; returns its run directory (the model is RUN/best).

    `config`: a YAML experiment file or a dict of config fields; `overrides`: fields by name, on
    top of it (`method="stepwise"`, `lr=1e-4`, `teacher={"epochs": 1}` for a nested one). With
    `resume=RUN`, the run in RUN goes on from its last checkpoint, with the overrides a resume
    allows (`max_steps`, `lr`, ...)."""
    if config is not None and not isinstance(config, dict):
        require_path("config", config, "a YAML file or a dict of config fields")
    if resume is not None:
        require_path("--resume", resume, "a run directory")
    trainer = trainer_for(config, overrides, resume)
    trainer.fit()
    return Path(trainer.config.out)


def trainer_for(config=None, overrides: dict | None = None, resume=None):
    """The method's Trainer for these settings (as `train` takes them), ready to `fit()`."""
    trainer_cls, settings = train_config(config, overrides or {}, resume)
    return trainer_cls(settings, resume=resume is not None)


def train_config(config=None, overrides: dict | None = None, resume=None):
    """(Trainer class, config): defaults < `config` (YAML file or dict) < `overrides`; or, with
    `resume`, the run's saved config with the overrides a resume allows."""
    from icot import config as cfg, paths
    from icot.methods import trainer_class

    if isinstance(config, dict):
        values, where = _plain(config), "config"
    else:
        values, where = (cfg.load_yaml(config), str(config)) if config is not None else ({}, "command line")
    values = cfg.merge(values, _plain(overrides or {}))
    if resume is not None:
        return _resumed_config(Path(resume), values)
    require("method", values.get("method", "explicit"), (str,), "a method name such as 'explicit' or 'stepwise'")
    trainer = trainer_class(values.get("method", "explicit"))
    settings = cfg.build(trainer.config_class, values, where)
    if config is not None and not isinstance(config, dict):  # --overwrite must not delete the config file
        paths.refuse_overlap(Path(settings.out), "--out", [config])
    return trainer, settings


def _plain(values: dict) -> dict:
    """Paths as strings, as YAML and the command line give them."""
    for key in values:
        require("config key", key, (str,), "a config field name")
    return {key: _plain(v) if isinstance(v, dict) else os.fspath(v) if isinstance(v, os.PathLike) else v
            for key, v in values.items()}


def _resumed_config(run: Path, changes: dict):
    """The run's own config; changes to fields not resumable (resumable_fields) are refused, the others announced."""
    from icot import config as cfg
    from icot.methods import trainer_class

    saved = run / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{run}: not a run directory (no config.yaml)")
    values = {**cfg.load_yaml(saved), "out": str(run)}  # the run continues where it is now
    trainer = trainer_class(values.get("method", "explicit"))
    before = cfg.build(trainer.config_class, values, str(saved))
    config = cfg.build(trainer.config_class, cfg.merge(values, changes), "command line")
    changed = changed_fields(cfg.to_dict(before), cfg.to_dict(config))
    allowed = resumable_fields()
    refused = [key for key in changed if key.rsplit(".", 1)[-1] not in allowed]
    if refused:
        key = refused[0]
        old, new = changed[key]
        raise UserError(f"--{key.replace('_', '-')} {new}: {run} was trained with {key} {old}, and a resume continues "
                        f"the same run; it may change only {', '.join(sorted(allowed))} (start a new run for the rest)")
    if changed:
        warn(f"resuming {run} with " + ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items()))
    return trainer, config


def resumable_fields() -> set[str]:
    """What a resumed run may change, by field name (a section's field by its own: `teacher.lr` is
    `lr`): the fields of the methods' configs declared `resumable=True`, those of how long, how fast
    and how often it trains, logs, validates, saves and (stepwise) rewinds, and where it reports.
    Anything else (method, data, model, batch, seed, out, ...) would make it another run."""
    from icot import config as cfg
    from icot.methods import trainers

    return cfg.resumable(*(trainer.config_class for trainer in trainers().values()))


def changed_fields(before: dict, after: dict, prefix: str = "") -> dict:
    """{dotted key: (old, new)} of the values that differ; a path spelled another way is no change."""
    changed = {}
    for key, new in after.items():
        old = before.get(key)
        if isinstance(new, dict) and isinstance(old, dict):
            changed.update(changed_fields(old, new, f"{prefix}{key}."))
        elif old != new and not _same_path(old, new):
            changed[prefix + key] = (old, new)
    return changed


def _same_path(a, b) -> bool:
    return isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


# ----- using a trained model -----------------------------------------------------------------------

def push(model_dir, repo_id: str, private: bool = False) -> str:
    """Upload a saved model directory (RUN/best: weights, tokenizer, icot.json, model card) to the
    Hugging Face Hub as model repository `repo_id` (created if needed); returns its URL. Needs a
    Hub login (`hf auth login` or HF_TOKEN)."""
    from icot.models import METADATA, check_tokenizer_files
    from icot.paths import check_local_dir

    require_path("model_dir", model_dir, "a saved model directory (RUN/best)")
    require("repo_id", repo_id, (str,), "a Hub repository id, e.g. 'user/mult4x4-stepwise'")
    folder = Path(model_dir)
    check_local_dir(str(folder), "model")
    check_tokenizer_files(str(folder))
    for name in (METADATA, "README.md", "config.json"):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: no {name}; expected a model directory icot saved (RUN/best)")
    return _upload(folder, repo_id, private)


def _upload(folder: Path, repo_id: str, private: bool) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload {folder.name} (implicit-cot)")
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"push {repo_id}: the Hub refused or could not be reached ({first})") from None
    return str(url)


def load(model_dir, device=None) -> "Model":
    """A trained model (a directory icot saved, e.g. RUN/best, or any Hugging Face causal LM) ready
    to answer. `device`: 'cpu', 'cuda', 'cuda:1', ... (default: a GPU if there is one)."""
    import torch

    from icot.methods import load_predictor

    require_path("--model", model_dir, "a model directory (e.g. RUN/best) or a Hugging Face model id")
    require("--device", device, (str, Integral, torch.device, type(None)), "'cpu', 'cuda' or 'cuda:N'")
    return Model(str(model_dir), load_predictor(model_dir, device=resolve_device(device)))


class Model:
    """A trained model: `predict` answers one question, `evaluate` scores a data set."""

    def __init__(self, path: str, predictor):
        from icot.evaluate import Predictor
        from icot.models import read_metadata

        require("Model path", path, (str, os.PathLike), "a model directory (icot.load(MODEL_DIR) makes a Model)")
        require("Model predictor", predictor, (Predictor,), "a Predictor (icot.load(MODEL_DIR) makes a Model)")
        self.path, self.predictor = path, predictor
        self.metadata = read_metadata(path) if Path(path).is_dir() else {}  # icot.json: how it was trained

    def predict(self, question: str) -> str:
        """The answer; a multiplication, typed `907*555` or as in the data (`7 0 9 * 5 5 5`), is
        answered in ordinary digit order: '503385'."""
        return self.generate(question).ordinary_answer

    def generate(self, question: str):
        """Everything the model writes for `question`: an icot.predict.Prediction (its CoT, its
        answer as written, and `.line()`, `.papers_line()` as `icot predict` prints them)."""
        from icot.answers import AnswerMatcher
        from icot.data.format import Example
        from icot.data.mult import describe_task
        from icot.predict import predict

        require("question", question, (str,), "a question such as '12*34'")
        if len(question.splitlines()) > 1:
            raise UserError(f"question {question!r}: holds a line break; expected one question (predict each on its own)")
        matcher = AnswerMatcher(self.metadata.get("answer_match", "normalized"))  # its verdict is icot eval's
        prediction = predict(self.predictor, question, matcher=matcher)  # first: a question the model cannot read is an error
        self.warn_other_task(describe_task([Example(prediction.question, "", "")]), f"'{question}'")
        return prediction

    def evaluate(self, data, max_examples: int | None = None, batch_size: int = 64, max_new_tokens: int | None = None,
                 answer_match: str | None = None, split: str | None = None, columns: dict | None = None) -> dict:
        """Accuracy and speed on `data` (a data file, directory, saved dataset or hf:NAME[:CONFIG], as
        `icot train --data` takes them, or a list of icot.data.Example): the metrics `icot eval`
        prints, with every prediction under 'predictions'. `split`: which split of data with splits
        (default test); `columns`: the column mapping ({'question': 'problem', ...}: icot.data.sources.
        Columns). Answers are compared as the model's training validated them, unless `answer_match`
        ('normalized', 'exact') says."""
        from icot.answers import AnswerMatcher
        from icot.data.layout import check_fits, encode
        from icot.data.mult import describe_task
        from icot.evaluate import check_known_tokens, evaluate
        from icot.models import max_positions

        _check_eval_arguments(data, max_examples, batch_size, max_new_tokens, answer_match)
        check_eval_settings(batch_size, max_examples, max_new_tokens)
        answer_match = answer_match or self.metadata.get("answer_match") or "normalized"
        matcher = AnswerMatcher(answer_match)  # an unknown mode fails here, before any work
        named = isinstance(data, (str, os.PathLike))
        chosen = _read_eval_data(data, split, columns) if named else None
        examples = (chosen.examples if named else list(data))[:max_examples]
        where = chosen.label if named else f"{len(examples)} examples"
        if not examples:
            raise UserError(f"{where}: no example to evaluate")
        encoded = encode(self.predictor.tokenizer, self.predictor.layout, examples)
        check_fits(encoded, max_positions(self.predictor.model), where)
        check_known_tokens(self.predictor.tokenizer, encoded, where, numbered_lines=named and chosen.lines)
        self.warn_other_task(describe_task(examples), where)
        result = evaluate(self.predictor, encoded, batch_size, max_new_tokens, matcher)
        return {"model": self.path, "data": where, "batch_size": batch_size, "answer_match": answer_match,
                **result.metrics(), "predictions": result.predictions}

    def warn_other_task(self, task: dict, what: str) -> None:
        """Data of another task or size than the model learned (its icot.json says which) is answered
        without complaint, and wrongly: say so."""
        from icot.data.mult import task_label

        trained, given = task_label(self.metadata), task_label(task)
        mixed = any(label and label.startswith("mixed") for label in (trained, given))  # sizes vary: no telling
        if trained and given and trained != given and not mixed:
            warn(f"{what} is {given}, but {self.path} was trained on {trained}; expect wrong answers")


def require(flag: str, value, types: tuple, expected: str) -> None:
    """An argument of another type than `types` (a bool is no int) is refused as the command refuses
    a bad value: `--flag VALUE: expected ..., got TYPE`."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise UserError(f"{flag} {shown}: expected {expected}, got {type(value).__name__}")


def require_path(flag: str, value, expected: str) -> None:
    """A str or os.PathLike naming something: not empty."""
    require(flag, value, (str, os.PathLike), expected)
    if not str(os.fspath(value)).strip():
        raise UserError(f"{flag} {str(value)!r}: empty; expected {expected}")


def _check_generate_mult_arguments(digits, out, counts: dict, seed, exclude, overwrite) -> None:
    require("--digits", digits, (str,), "AxB, e.g. '4x4'")
    require_path("--out", out, "a directory for the data files")
    for name, count in {**counts, "seed": seed}.items():
        require(f"--{name}", count, (Integral,), "a whole number")
    require("--exclude", exclude, (list, tuple, set, frozenset), "a list of data files")
    for path in exclude:
        require_path("--exclude", path, "a data file")
    require("--overwrite", overwrite, (bool,), "True or False")


def _read_eval_data(data, split: str | None, columns: dict | None):
    """The split of `data` to evaluate on (sources.Split), the column mapping built as a config's is."""
    from icot import config as cfg
    from icot.data.sources import Columns, read_split

    require("split", split, (str, type(None)), "a split name such as 'test' (or None)")
    require("columns", columns, (dict, type(None)), "a dict such as {'question': 'problem'} (or None)")
    return read_split(data, cfg.build(Columns, columns or {}, "columns"), split)


def _check_eval_arguments(data, max_examples, batch_size, max_new_tokens, answer_match) -> None:

    if isinstance(data, (str, os.PathLike)):
        require_path("--data", data, "a data file or directory, or hf:NAME[:CONFIG]")
    else:
        require("--data", data, (list, tuple), "a data file or a list of icot.data.Example")
        for number, item in enumerate(data, 1):
            _check_example(number, item)
    require("--batch-size", batch_size, (Integral,), "a whole number")
    for flag, value in (("--max-examples", max_examples), ("--max-new-tokens", max_new_tokens)):
        require(flag, value, (Integral, type(None)), "a whole number (or None)")
    require("--answer-match", answer_match, (str, type(None)), "'normalized' or 'exact' (or None)")


def _check_example(number: int, item) -> None:
    """An Example as a data file holds one: str fields, a question and an answer."""
    from icot.data.format import Example

    require("--data item", item, (Example,), "icot.data.Example")
    for name in ("question", "cot", "answer"):
        require(f"--data item {number} {name}", getattr(item, name), (str,), "text (a str)")
    for name in ("question", "answer"):
        if not getattr(item, name).strip():
            raise UserError(f"--data item {number}: empty {name}; expected Example(question, cot, answer) with a "
                            f"question and an answer")


def check_eval_settings(batch_size: int, max_examples: int | None, max_new_tokens: int | None) -> None:
    for flag, value in (("--batch-size", batch_size), ("--max-examples", max_examples), ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")


def resolve_device(name=None):
    """A torch device that works here: `name` ('cpu', 'cuda:0', a torch.device), or a GPU if there is one."""
    import torch

    if name is None or name == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # a backend this build or machine lacks fails here
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        here = "cpu, cuda" if torch.cuda.is_available() else "cpu (no CUDA here)"
        raise UserError(f"--device {name}: not usable here ({str(e).splitlines()[0]}); expected {here}") from None
    if device.type == "meta":
        raise UserError(f"--device {name}: holds no data; expected cpu or cuda")
    return device
