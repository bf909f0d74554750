"""Where icot reads and writes: checks made before any work, and the --overwrite rule.

`--overwrite` replaces only what icot wrote: a directory it marked as its own (a run, a demo)
or the exact files a command is about to write, never a file inside a run, demo or model. An
output is never an input nor inside one; a directory icot replaces never holds an input or the
current directory, and never lies inside an input directory icot wrote. One command writes a run
or demo at a time (`one_writer`). Every output file is written aside and renamed into place
(`replacing`): a crash, a full disk or Ctrl-C leaves the old file or none, never part of one.
Files that belong together (a data set's splits) are written in nested `replacing` blocks (an
ExitStack), renamed one after the other once all are whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
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
    """A local path given as a model or tokenizer must be an existing directory of regular files:
    say so at once instead of asking the hub (which retries for half a minute offline), or
    blocking on a pipe among its files."""
    path = Path(name).expanduser()
    if path.is_dir():
        odd = next((p for p in path.iterdir() if p.exists() and not (p.is_file() or p.is_dir())), None)
        if odd is not None:
            raise UserError(f"{what} {name}: {odd.name} is not a regular file (a pipe or a device); expected the "
                            "files a model directory holds")
        return
    if not (path.exists() or is_local_path(name)):
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
    """`out` can be written as a file: not a directory, not an input nor inside one (an input
    directory icot wrote counts with the run or demo around it: RUN/best makes all of RUN an
    input), not a file of a directory icot wrote, new or --overwrite given."""
    if out.is_dir():
        raise UserError(f"{flag} {out}: is a directory; expected a file name")
    target = out.resolve()
    for path in (Path(p) for p in inputs):
        if not path.exists():
            continue
        if target == path.resolve():
            raise UserError(f"{flag} {out}: is the input file {path}; write to another file")
        scope = input_scope(path)
        if scope in target.parents:
            raise UserError(f"{flag} {out}: lies inside {scope}, an input of this command; write it elsewhere")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    owner = next((folder for folder in target.parents if is_ours(folder)), None)
    if out.exists() and owner is not None:
        raise UserError(f"{flag} {out}: belongs to {owner}, which icot wrote (a run, demo or model), and "
                        "--overwrite replaces no file of it; write to another file")
    _check_writable(out.parent, flag)


def input_scope(path: Path) -> Path:
    """What reading `path` depends on: the path itself, or the outermost run or demo directory
    icot wrote around it (a model in RUN/best reads nothing else, but RUN holds its records)."""
    scope = path.resolve()
    for parent in scope.parents:
        if not is_ours(parent):
            break
        scope = parent
    return scope


@contextlib.contextmanager
def one_writer(folder: Path, hold: bool = True):
    """Holds the lock of `folder` (a run or demo directory) for the block: a second command
    writing it meanwhile fails at once, in one line, naming the first one's process. The lock is
    the operating system's lock on a file beside `folder` (`.NAME.lock`, holding the writer's
    pid), outside it so that replacing `folder` keeps it; the system releases it when its process
    ends, however it ends, so no lock is ever stale, and the file goes when the block ends.
    `hold` False: a process that does not write (one of several) takes no lock."""
    if not hold:
        yield
        return
    check_output_dir(folder, "--out")
    folder = Path(folder).resolve()  # one lock however the directory is spelled (a link, `..`)
    lock = folder.parent / f".{folder.name}.lock"
    handle = _locked_file(lock, folder)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)  # before the lock goes: a command that opened it meanwhile sees it gone
        handle.close()


def _locked_file(lock: Path, folder: Path):
    """`lock`, open and locked by this process; a lock file that was removed while this process
    waited for it (its holder ended) is opened anew."""
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a+", encoding="utf-8")
        except OSError as e:
            raise UserError(f"{folder}: cannot create its lock file {lock} ({e.strerror})") from None
        if not _try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UserError(f"{folder}: in use by another icot command (process {holder}); one command writes it "
                            "at a time: wait for that one to end or stop it")
        try:
            if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()


def _try_lock(handle) -> bool:
    """An exclusive lock on the open file, without waiting: False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def writing_aside(tmp: Path, what: str, kept: str):
    """The block writes the directory `tmp`, which is then renamed into place (a model, a
    checkpoint): a write that fails (a full disk; torch and safetensors report it as RuntimeError
    or SafetensorError) removes `tmp` and is one UserError naming `what` and what is `kept`."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{what}: cannot write it ({first}); {kept}") from None


@contextlib.contextmanager
def replacing(path: Path, binary: bool = False):
    """A file to write `path` through: it is written beside `path` and renamed onto it once
    whole, so that nothing but a complete file ever stands at `path`. A write that fails (a full
    disk) is a UserError naming `path`, which is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e}); it is left as it was") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_file(path: Path, text: str) -> None:
    """`path` holds `text`, replaced whole (`replacing`)."""
    with replacing(path) as f:
        f.write(text)


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
    if out.is_symlink():  # deleting it would delete the link, not the run
        raise UserError(f"{flag} {out}: is a symbolic link (to {out.resolve()}); give the directory itself to replace it")
    here = Path.cwd().resolve()
    if out.resolve() in (here, *here.parents):
        raise UserError(f"{flag} {out}: is or holds the current directory, which icot does not delete; "
                        "choose another directory")
    return True
