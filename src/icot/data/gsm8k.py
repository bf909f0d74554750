"""GSM8K in its official shape (JSONL records `question`, `answer`: a worked solution that
ends in `#### N`) converted to the papers' format `question||cot #### N`.

The CoT is the solution's calculator annotations `<<expr=value>>` joined by single spaces;
the question is stripped at both ends and otherwise kept as written (double spaces, U+2028,
curly quotes), as in the papers' own files (data/reference/gsm8k/test.txt, valid.txt). The
answer is N with its thousands separators removed (`2,125` -> `2125`); the papers' files
keep them as written, which `keep_commas` reproduces byte for byte.

Records come from a local JSONL file or, with `hf:NAME[:CONFIG[:SPLIT]]`, from the Hugging
Face hub through the optional `datasets` library.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from icot.data.format import Example, format_line, json_lines, parse_line
from icot.errors import UserError, located

HUB_PREFIX = "hf:"
ANSWER_MARK = "####"
RECORD_SHAPE = "a GSM8K record: an object with 'question' and 'answer' (a solution ending in '#### N')"
# An annotation never spans lines; `.+?` (not the papers' `[^>]+`) also keeps a `>` inside one.
ANNOTATION = re.compile(r"<<.+?>>")
NUMBER = re.compile(r"-?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?")
LINE_BREAK = re.compile(r"\s*[\r\n]+\s*")


@dataclass
class Record:
    """One input record and where it came from (file and line, or hub dataset and row)."""

    source: str
    number: int
    fields: dict


@dataclass
class Conversion:
    """Converted examples and what happened to the records that were not clean.

    Each list holds the line (or row) numbers of the records in that group.
    """

    records: int = 0
    examples: list[Example] = field(default_factory=list)
    no_annotations: list[int] = field(default_factory=list)
    non_numeric_answers: list[int] = field(default_factory=list)
    no_answers: list[int] = field(default_factory=list)
    joined_line_breaks: list[int] = field(default_factory=list)
    excluded: list[int] = field(default_factory=list)
    commas_removed: int = 0


def solution_cot(solution: str) -> str:
    """The calculator annotations of a worked solution, joined by single spaces."""
    return " ".join(ANNOTATION.findall(solution))


def final_answer(solution: str) -> str | None:
    """The text after the last `####` (None without one, or when it is empty or spans lines)."""
    if ANSWER_MARK not in solution:
        return None
    answer = solution.rpartition(ANSWER_MARK)[2].strip()
    return answer if answer and "\n" not in answer else None


def is_number(answer: str) -> bool:
    return NUMBER.fullmatch(answer) is not None


def convert_records(records, total: int | None = None, keep_incomplete: bool = True, keep_commas: bool = False,
                    line_format: bool = True, exclude: frozenset[str] = frozenset()) -> Conversion:
    """Convert records; those without annotations or with a non-numeric answer are kept
    (empty CoT / answer as written) or dropped; records without an answer, or whose question
    is in `exclude`, are dropped."""
    result = Conversion()
    for record in tqdm(records, total=total, desc="converting", unit="rec", leave=False,
                       disable=total is not None and total < 50_000):
        result.records += 1
        example = _convert(record, result, keep_incomplete, keep_commas, exclude)
        if example is None:
            continue
        if line_format:
            _check_representable(example, record)
        result.examples.append(example)
    return result


def _convert(record: Record, result: Conversion, keep_incomplete: bool, keep_commas: bool,
             exclude: frozenset[str]) -> Example | None:
    question, solution = _text_fields(record)
    if LINE_BREAK.search(question):
        result.joined_line_breaks.append(record.number)
        question = LINE_BREAK.sub(" ", question)
    if question in exclude:
        result.excluded.append(record.number)
        return None
    answer = final_answer(solution)
    if answer is None:
        result.no_answers.append(record.number)
        return None
    if not is_number(answer):
        result.non_numeric_answers.append(record.number)
        if not keep_incomplete:
            return None
    elif "," in answer and not keep_commas:
        answer = answer.replace(",", "")
        result.commas_removed += 1
    cot = solution_cot(solution)
    if not cot:
        result.no_annotations.append(record.number)
        if not keep_incomplete:
            return None
    return Example(question, cot, answer)


def _text_fields(record: Record) -> tuple[str, str]:
    values = []
    for name in ("question", "answer"):
        value = record.fields.get(name)
        if value is None:
            raise _error(record, f"missing field '{name}'; expected {RECORD_SHAPE}")
        if not isinstance(value, str):
            raise _error(record, f"field '{name}' must be a string, got {type(value).__name__}; expected {RECORD_SHAPE}")
        values.append(value.strip())
    if not values[0]:
        raise _error(record, f"empty field 'question'; expected {RECORD_SHAPE}")
    return values[0], values[1]


def _check_representable(example: Example, record: Record) -> None:
    """A question or annotation containing `||` or `####` cannot be written as one line."""
    try:
        same = parse_line(format_line(example), record.source, record.number) == example
    except UserError:
        same = False
    if not same:
        raise _error(record, "its text contains '||' or '####', which the line format cannot hold; "
                             "write JSONL instead (--out FILE.jsonl)")


def _error(record: Record, message: str) -> UserError:
    if record.source.startswith(HUB_PREFIX):
        return UserError(f"{record.source} row {record.number}: {message}")
    return located(record.source, record.number, message)


# ----- sources ------------------------------------------------------------------------------

def read_jsonl_records(path) -> tuple[list[Record], int]:
    """Every record of a JSONL file (blank lines skipped), with its line number."""
    path = Path(path)
    records = [Record(str(path), number, fields) for number, fields in json_lines(path, RECORD_SHAPE)]
    if not records:
        raise UserError(f"{path}: empty file, expected GSM8K records, one JSON object per line")
    return records, len(records)


@dataclass(frozen=True)
class HubSpec:
    """`hf:NAME[:CONFIG[:SPLIT]]`, e.g. `hf:openai/gsm8k:main:test`."""

    name: str
    config: str | None = None
    split: str | None = None

    @classmethod
    def parse(cls, text: str) -> "HubSpec":
        parts = text[len(HUB_PREFIX):].split(":")
        if not parts[0] or len(parts) > 3:
            raise UserError(f"'{text}': expected hf:NAME[:CONFIG[:SPLIT]], e.g. hf:openai/gsm8k:main:test")
        parts += [""] * (3 - len(parts))
        return cls(parts[0], parts[1] or None, parts[2] or None)

    def __str__(self) -> str:
        return ":".join([HUB_PREFIX + self.name, self.config or "", self.split or ""]).rstrip(":")


def read_hub_records(text: str) -> tuple[Iterable[Record], int]:
    spec = HubSpec.parse(text)
    return _dataset_records(spec, _load_hub_split(spec))


def _dataset_records(spec: HubSpec, dataset) -> tuple[Iterable[Record], int]:
    missing = [name for name in ("question", "answer") if name not in dataset.column_names]
    if missing:
        raise UserError(f"{spec}: no column {', '.join(repr(m) for m in missing)} "
                        f"(columns: {', '.join(dataset.column_names)}); expected GSM8K's question and answer")
    records = (Record(str(spec), row, fields) for row, fields in enumerate(dataset, 1))
    return records, len(dataset)


def hub_dataset_spec(text: str) -> HubSpec:
    """A whole dataset for training, `hf:NAME[:CONFIG]`: no split named."""
    spec = HubSpec.parse(text)
    if spec.split is not None:
        raise UserError(f"data: {text}: give the dataset without a split (hf:NAME[:CONFIG]); "
                        "its train, validation and test splits are all used")
    return spec


def _load_hub_split(spec: HubSpec):
    loaded = load_hub(spec)
    if isinstance(loaded, dict):  # a DatasetDict: no split was named
        if len(loaded) != 1:
            example = HubSpec(spec.name, spec.config, next(iter(loaded)))
            raise UserError(f"{spec} has splits {', '.join(loaded)}; name one, e.g. {example}")
        loaded = next(iter(loaded.values()))
    return loaded


def load_hub(spec: HubSpec):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{spec}: reading from the Hugging Face hub needs the optional 'datasets' library "
                        "(pip install 'implicit-cot[hub]'); or download the JSONL and pass --input FILE.jsonl") from None
    from huggingface_hub.utils import logging as hub_logging

    # Keep the hub client's retry chatter and the progress bars off the terminal: a failure is reported in one line.
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    hub_logging.set_verbosity_error()
    try:
        loaded = datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except Exception as e:  # datasets raises many types (connection, not found, bad config); all mean "cannot load"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {spec} with datasets: {first}; without a reachable hub, download its "
                        "records elsewhere and pass the file (JSONL, CSV or parquet)") from None
    return loaded


def read_records(source: str) -> tuple[Iterable[Record], int]:
    """(records, how many) from a JSONL file or `hf:NAME[:CONFIG[:SPLIT]]`."""
    if source.startswith(HUB_PREFIX):
        return read_hub_records(source)
    return read_jsonl_records(source)


# ----- summary ------------------------------------------------------------------------------

def summary(conversion: Conversion, source: str, out, keep_incomplete: bool) -> list[str]:
    """Lines telling the user what was written and what happened to every unclean record."""
    kept_or_dropped = "kept with an empty CoT" if keep_incomplete else "dropped"
    lines = [f"{out}: {len(conversion.examples)} examples from {conversion.records} records of {source}"]
    groups = [
        (conversion.no_annotations, "without <<...>> annotations", kept_or_dropped),
        (conversion.non_numeric_answers, "whose answer is not a number",
         "kept as written" if keep_incomplete else "dropped"),
        (conversion.no_answers, "without a '#### N' answer", "dropped"),
        (conversion.joined_line_breaks, "with line breaks in the question", "joined with single spaces"),
        (conversion.excluded, "whose question is in an --exclude file", "dropped"),
    ]
    unit = "row" if source.startswith(HUB_PREFIX) else "line"
    for numbers, what, action in groups:
        if numbers:
            lines.append(f"  {_count(len(numbers), 'record')} {what}: {action} ({unit} {_first(numbers)})")
    if conversion.commas_removed:
        lines.append(f"  thousands separators removed from {_count(conversion.commas_removed, 'answer')} "
                     "(--keep-commas keeps them)")
    if keep_incomplete and (conversion.no_annotations or conversion.non_numeric_answers):
        lines.append("  --incomplete drop drops records without annotations or with a non-numeric answer")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _first(numbers: list[int], shown: int = 5) -> str:
    text = ", ".join(map(str, numbers[:shown]))
    return text + (", ..." if len(numbers) > shown else "")
