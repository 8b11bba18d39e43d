"""The `edgeseg` command line: a table of subcommands, each a module in `edgeseg/commands/`.

A command module defines `HELP` (one line), `EPILOG` (examples), `add_arguments(parser)` and
`run(args) -> int`; it holds no logic beyond turning arguments into library calls and printing results.
Errors reach the user as one line, `edgeseg: error: ...`, exit 2 for usage and 1 for failures; `--debug`
shows the traceback. Ctrl-C and SIGTERM stop a command alike: nothing is published, temporaries are removed,
child processes are ended, exit 130 (SIGINT) or 143 (SIGTERM). The commands in QUIET run inside a vendor log
session (edgeseg/vendorlog.py): converter and runtime chatter goes to a log file named in the last line,
`--verbose` shows it live.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

from edgeseg.errors import EdgesegError, printable

# name -> module under edgeseg.commands
COMMANDS: dict[str, str] = {
    "models": "models",
    "train": "train",
    "eval": "evaluate",
    "import": "import_ckpt",
    "export": "export",
    "qat": "qat",
    "quant-report": "quant_report",
    "validate": "validate",
    "bench": "bench",
    "demo": "demo",
    "predict": "predict",
    "pipeline": "pipeline",
}
# commands that run converters/runtimes: their third-party output goes to the vendor log
QUIET = {"export", "pipeline", "bench", "validate", "predict"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as argparse does, but with our prefix
        self.exit(2, f"edgeseg: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgeseg", description=__doc__.splitlines()[0] if __doc__ else None,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--verbose", action="store_true", help="show converter/runtime output live instead of "
                        "only in the vendor log")
    parser.add_argument("--version", action="version", version="edgeseg " + _version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(f"edgeseg.commands.{modname}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, epilog=getattr(mod, "EPILOG", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks on errors")
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show converter/runtime output live instead of only in the vendor log")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _version() -> str:
    from edgeseg import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("EDGESEG_DEBUG") == "1"
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from edgeseg import vendorlog

    verbose = getattr(args, "verbose", False) or vendorlog.env_verbose()
    with contextlib.ExitStack() as stack:
        vlog = stack.enter_context(vendorlog.session(verbose=verbose)) if args.command in QUIET else None
        if vlog is not None and args.command == "export" and getattr(args, "out", None):
            vendorlog.place(vendorlog.log_name(args.out))
        code, error = _run(args, debug)
        if vlog is not None and error is not None:
            vlog.dest = None  # a failed command leaves its output folder alone: the log stays where it was written
    where = vlog.final if vlog is not None else None
    if error in (INTERRUPTED, TERMINATED):
        if where is not None and where == vlog.path:
            where.unlink(missing_ok=True)
        print(error, file=sys.stderr)
    elif error is not None:  # still one line; it names the log, which holds what the converter said
        print(printable(error) + (f" (vendor log: {where})" if where else ""), file=sys.stderr)
    elif where is not None:
        print(f"vendor log: {where}", file=sys.stderr)
    return code


INTERRUPTED = "edgeseg: interrupted"
TERMINATED = "edgeseg: terminated"
# SIGTERM (a service manager, `kill`, a CI timeout) takes the path of Ctrl-C: KeyboardInterrupt, nothing published,
# temporaries removed, the export children's process groups ended (edgeseg/isolate.py); exit 128 + the signal
STOP_SIGNALS = ("SIGINT", "SIGTERM")


def _stopped(signum: int | None) -> tuple[int, str]:
    import signal

    return (128 + signal.SIGTERM, TERMINATED) if signum == signal.SIGTERM else (130, INTERRUPTED)


def _run(args, debug: bool) -> tuple[int, str | None]:
    """Run the command: (exit code, None) or (exit code, the one-line error to print)."""
    import signal
    import threading

    from edgeseg import fileio, isolate

    fileio.reset_interrupt()
    isolate.reset()
    got: list[int] = []

    def on_signal(signum, frame):
        got.append(signum)
        fileio.note_interrupt(signum)  # no output is published after this, even if a library swallows the raise
        isolate.end_children()  # children in their own process groups: a terminal's Ctrl-C does not reach them
        signal.default_int_handler(signum, frame)

    # a Ctrl-C that lands while a C extension initialises surfaces as that extension's ImportError ("initialization
    # failed", seen with SIGINT during ONNX Runtime's import), not as KeyboardInterrupt: remember that it came
    previous = {}
    if threading.current_thread() is threading.main_thread():
        from edgeseg.sigstack import ensure_signal_stack

        ensure_signal_stack()  # a stack the handlers can run on (edgeseg/sigstack.py)
        previous = {sig: signal.signal(sig, on_signal) for sig in (getattr(signal, n) for n in STOP_SIGNALS)}
    try:
        code, err = _run_command(args, debug)
    except Exception:
        if fileio.interrupted() and not debug:
            return _stopped(got[0] if got else None)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if err == INTERRUPTED or (fileio.interrupted() and code != 0):
        return _stopped(got[0] if got else None)
    return code, err


def _run_command(args, debug: bool) -> tuple[int, str | None]:
    try:
        return int(args._run(args) or 0), None
    except EdgesegError as e:
        if debug:
            raise
        # one line even when a message quotes a multi-line tool error
        return e.exit_code, "edgeseg: error: " + "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
    except KeyboardInterrupt:
        return 130, INTERRUPTED
    except Exception as e:  # an unexpected failure is still one line unless --debug
        if debug:
            raise
        from edgeseg.extras import missing_extra

        hint = missing_extra(e.name) if isinstance(e, ModuleNotFoundError) else None
        if hint:  # a target whose extra is not installed: say which one
            return 1, f"edgeseg: error: {hint}"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return 1, f"edgeseg: error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    raise SystemExit(main())
