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
