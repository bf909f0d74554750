"""The papers' line format `input||cot #### answer`, and JSONL with the same three fields.

Readers are strict: every malformed line is reported with its file and line number.
CRLF line endings, a final newline and blank lines at the end of a file are accepted.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from icot.errors import UserError, located
from icot.paths import replacing

LINE_FORMAT = "'input||cot #### answer'"


@dataclass(frozen=True)
class Example:
    question: str
    cot: str
    answer: str


def format_line(example: Example) -> str:
    """One line; an empty CoT is written `input|| #### answer`, as in the papers' files."""
    return f"{example.question}||{example.cot} #### {example.answer}"


def parse_line(line: str, path, lineno: int) -> Example:
    if "||" not in line:
        raise located(path, lineno, f"no '||' between input and CoT; expected {LINE_FORMAT}")
    question, rest = line.split("||", 1)
    if "||" in rest:
        raise located(path, lineno, f"more than one '||'; expected {LINE_FORMAT}")
    if "####" not in rest:
        raise located(path, lineno, f"no '####' before the answer; expected {LINE_FORMAT}")
    cot, answer = rest.split("####", 1)
    question, cot, answer = question.strip(), cot.strip(), answer.strip()
    if not question:
        raise located(path, lineno, f"empty input before '||'; expected {LINE_FORMAT}")
    if not answer:
        raise located(path, lineno, f"empty answer after '####'; expected {LINE_FORMAT}")
    if "####" in answer:
        raise located(path, lineno, f"more than one '####'; expected {LINE_FORMAT}")
    return Example(question, cot, answer)


def json_lines(path: Path, expected: str) -> Iterator[tuple[int, dict]]:
    """Each non-blank line of a JSONL file as (line number, object); a line that is not a JSON object
    is a file:line error that says `expected` (what the object should be)."""
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise located(path, lineno, f"invalid JSON ({e.msg}); expected {expected}, one per line") from None
        if not isinstance(record, dict):
            raise located(path, lineno, f"expected {expected}, got a JSON {type(record).__name__}")
        yield lineno, record


def read_text(path: Path) -> str:
    """The UTF-8 text of a data file, without a leading byte-order mark; a missing, binary or
    non-UTF-8 file is a UserError, and so is what is not a regular file (a FIFO or a device such
    as /dev/zero would block or never end)."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a data file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file (a pipe or a device); expected a data file")
    with open(path, "rb") as f:  # a binary file, however large, is refused from its first megabyte
        if b"\0" in f.read(1 << 20):
            raise UserError(f"{path}: binary file, expected UTF-8 text in {LINE_FORMAT} or JSONL format")
    check_fits_in_memory(path)
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    if b"\0" in data:
        raise UserError(f"{path}: binary file, expected UTF-8 text in {LINE_FORMAT} or JSONL format")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise located(path, lineno, "not valid UTF-8 text") from None


def check_fits_in_memory(path: Path) -> None:
    """Reading and parsing a data file takes several times its size in memory: a file of more than
    a quarter of the machine's memory is refused before the system runs out."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): no limit known
        return
    size = path.stat().st_size
    if size > memory // 4:
        raise UserError(f"{path}: {size / 1e9:.1f} GB, more than a quarter of this machine's {memory / 1e9:.0f} GB of "
                        "memory, which reading it needs several times over; expected a smaller file (split it)")


def _content_lines(text: str, path: Path):
    """(line number, line) for every line, refusing blank lines except at the end."""
    # Only \n ends a line: GSM8K questions contain U+2028, which str.splitlines() would split on.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UserError(f"{path}: empty file, expected at least one example")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            raise located(path, lineno, f"blank line; expected {LINE_FORMAT}")
        yield lineno, line


def _field_text(value, name: str, path, lineno: int) -> str:
    if isinstance(value, bool) or value is None:
        raise located(path, lineno, f"field '{name}' must be a string")
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        raise located(path, lineno, f"field '{name}' must be a string")
    return value.strip()


def parse_json_record(line: str, path, lineno: int) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise located(path, lineno, f"invalid JSON ({e.msg}); expected an object with question, cot, answer") from None
    if not isinstance(record, dict):
        raise located(path, lineno, "expected a JSON object with fields question, cot, answer")
    missing = [k for k in ("question", "answer") if k not in record]
    if missing:
        raise located(path, lineno, f"missing field {', '.join(missing)}; expected question, cot, answer")
    cot = record.get("cot", "")
    if isinstance(cot, list):
        if not all(isinstance(step, str) for step in cot):
            raise located(path, lineno, "field 'cot' must be a string or a list of strings")
        cot = " ".join(step.strip() for step in cot)
    example = Example(
        _field_text(record["question"], "question", path, lineno),
        _field_text(cot, "cot", path, lineno),
        _field_text(record["answer"], "answer", path, lineno),
    )
    if not example.question:
        raise located(path, lineno, "empty field 'question'")
    if not example.answer:
        raise located(path, lineno, "empty field 'answer'")
    return example


def is_hub_name(path) -> bool:
    return path is not None and str(path).startswith("hf:") and not Path(path).exists()


def refuse_hub_name(path) -> None:
    """`hf:NAME` is read by `icot data gsm8k` and by `icot train --data`: other paths are files on disk."""
    if is_hub_name(path):
        raise UserError(f"{path}: hub datasets are read by 'icot data gsm8k' (and 'icot train --data hf:NAME', "
                        f"'icot eval --data hf:NAME'); convert it to a file first: icot data gsm8k --input {path} --out FILE.txt")


def is_jsonl(path) -> bool:
    return str(path).endswith((".jsonl", ".json"))


def read_examples(path: str | os.PathLike) -> list[Example]:
    """Read a data file: JSONL if it ends in .jsonl/.json, else the line format."""
    refuse_hub_name(path)
    path = Path(path)
    parse = parse_json_record if is_jsonl(path) else parse_line
    return [parse(line, path, lineno) for lineno, line in _content_lines(read_text(path), path)]


def write_examples(path: str | os.PathLike, examples) -> None:
    """Write examples in the line format (or JSONL for a .jsonl path), one per line; the file
    appears only once whole (paths.replacing)."""
    path = Path(path)
    with replacing(path) as f:
        write_to(f, examples, is_jsonl(path))


def write_to(f, examples, jsonl: bool) -> None:
    """Examples into an open text file, as JSONL records or in the line format."""
    for example in examples:
        if jsonl:
            record = {"question": example.question, "cot": example.cot, "answer": example.answer}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            f.write(format_line(example) + "\n")
