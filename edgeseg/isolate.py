"""Calls in a fresh Python process, so that a vendor converter that crashes the interpreter fails only the call
that ran it (`edgeseg pipeline` exports every target this way; bench/int8_vs_fp32.py too).

Each child leads its own process group (with whatever it starts). On Ctrl-C or SIGTERM the CLI calls
`end_children()`: every group gets SIGTERM (the child unwinds: its temporaries are removed, nothing is published)
and SIGKILL after GRACE_S; no new child starts. A child also gets SIGTERM when its parent dies (Linux), so that a
SIGKILLed pipeline leaves no export running behind it."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from edgeseg.errors import describe

GRACE_S = 5.0  # after SIGTERM, a child's group gets this long to unwind before SIGKILL
_live: dict = {}  # pid -> Popen of the running children (plain dict operations: safe in a signal handler)
_ending: list[float] = []  # when end_children() was called (monotonic)


def _isolated_main() -> None:
    """Entry point of the child process of `call_isolated` (argv[1]: the request JSON file)."""
    import importlib
    import json
    import sys

    from edgeseg import vendorlog

    req = json.loads(Path(sys.argv[1]).read_text())
    _stop_with_parent(int(req.get("parent", 0)))
    logging.basicConfig(level=req["log_level"], format=req.get("log_prefix", "").replace("%", "%%") + "%(message)s")
    # the parent's vendor log session (EDGESEG_VENDOR_LOG) continues here: the child appends to the same file
    quiet = os.environ.get(vendorlog.LOG_ENV)
    with vendorlog.session() if quiet else contextlib.nullcontext(), vendorlog.quiet():
        try:
            if req.get("threads"):
                import torch

                torch.set_num_threads(int(req["threads"]))
            mod, name = req["func"].split(":")
            msg = ["ok", str(getattr(importlib.import_module(mod), name)(*req["args"], **req["kwargs"]))]
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as one line
            msg = ["error", describe(e)]
    Path(req["result"]).write_text(json.dumps(msg))


def call_isolated(func: str, *args: Any, _threads: int | None = None, _log_prefix: str = "", **kwargs: Any) -> str:
    """Call `func` ("module:function") with JSON-able arguments (paths become strings) in a fresh Python process
    and return `str()` of its result. A fresh interpreter via subprocess rather than multiprocessing, whose spawn
    start re-imports the caller's `__main__` (breaking scripts without a main guard). `_threads` caps the child's
    OpenMP/torch threads (concurrent children share the cores); `_log_prefix` starts each of its log lines.

    Raises:
        ArtifactError with the child's one-line error, or naming the signal that killed the child.
    """
    import json
    import signal
    import sys
    import tempfile

    from edgeseg.errors import ArtifactError

    with tempfile.TemporaryDirectory(prefix="edgeseg-call-") as d:
        req, res = Path(d) / "request.json", Path(d) / "result.json"
        req.write_text(json.dumps({"func": func, "args": list(args), "kwargs": kwargs, "result": str(res),
                                   "log_level": logging.getLogger().getEffectiveLevel(), "log_prefix": _log_prefix,
                                   "threads": _threads, "parent": os.getpid()}, default=str))
        env = dict(os.environ)
        if _threads:
            env["OMP_NUM_THREADS"] = str(_threads)
        code = _run_child([sys.executable, "-c", "from edgeseg.isolate import _isolated_main; _isolated_main()",
                           str(req)], env)
        msg = json.loads(res.read_text()) if res.is_file() else None
    if msg is None:
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise ArtifactError(f"the process crashed ({how}) without an error message")
    if msg[0] == "error":
        raise ArtifactError(msg[1])
    return msg[1]


def _run_child(cmd: list[str], env: dict) -> int:
    """Run `cmd` as the leader of a new process group; return its exit code (-N: killed by signal N). Whatever
    ends the wait (a return, an exception, KeyboardInterrupt) ends the whole group too."""
    import subprocess

    from edgeseg.errors import ArtifactError
    from edgeseg.fileio import interrupted

    if interrupted() or _ending:
        raise ArtifactError("not started: the run was interrupted")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    _live[proc.pid] = proc
    try:
        if interrupted() or _ending:  # the signal came between the check and the registration
            _signal_group(proc.pid, "SIGTERM")
        while not _exited(proc, 0.2):
            if _ending and time.monotonic() - _ending[0] > GRACE_S:
                _signal_group(proc.pid, "SIGKILL")
    finally:
        _live.pop(proc.pid, None)
        if not _exited(proc, 0):
            _signal_group(proc.pid, "SIGTERM")
            if not _exited(proc, GRACE_S):
                _signal_group(proc.pid, "SIGKILL")
        _signal_group(proc.pid, "SIGKILL")  # what it started and left behind (its pid is not reaped yet: no reuse)
        proc.wait()
    return proc.returncode


def _exited(proc, timeout: float) -> bool:
    """Wait up to `timeout` s for `proc` to exit *without reaping it* (while unreaped, its pid, which is also its
    process group's id, cannot be reused, so signalling the group stays safe)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.returncode is not None:
            return True
        try:
            done = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
        except ChildProcessError:
            done = True
        except (AttributeError, OSError):  # no waitid (macOS): reap as Popen does
            done = proc.poll() is not None
        if done or time.monotonic() >= deadline:
            return done
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _signal_group(pgid: int, name: str) -> None:
    import signal

    try:
        os.killpg(pgid, getattr(signal, name))
    except (ProcessLookupError, PermissionError):
        pass


def end_children() -> None:
    """SIGTERM to the process group of every running child, SIGKILL after GRACE_S (sent by the threads that wait
    on them), and no new child from now on (the CLI's SIGINT/SIGTERM handler; `reset()` for the next command)."""
    if not _ending:
        _ending.append(time.monotonic())
    for pid in list(_live):
        _signal_group(pid, "SIGTERM")


def reset() -> None:
    """Children may start again (a new command in the same process)."""
    _ending.clear()


def _stop_with_parent(parent: int) -> None:
    """In a child: SIGTERM (as from end_children) when the parent dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG; elsewhere a no-op), and a SIGTERM handler that unwinds like Ctrl-C, so that temporaries are
    removed and nothing is published."""
    import signal

    from edgeseg import fileio

    def on_term(signum, frame):
        fileio.note_interrupt(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent and os.getppid() != parent:  # the parent died before the prctl: nothing to clean up yet
        raise SystemExit(128 + signal.SIGTERM)


def export_isolated(*args: Any, _threads: int | None = None, _log_prefix: str = "", **kwargs: Any) -> Path:
    """`edgeseg.export.export_checkpoint` in its own process, so that a vendor converter that crashes the
    interpreter (seen here: a segfault inside openvino 2026.4.1's `Core.query_model` on test_segnext) fails only
    its own target instead of the whole run."""
    return Path(call_isolated("edgeseg.export:export_checkpoint", *args, _threads=_threads, _log_prefix=_log_prefix,
                              **kwargs))


__all__ = ["call_isolated", "end_children", "export_isolated", "reset"]
