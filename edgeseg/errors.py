"""User-facing errors: the CLI prints them as one line (`edgeseg: error: ...`) and exits 1 (2 for usage)."""
from __future__ import annotations

import re


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


class OutputError(EdgesegError):
    """An output was not published: its path changed while the command ran (another run wrote it meanwhile)."""


# OpenVINO's messages start with where in its sources they were raised, one line per level ("Exception from
# src/inference/src/cpp/core.cpp:84:", "Check 'cond' failed at src/frontends/common/src/frontend.cpp:117:"); the
# reason follows
_SOURCE_LOCATION = re.compile(r"^(Exception from \S+:\d+:?|Check .* failed at \S+:\d+:?)$")


def one_line(e: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message ("" when it has none), prefixed with its type when asked:
    what a one-line error says about a vendor tool's multi-line failure. Lines that only say where in a vendor's
    sources the error was raised (OpenVINO) are skipped, and the reason is joined into one line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    reason = [ln for ln in lines if not _SOURCE_LOCATION.match(ln)]
    if len(reason) < len(lines) and reason:  # "FrontEnd API failed with GeneralFailure:" + "ir: Could not open..."
        first = reason[0]
        for ln in reason[1:]:
            if not first.endswith(":"):
                break
            first += " " + ln
    else:
        first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first}" if with_type else first


def printable(text: object) -> str:
    """`text` with control characters (terminal escape sequences, newlines, bidi overrides) shown escaped, e.g.
    a class name "\\x1b[2J" from a downloaded model.json, so that printing it cannot drive the terminal."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def describe(e: BaseException) -> str:
    """An error as one line for a record or a table row: our own errors say it all, others get their type."""
    return one_line(e, with_type=not isinstance(e, EdgesegError))
