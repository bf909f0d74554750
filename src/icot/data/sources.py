"""Data from any source the `datasets` library reads, as the splits of `Example`s.

A source is a file (the papers' line format `.txt`, read by our exact reader with file:line errors;
`.jsonl`/`.json`, `.csv` or `.parquet`, read through `datasets`), a directory of such files named
train, valid (or validation) and test, a directory written by `datasets`' `save_to_disk` (one
dataset or a dataset dict), or a hub dataset `hf:NAME[:CONFIG]`. A single file or dataset may name
each row's split in a column (`split`, values train, valid, validation, test).

`Columns` maps the records' fields: a question, a CoT and an answer column, or a GSM8K-style
answer whose text holds the worked steps and ends in `#### N` (the CoT is then its calculator
annotations, as `icot data gsm8k` converts it). A row whose question or answer is empty or
missing is an error naming the source and row (rows counted from 1, a CSV's header not counted);
an empty or missing CoT is an example without a CoT, as `question|| #### answer` is.

`datasets` is imported only when a source needs it: `import icot.data` stays quick.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from icot.config import choice, option
from icot.data.format import Example, json_lines, read_examples, read_text
from icot.errors import UserError

HUB_PREFIX = "hf:"
# split names as files, dataset dicts and split columns write them, and the run's
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}
SPLITS = ("train", "valid", "test")
# the suffixes of a split's file in a data directory, in the order a directory's files are looked up
SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
KINDS = {"json": "JSON lines", "csv": "CSV", "parquet": "parquet"}


@dataclass
class Columns:
    """Which field of a record is the question, the CoT and the answer (files other than the
    line format, saved datasets, hub datasets)."""

    question: str = option("question", help="the column holding the question (the model's input)")
    cot: str | None = option(None, help="the column holding the chain of thought (text, or a list of steps joined "
                                        "by spaces); null: 'cot' when the data has it, else none")
    answer: str = option("answer", help="the column holding the answer (with answer_format gsm8k: the worked "
                                        "solution ending in '#### N')")
    answer_format: str = choice("auto", "plain", "gsm8k", default="auto",
                                help="plain: the answer column is the answer; gsm8k: it is a worked solution whose "
                                     "<<...>> annotations are the CoT and whose text after '####' is the answer; "
                                     "auto: gsm8k when there is no CoT column and the first answer holds '####'")
    split: str = option("split", help="in a single file or dataset, the column naming each row's split (train, "
                                      "valid, validation, test), if it has one")


@dataclass
class Split:
    """The examples of one split and what to call them in messages (a file, or `SOURCE (split NAME)`)."""

    label: str
    examples: list[Example] = field(repr=False)
    lines: bool = False  # whether example n is line n of the file `label` (the line format)


def is_hub(source) -> bool:
    return source is not None and str(source).startswith(HUB_PREFIX) and not Path(source).exists()


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `save_to_disk`: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def split_files(folder: Path) -> dict[str, Path | None]:
    """The files of each split in a data directory: train, valid or validation, test, with the first
    suffix of SUFFIXES found."""
    found = {}
    for split in SPLITS:
        stems = [name for name, ours in SPLIT_NAMES.items() if ours == split]
        candidates = [folder / f"{stem}{suffix}" for suffix in SUFFIXES for stem in stems]
        found[split] = next((c for c in candidates if c.exists()), None)
    return found


def read_splits(source, columns: Columns) -> dict[str | None, Split]:
    """The splits of `source` by the run's names (train, valid, test); a source with no splits (one
    file or dataset without a split column) is the one entry None."""
    source = str(source)
    if is_hub(source):
        return _dataset_splits(source, _load_hub(source), columns)
    path = Path(source)
    if is_saved_dataset(path):
        return _dataset_splits(source, _load_saved(path), columns)
    if path.is_dir():
        files = split_files(path)
        if not any(files.values()):
            raise UserError(f"{path}: no data file in it (expected train, valid and test files ending in "
                            f"{', '.join(SUFFIXES)}, or a directory written by datasets' save_to_disk)")
        return {split: read_file(file, columns) for split, file in files.items() if file is not None}
    if path.suffix == ".txt" or path.suffix not in BUILDERS:
        return {None: read_file(path, columns)}
    return _dataset_splits(source, _load_file(path), columns)


def read_file(path, columns: Columns) -> Split:
    """One file's examples, whatever its format (a split column, if any, is not read)."""
    path = Path(path)
    if path.suffix not in BUILDERS or _plain_jsonl_without_datasets(path, columns):
        return Split(str(path), read_examples(path), lines=True)
    examples = to_examples(_load_file(path), columns, str(path))
    return Split(str(path), examples, lines=_one_record_a_line(path, len(examples)))


def _one_record_a_line(path: Path, rows: int) -> bool:
    """Whether row n of a file read through `datasets` is its line n: JSONL without blank lines."""
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return False
    lines = read_text(path).splitlines()
    return len(lines) == rows and all(line.strip() for line in lines)


def _plain_jsonl_without_datasets(path: Path, columns: Columns) -> bool:
    """JSONL with the default columns is read by our own reader where `datasets` is not installed, as
    before it was read through `datasets`."""
    from importlib.util import find_spec

    return path.suffix in (".jsonl", ".json") and columns == Columns() and find_spec("datasets") is None


def read_split(source, columns: Columns, split: str | None) -> Split:
    """The examples of one split of `source` (by any of its names: valid or validation); `split`
    None takes a source without splits whole, else its test split."""
    splits = read_splits(source, columns)
    if None in splits and split is None:
        return splits[None]
    wanted = SPLIT_NAMES.get(split, split) if split is not None else "test"
    if wanted not in splits:
        have = ", ".join(s for s in splits if s) or "none (no split column)"
        raise UserError(f"{source}: no '{split or 'test'}' split (splits: {have}); name one that is there")
    return splits[wanted]


def read_run_data(data, files: dict[str, str | None], columns: Columns) -> dict[str, Split | None]:
    """A run's train, valid and test splits: those of `data` (any source; one without splits is the
    training split), each replaced by its file in `files` where one is given."""
    splits = read_splits(data, columns) if data is not None else {}
    if None in splits:
        splits["train"] = splits.pop(None)
    for split, path in files.items():
        if path is not None:
            splits[split] = read_file(path, columns)
    if "train" not in splits:
        raise UserError(f"data: {data}: no training split (a train file, a dataset dict's 'train', or rows whose "
                        "split is train); give one, or train_file")
    return {split: splits.get(split) for split in SPLITS}


# ----- records to examples ---------------------------------------------------------------------

def to_examples(dataset, columns: Columns, where: str, rows: list[int] | None = None) -> list[Example]:
    """A `datasets.Dataset`'s records as Examples by the column mapping; `rows`: each record's row
    number in its source, for messages (default 1, 2, ...)."""
    names = dataset.column_names
    question = _column(columns.question, "question", names, where)
    answer = _column(columns.answer, "answer", names, where)
    cot = _column(columns.cot, "cot", names, where) if columns.cot is not None else ("cot" if "cot" in names else None)
    rows = rows or list(range(1, len(dataset) + 1))
    questions, answers = list(dataset[question]), list(dataset[answer])
    if _is_gsm8k(columns.answer_format, cot, answers, where):
        return _gsm8k_examples(questions, answers, rows, where)
    cots = list(dataset[cot]) if cot is not None else [""] * len(rows)
    return [Example(_text(q, question, where, row), _cot_text(c, cot, where, row), _text(a, answer, where, row))
            for q, c, a, row in zip(questions, cots, answers, rows)]


def _column(name: str, role: str, names: list[str], where: str) -> str:
    if name not in names:
        raise UserError(f"{where}: no column '{name}' for the {role} (columns: {', '.join(names)}); "
                        f"map it with --columns.{role} NAME")
    return name


def _is_gsm8k(answer_format: str, cot: str | None, answers: list, where: str) -> bool:
    if answer_format == "gsm8k" and cot is not None:
        raise UserError(f"{where}: columns.answer_format gsm8k takes the CoT from the answer's annotations, but "
                        f"column '{cot}' is mapped to the CoT; drop one of them")
    if answer_format == "auto":
        return cot is None and bool(answers) and isinstance(answers[0], str) and "####" in answers[0]
    return answer_format == "gsm8k"


def _gsm8k_examples(questions: list, solutions: list, rows: list[int], where: str) -> list[Example]:
    """GSM8K-style records through `icot data gsm8k`'s converter: every record must end in '#### N'."""
    from icot.data.gsm8k import Record, convert_records

    records = [Record(where, row, {"question": q, "answer": a}) for q, a, row in zip(questions, solutions, rows)]
    conversion = convert_records(records, len(records), line_format=False)
    if conversion.no_answers:
        raise UserError(f"{where} row {conversion.no_answers[0]}: the answer has no '#### N' at its end (as GSM8K's "
                        f"worked solutions have); {len(conversion.no_answers)} of {len(records)} records lack one")
    return conversion.examples


def _text(value, column: str, where: str, row: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        what = "nothing (null)" if value is None else f"a {type(value).__name__}"
        raise UserError(f"{where} row {row}: column '{column}' holds {what}; expected text")
    text = str(value).strip()
    if not text:
        raise UserError(f"{where} row {row}: column '{column}' is empty; every example needs a question and an answer")
    return text


def _cot_text(value, column: str | None, where: str, row: int) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, list) and all(isinstance(step, str) for step in value):
        return " ".join(step.strip() for step in value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where} row {row}: column '{column}' holds a {type(value).__name__}; expected text or a "
                        "list of steps")
    return str(value).strip()


def _dataset_splits(source: str, loaded, columns: Columns) -> dict[str | None, Split]:
    """A Dataset (split by its split column, if any) or a DatasetDict (by its split names)."""
    if not isinstance(loaded, dict):  # a DatasetDict is a dict of its splits
        return _split_by_column(source, loaded, columns)
    splits = {}
    for name, dataset in loaded.items():
        if name in SPLIT_NAMES:
            label = f"{source} (split {name})"
            splits[SPLIT_NAMES[name]] = Split(label, to_examples(dataset, columns, label))
    if "train" not in splits:
        raise UserError(f"{source}: no 'train' split (splits: {', '.join(loaded)}); expected train and, "
                        "optionally, validation and test")
    return splits


def _split_by_column(source: str, dataset, columns: Columns) -> dict[str | None, Split]:
    for name, role in ((columns.question, "question"), (columns.answer, "answer"), (columns.cot, "cot")):
        if name is not None:  # a mapping that matches nothing is said of the file, before any split
            _column(name, role, dataset.column_names, source)
    if columns.split not in dataset.column_names:
        examples = to_examples(dataset, columns, source)
        return {None: Split(source, examples, lines=_one_record_a_line(Path(source), len(examples)))}
    rows: dict[str, list[int]] = {}
    for row, value in enumerate(dataset[columns.split], 1):
        if value not in SPLIT_NAMES:
            raise UserError(f"{source} row {row}: column '{columns.split}' holds {value!r}; expected train, valid, "
                            "validation or test (set --columns.split to name another column)")
        rows.setdefault(SPLIT_NAMES[value], []).append(row)
    if "train" not in rows:
        raise UserError(f"{source}: no row of split 'train' in column '{columns.split}'")
    return {split: Split(label := f"{source} (split {split})",
                         to_examples(dataset.select([r - 1 for r in numbers]), columns, label, numbers))
            for split, numbers in rows.items()}


# ----- loading through datasets ------------------------------------------------------------------

def _datasets(what: str):
    """The `datasets` library, quiet: its progress bars and log lines never reach the terminal (a
    failure is reported in one line)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what}: reading it needs the optional 'datasets' library (pip install "
                        "'implicit-cot[data]'); the line format (.txt) needs nothing") from None
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    return datasets


def _load_file(path: Path):
    """A JSONL, CSV or parquet file as one Dataset, held in memory: its cache goes to a temporary
    directory, removed at once, so reading a file writes nothing."""
    if path.suffix == ".parquet":
        _check_file(path)
    else:
        read_text(path)  # refuses a missing, binary or non-UTF-8 file, or a device, in one line
    builder = BUILDERS[path.suffix]
    datasets = _datasets(str(path))
    options = _csv_options(path, datasets) if builder == "csv" else {}
    with tempfile.TemporaryDirectory(prefix="icot-datasets-") as cache:
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True, **options)
        except Exception as e:  # datasets raises many types (pyarrow's, its own, pandas'); all mean "unreadable"
            if builder == "json":  # pyarrow's reader says what failed, not where
                for _ in json_lines(path, "a JSON object"):
                    pass
            raise UserError(f"{path}: not readable as {KINDS[builder]} ({_first_line(e)})") from None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file; expected a data file")


def _csv_options(path: Path, datasets) -> dict:
    """Every CSV column read as text, an empty cell as the empty string (pandas would read `007` as
    the number 7 and an empty cell or `NA` as missing)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise UserError(f"{path}: empty file, expected a header line naming the columns")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False, "na_filter": False}


def _load_saved(path: Path):
    datasets = _datasets(str(path))
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged or partial directory: datasets raises several types
        raise UserError(f"{path}: not readable as a saved dataset ({_first_line(e)})") from None


def write_splits(splits: dict[str, Split], folder: Path) -> dict[str, Path]:
    """Each split into folder/SPLIT.txt (the line format), or SPLIT.jsonl when a text holds '||',
    '####' or a line break, which the line format cannot: the run keeps the data it trained on."""
    from icot.data.format import format_line, parse_line, write_examples

    def fits_a_line(example: Example) -> bool:
        try:
            return "\n" not in format_line(example) and parse_line(format_line(example), "", 0) == example
        except UserError:
            return False

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, split in splits.items():
        suffix = ".txt" if all(map(fits_a_line, split.examples)) else ".jsonl"
        written[name] = folder / f"{name}{suffix}"
        write_examples(written[name], split.examples)
    return written


def _load_hub(source: str):
    """`hf:NAME[:CONFIG]`: every split of the hub dataset (downloaded into the hub's cache)."""
    from icot.data.gsm8k import hub_dataset_spec, load_hub

    return load_hub(hub_dataset_spec(source))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
