"""The `edgeseg` command line: a table of subcommands, each a module in `edgeseg/commands/`.

A command module defines `HELP` (one line), `EPILOG` (examples), `add_arguments(parser)` and
`run(args) -> int`; it holds no logic beyond turning arguments into library calls and printing results.
Errors reach the user as one line, `edgeseg: error: ...`, exit 2 for usage and 1 for failures; `--debug`
shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from edgeseg.errors import EdgesegError

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
    "pipeline": "pipeline",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as argparse does, but with our prefix
        self.exit(2, f"edgeseg: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgeseg", description=__doc__.splitlines()[0] if __doc__ else None,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version="edgeseg " + _version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(f"edgeseg.commands.{modname}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, epilog=getattr(mod, "EPILOG", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks on errors")
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
    try:
        return int(args._run(args) or 0)
    except EdgesegError as e:
        if debug:
            raise
        print(f"edgeseg: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("edgeseg: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure is still one line unless --debug
        if debug:
            raise
        from edgeseg.extras import missing_extra

        hint = missing_extra(e.name) if isinstance(e, ModuleNotFoundError) else None
        if hint:  # a target whose extra is not installed: say which one
            print(f"edgeseg: error: {hint}", file=sys.stderr)
            return 1
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"edgeseg: error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
