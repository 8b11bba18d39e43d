"""The main thread's alternate signal stack, owned by edgeseg, so that Ctrl-C / SIGTERM can always be delivered.

Why: CPython runs its signal handlers on the alternate signal stack (SA_ONSTACK). Measured here (Intel Xeon with AMX,
openvino 2026.4.1 and executorch 1.5.1 in one process): after in-process OpenVINO and ExecuTorch sessions the main
thread's alternate stack pointed at memory that was no longer mapped (20144 bytes at an address a runtime had
released), so the kernel could not write the signal frame (with AMX tile state, ~11 KB of it) and a Ctrl-C killed the
process with SIGSEGV instead of reaching edgeseg's handler (exit 139 instead of 130). `ensure_signal_stack()`
installs a 1 MiB stack that lives as long as the process; the CLI calls it when it installs its handlers and the
runtime sessions after they load (a runtime may install its own on load).
"""
from __future__ import annotations

import ctypes
import sys

_SIZE = 1 << 20
_buffer = None  # the stack's memory: never freed while the process runs


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def ensure_signal_stack() -> bool:
    """Make edgeseg's stack the calling thread's alternate signal stack (Linux; a no-op elsewhere, or while a
    handler runs on the current one). Returns whether edgeseg's stack is in place."""
    global _buffer
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if _buffer is None:
            _buffer = ctypes.create_string_buffer(_SIZE)
        current = _StackT()
        if libc.sigaltstack(None, ctypes.byref(current)) != 0 or current.ss_flags & 1:  # SS_ONSTACK: in use
            return False
        mine = ctypes.addressof(_buffer)
        if current.ss_sp == mine and current.ss_size == _SIZE:
            return True
        return libc.sigaltstack(ctypes.byref(_StackT(mine, 0, _SIZE)), None) == 0
    except (OSError, AttributeError):
        return False


__all__ = ["ensure_signal_stack"]
