"""User-facing errors: the CLI prints them as one line and exits with code 2. Warnings: one line
on stderr, and the command goes on."""

import sys


class UserError(Exception):
    """Bad input from the user (file, value, option). The message is the whole report."""


def one_line(message: str) -> str:
    """A message as one line: line breaks it quotes (a question, a file name) written as \\n."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def located(path, lineno: int | None, message: str) -> UserError:
    """An error pointing at `path:lineno`."""
    where = f"{path}:{lineno}" if lineno is not None else f"{path}"
    return UserError(f"{where}: {message}")


_warned: set[str] = set()


def new_command() -> None:
    """Warnings are once per command: the next command (in the same process) warns afresh."""
    _warned.clear()


def warn(message: str) -> None:
    """Once per message: a file read several times in one command is reported once. Written through
    tqdm, so a progress bar on the terminal is cleared and drawn again below it."""
    if message not in _warned:
        from tqdm import tqdm

        _warned.add(message)
        tqdm.write(f"icot: warning: {one_line(message)}", file=sys.stderr)
