"""Calls in a fresh Python process, so that a vendor converter that crashes the interpreter fails only the call
that ran it (`edgeseg pipeline` exports every target this way; bench/int8_vs_fp32.py too)."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from edgeseg.errors import describe


def _isolated_main() -> None:
    """Entry point of the child process of `call_isolated` (argv[1]: the request JSON file)."""
    import importlib
    import json
    import sys

    from edgeseg import vendorlog

    req = json.loads(Path(sys.argv[1]).read_text())
    logging.basicConfig(level=req["log_level"], format=req.get("log_prefix", "").replace("%", "%%") + "%(message)s")
    # the parent's vendor log session (EDGESEG_VENDOR_LOG) continues here: the child appends to the same file
    quiet = os.environ.get(vendorlog.LOG_ENV)
    with vendorlog.session() if quiet else contextlib.nullcontext(), vendorlog.quiet():
        if req.get("threads"):
            import torch

            torch.set_num_threads(int(req["threads"]))
        try:
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
    import subprocess
    import sys
    import tempfile

    from edgeseg.errors import ArtifactError

    with tempfile.TemporaryDirectory(prefix="edgeseg-call-") as d:
        req, res = Path(d) / "request.json", Path(d) / "result.json"
        req.write_text(json.dumps({"func": func, "args": list(args), "kwargs": kwargs, "result": str(res),
                                   "log_level": logging.getLogger().getEffectiveLevel(), "log_prefix": _log_prefix,
                                   "threads": _threads}, default=str))
        env = dict(os.environ)
        if _threads:
            env["OMP_NUM_THREADS"] = str(_threads)
        proc = subprocess.run([sys.executable, "-c", "from edgeseg.isolate import _isolated_main; _isolated_main()",
                               str(req)], stdin=subprocess.DEVNULL, env=env)
        msg = json.loads(res.read_text()) if res.is_file() else None
    if msg is None:
        code = proc.returncode
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise ArtifactError(f"the process crashed ({how}) without an error message")
    if msg[0] == "error":
        raise ArtifactError(msg[1])
    return msg[1]


def export_isolated(*args: Any, _threads: int | None = None, _log_prefix: str = "", **kwargs: Any) -> Path:
    """`edgeseg.export.export_checkpoint` in its own process, so that a vendor converter that crashes the
    interpreter (seen here: a segfault inside openvino 2026.4.1's `Core.query_model` on test_segnext) fails only
    its own target instead of the whole run."""
    return Path(call_isolated("edgeseg.export:export_checkpoint", *args, _threads=_threads, _log_prefix=_log_prefix,
                              **kwargs))


__all__ = ["call_isolated", "export_isolated"]
