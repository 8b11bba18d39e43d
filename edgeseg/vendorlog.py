"""Third-party chatter off the terminal: the vendor log.

Converters and runtimes talk a lot on a successful run: Python warnings (torch FutureWarnings, numpy
RuntimeWarnings inside coremltools), third-party loggers (coremltools' "Removing op ..." at INFO, OpenVINO's torch
frontend logging a KeyError traceback through the root logger) and native code writing straight to file
descriptors 1 and 2 (ExecuTorch's cpuinfo, ONNX Runtime). A `session()` (the CLI opens one for the commands
that run vendor code) sends all of it to one log file and leaves the terminal to edgeseg's own lines:

  * logging: a file handler on the root logger takes every record; the console handlers keep only `edgeseg.*`;
  * warnings: `warnings.showwarning` writes to the file;
  * `quiet()` (export_checkpoint, the pipeline's validate/bench steps): file descriptors 1 and 2 point at the file
    while a vendor step runs; edgeseg's console log handlers are moved to a copy of the terminal meanwhile. Inside a
    `quiet(python_too=False)` (whose progress bars stay on the terminal), a nested `quiet()` sends Python-level
    writes to the file too: runtimes that print through `sys.stderr` (ExecuTorch's pybindings) while a session
    opens (the default openers of edgeseg.eval.bench and edgeseg.eval.validate).

With `verbose` (`edgeseg --verbose`, or EDGESEG_VERBOSE=1) nothing is hidden: console handlers are not filtered,
warnings also print, and `quiet()` redirects nothing (logging and warnings still reach the file).

The log starts as a temporary file; `place(dest)` says where it belongs (the first call wins: `<run>/vendor.log`
for a pipeline, `<artifact>/export.log` for an export, which no manifest hashes) and the session moves it there
when it ends, or removes it when nothing was written. The CLI leaves it at the temporary path when the command
failed (it names the log in its one-line error). Child processes append to the same file (its path is in
EDGESEG_VENDOR_LOG).
Without a session every function here is a no-op, so library callers see the vendors' output as before.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

LOG_ENV = "EDGESEG_VENDOR_LOG"
VERBOSE_ENV = "EDGESEG_VERBOSE"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class Session:
    """The open vendor log: `path` (being written), `dest` (where it goes at the end), `final` (where it is after
    the session ended; None when nothing was written or this process did not own the file)."""

    path: Path
    verbose: bool
    owner: bool
    dest: Path | None = None
    final: Path | None = None
    depth: int = 0
    _undo: list = field(default_factory=list)
    log_streams: tuple | None = None  # sys.stdout/sys.stderr as they were (to the file) in quiet(python_too=False)


_session: Session | None = None


def active() -> Session | None:
    return _session


def env_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def log_name(artifact: str | os.PathLike) -> Path:
    """The vendor log of an export: `<artifact>/export.log` (manifests hash only their listed files)."""
    return Path(artifact) / "export.log"


def place(dest: str | os.PathLike) -> None:
    """Where the session's log goes when it ends (the first call wins; no-op without a session)."""
    if _session is not None and _session.owner and _session.dest is None:
        _session.dest = Path(dest)


class _OursOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "edgeseg" or record.name.startswith("edgeseg.") or record.name == "__main__"


class _FileHandler(logging.StreamHandler):
    """The vendor log's handler (a subclass, so never taken for a console handler)."""


def _console_handlers() -> list[logging.StreamHandler]:
    # exactly StreamHandler (basicConfig's): subclasses such as FileHandler or pytest's capture handler stay as is
    return [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]


@contextlib.contextmanager
def session(verbose: bool | None = None) -> Iterator[Session]:
    """Route third-party chatter to the vendor log for the duration (nested sessions join the outer one)."""
    global _session
    if _session is not None:
        yield _session
        return
    verbose = env_verbose() if verbose is None else verbose
    inherited = os.environ.get(LOG_ENV)
    if inherited:  # a child process of a session: append to its file
        path, owner = Path(inherited), False
    else:
        fd, name = tempfile.mkstemp(prefix="edgeseg-", suffix=".log")
        os.close(fd)
        path, owner = Path(name), True
    stream = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    s = Session(path=path, verbose=verbose, owner=owner)
    root = logging.getLogger()
    filtered = [] if verbose else _console_handlers()
    file_handler = _FileHandler(stream)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(file_handler)
    ours = _OursOnly()
    for h in filtered:
        h.addFilter(ours)
    old_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))
        if verbose:
            old_show(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    old_env = {k: os.environ.get(k) for k in (LOG_ENV, VERBOSE_ENV)}
    os.environ[LOG_ENV] = str(path)
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    _session = s
    try:
        yield s
    finally:
        _session = None
        warnings.showwarning = old_show
        for h in filtered:
            h.removeFilter(ours)
        root.removeHandler(file_handler)
        stream.close()
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if owner:
            s.final = _finish(path, s.dest)


def _finish(path: Path, dest: Path | None) -> Path | None:
    """Move the finished log to `dest` (when its folder exists); remove it when empty. Returns where it is."""
    try:
        if path.stat().st_size == 0:
            path.unlink()
            return None
    except OSError:
        return None
    if dest is None or not dest.parent.is_dir():
        return path
    from edgeseg.fileio import publish, temp_sibling

    try:
        tmp = temp_sibling(dest)
        shutil.copyfile(path, tmp)
        publish(tmp, dest)
        path.unlink()
        return dest
    except OSError:
        return path


@contextlib.contextmanager
def quiet(python_too: bool = True) -> Iterator[None]:
    """Point file descriptors 1 and 2 at the vendor log while a vendor step runs (no-op without a session, with
    verbose, or nested). `python_too`: Python's sys.stdout/sys.stderr writes go there too (an export, whose
    converters print progress bars); False keeps them on the terminal (validate and bench, whose progress bars
    are edgeseg's)."""
    s = _session
    if s is not None and s.depth and python_too and s.log_streams is not None:  # nested: Python writes too
        outer, (sys.stdout, sys.stderr) = (sys.stdout, sys.stderr), s.log_streams
        try:
            yield
        finally:
            sys.stdout, sys.stderr = outer
        return
    if s is None or s.verbose or s.depth:
        yield
        return
    s.depth += 1
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    console_err = open(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
    console_out = open(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    log_fd = os.open(s.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    moved = []
    for h in _console_handlers():  # edgeseg's own lines stay on the terminal
        fd = _fileno(h.stream)
        if fd in (1, 2):
            moved.append((h, h.setStream(console_err if fd == 2 else console_out)))
    old_streams = sys.stdout, sys.stderr
    if not python_too:
        sys.stdout, sys.stderr = console_out, console_err
        s.log_streams = old_streams
    try:
        yield
    finally:
        s.log_streams = None
        for f in (sys.stdout, sys.stderr, *old_streams):
            with contextlib.suppress(Exception):
                f.flush()
        sys.stdout, sys.stderr = old_streams
        for h, old in moved:
            h.setStream(old)
        for fd, dup in saved.items():
            os.dup2(dup, fd)
            os.close(dup)
        console_err.close()
        console_out.close()
        s.depth -= 1


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except Exception:  # noqa: BLE001 - a replaced stream (StringIO, pytest's capture) has none
        return None


__all__ = ["LOG_ENV", "VERBOSE_ENV", "Session", "active", "log_name", "place", "quiet", "session"]
