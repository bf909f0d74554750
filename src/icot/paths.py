"""Where icot reads and writes: checks made before any work, and the --overwrite rule.

`--overwrite` replaces only what icot wrote: a directory it marked as its own (a run, a demo)
or the exact files a command is about to write. An output file is never an input file; a
directory icot replaces is never an input, never holds one or the current directory, and never
lies inside an input directory icot wrote.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from icot.errors import UserError

MARKER = ".icot"  # written into every run and demo directory icot creates


def mark_as_ours(folder: Path) -> None:
    (folder / MARKER).write_text("written by icot: --overwrite may replace this directory\n")


def is_ours(folder: Path) -> bool:
    """A directory icot wrote: its marker, or what a run from before the marker holds."""
    if (folder / MARKER).is_file() or (folder / "icot.json").is_file():  # icot.json: a saved model
        return True
    run_records = [folder / "metrics.jsonl", folder / "checkpoints", folder / "best" / "icot.json"]
    return (folder / "config.yaml").is_file() and any(p.exists() for p in run_records)


def is_local_path(name: str) -> bool:
    """A name that can only be a local path: ./, ../, ~ or / in front, several slashes, or a first
    component that exists here. Anything else (`gpt2`, `owner/name`) may be a hub id."""
    if name in (".", "..") or name.startswith(("./", "../", "~", "/", ".\\", "..\\")) or os.path.isabs(name):
        return True
    parts = name.replace("\\", "/").split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).exists())


def check_local_dir(name: str, what: str) -> None:
    """A local path given as a model or tokenizer must be an existing directory: say so at once
    instead of asking the hub (which retries for half a minute offline)."""
    path = Path(name).expanduser()
    if path.is_dir() or not (path.exists() or is_local_path(name)):
        return
    problem = "is a file" if path.exists() else "no such directory"
    raise UserError(f"{what} {name}: {problem}; expected a model directory (e.g. RUN/best) or a hub id")


def input_paths(config) -> list[Path]:
    """The existing paths a config reads: data, *_file, *_dir, model and tokenizer fields, nested ones included."""
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            found += input_paths(value)
        elif isinstance(value, str) and _names_a_path(f.name) and Path(value).exists():
            found.append(Path(value))
    return found


def _names_a_path(field: str) -> bool:
    return field in ("data", "model", "tokenizer") or field.endswith(("_file", "_dir"))


def refuse_overlap(out: Path, flag: str, inputs) -> None:
    """`out` is not an input and does not hold one (replacing it would delete the input), and does
    not lie inside an input directory icot wrote (replacing that one would delete `out`). A run
    inside a plain data directory is fine."""
    target = out.resolve()
    for path in inputs:
        source = Path(path).resolve()
        if target == source or target in source.parents:
            relation = "is" if target == source else "holds"
            raise UserError(f"{flag} {out}: {relation} the input {path}; write the output somewhere else")
        if source in target.parents and is_ours(source):
            raise UserError(f"{flag} {out}: lies inside the input {path}, which icot may replace; "
                            "write the output somewhere else")


def check_output_dir(out: Path, flag: str) -> None:
    """`out` can be a directory to write into: not a file, and creatable where it would go."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a directory; expected a directory")
    _check_writable(out, flag)


def check_output_file(out: Path, flag: str, overwrite: bool, inputs=()) -> None:
    """`out` can be written as a file: not a directory, not an input, new or --overwrite given."""
    if out.is_dir():
        raise UserError(f"{flag} {out}: is a directory; expected a file name")
    same = [p for p in inputs if Path(p).exists() and Path(p).resolve() == out.resolve()]
    if same:
        raise UserError(f"{flag} {out}: is the input file {same[0]}; write to another file")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    _check_writable(out.parent, flag)


def _check_writable(folder: Path, flag: str) -> None:
    """The nearest existing directory on the way to `folder` accepts new files (tried, since
    permission bits say nothing about a read-only file system or a root user)."""
    absolute = folder.absolute()
    existing = next(p for p in (absolute, *absolute.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write in {existing} ({e.strerror})") from None


def check_fresh_dir(out: Path, flag: str, overwrite: bool, inputs=(), hint: str = "") -> bool:
    """Check that `out` can become a new directory of ours; True if an old one of ours must be
    deleted first (the caller does it, on one process only). Refuses, before anything is
    deleted, a non-empty directory without --overwrite, one icot did not write, and one that
    overlaps an input (refuse_overlap) or holds the current directory."""
    check_output_dir(out, flag)
    refuse_overlap(out, flag, inputs)
    if not (out.exists() and any(out.iterdir())):
        return False
    if not overwrite:
        raise UserError(f"{out}: exists and is not empty; pass --overwrite to replace it{hint}")
    if not is_ours(out):
        raise UserError(f"{flag} {out}: --overwrite replaces only a directory icot wrote (with its {MARKER} "
                        "marker), and this one is not; remove it yourself or choose another directory")
    here = Path.cwd().resolve()
    if out.resolve() in (here, *here.parents):
        raise UserError(f"{flag} {out}: is or holds the current directory, which icot does not delete; "
                        "choose another directory")
    return True
