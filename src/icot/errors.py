"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (file, value, option). The message is the whole report."""


def located(path, lineno: int | None, message: str) -> UserError:
    """An error pointing at `path:lineno`."""
    where = f"{path}:{lineno}" if lineno is not None else f"{path}"
    return UserError(f"{where}: {message}")
