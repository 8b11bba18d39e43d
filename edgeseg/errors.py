"""User-facing errors: the CLI prints them as one line (`edgeseg: error: ...`) and exits 1 (2 for usage)."""


class EdgesegError(Exception):
    """A failure the user can act on. The message names the file or argument and what is wrong."""

    exit_code = 1


class UsageError(EdgesegError):
    """Bad command-line usage (wrong or conflicting arguments)."""

    exit_code = 2


class DataError(EdgesegError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class ArtifactError(EdgesegError):
    """A checkpoint, artifact or manifest is missing, corrupted, unsafe or does not match its files."""


def one_line(e: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message ("" when it has none), prefixed with its type when asked:
    what a one-line error says about a vendor tool's multi-line failure."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if with_type else first


def describe(e: BaseException) -> str:
    """An error as one line for a record or a table row: our own errors say it all, others get their type."""
    return one_line(e, with_type=not isinstance(e, EdgesegError))
