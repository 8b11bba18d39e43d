"""Output ownership: no command destroys its own input or another command's output.

Every command that writes calls `check_outputs` with all its outputs and inputs before any of its work:
- an output may not be, contain or lie inside an input (`--out` = the checkpoint, its folder, `/`), nor lie inside
  another output of the same command (`--json OUT/manifest.json`);
- an output path whose nearest existing ancestor is a file, or a folder output that is a file, is refused;
- an existing output needs `--force`, and `--force` replaces an existing folder only when edgeseg wrote it (it holds
  one of `OWNER_FILES`) or it is empty: anything else is the user's and is never removed. Run folders (`train`,
  `qat`) are written into: `--force` replaces only the run's own entries there (edgeseg/train/state.py).
`fileio.atomic_dir` applies the same folder rule again when it publishes (see its no-replace commit).
This module imports nothing from edgeseg but errors (fileio imports it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, NamedTuple

from edgeseg.errors import UsageError

# A folder is edgeseg's when it holds one of these files as written by edgeseg: {name: keys its JSON object has}.
OWNER_FILES = {
    "manifest.json": ("target", "precision", "files"),  # an artifact (export, budget, qat --max-miou-drop)
    "model.json": ("model", "num_classes", "class_names"),  # a checkpoint (train, import, qat, ship_half)
    "pipeline.json": ("rows", "failures", "checkpoint"),  # a pipeline run
    "results.json": ("rows", "validation", "bench"),  # a report (validate --report, a pipeline's report/)
    "peers.json": ("models", "rows", "ratios"),  # bench/peers.py
    "predictions.json": ("images", "skipped", "target"),  # predict (edgeseg/predictions.py)
}
KINDS = ("file", "dir", "run")


class Output(NamedTuple):
    """One output of a command: `arg` names it in messages ("--out"), `kind` is "file" (replaced whole),
    "dir" (a folder replaced whole) or "run" (a folder the command writes its own entries into; an empty one counts
    as absent). `force` overrides the command's --force for this output (True: its writer checks it, e.g. a
    resumed run); `hint` ends the "exists" message."""

    arg: str
    path: str | os.PathLike | None
    kind: str = "file"
    force: bool | None = None
    hint: str = "use --force to overwrite"


def owner_file(folder: str | os.PathLike) -> str | None:
    """The file that marks `folder` as written by edgeseg (one of OWNER_FILES), or None."""
    folder = Path(folder)
    for name, keys in OWNER_FILES.items():
        f = folder / name
        try:
            if f.is_file() and not f.is_symlink() and f.stat().st_size < (64 << 20):
                obj = json.loads(f.read_text())
                if isinstance(obj, dict) and all(k in obj for k in keys):
                    return name
        except (OSError, ValueError):
            continue
    return None


def replaceable(folder: str | os.PathLike) -> bool:
    """True for a real folder (not a link) that is empty or that edgeseg wrote: what --force may replace whole."""
    p = Path(folder)
    if p.is_symlink() or not p.is_dir():
        return False
    try:
        return not any(p.iterdir()) or owner_file(p) is not None
    except OSError:
        return False


def _label(arg: str | None, path) -> str:
    return f"{arg} {path}" if arg else str(path)


def _check_ancestors(path: Path, arg: str | None) -> None:
    """The nearest existing ancestor of `path` must be a folder (else mkdir fails after the work)."""
    for parent in Path(os.path.abspath(path)).parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise UsageError(f"{_label(arg, path)}: {parent} is a file, not a folder")
            return


def check_replace(path: str | os.PathLike | None, arg: str | None, force: bool, kind: str = "file", *,
                  empty_dir_ok: bool = False, hint: str = "use --force to overwrite") -> None:
    """Raise UsageError (one line naming `arg` and `path`) unless the output `path` of `kind` may be written.

    kind "any": the rule of whatever is there (a folder: "dir", anything else: "file"). `empty_dir_ok`: an
    existing empty folder counts as absent (run folders).
    """
    if path is None:
        return
    p = Path(path)
    where = _label(arg, path)
    _check_ancestors(p, arg)
    if not os.path.lexists(p):
        return
    is_dir = p.is_dir() and not p.is_symlink()
    if kind == "any":
        kind = "dir" if is_dir else "file"
    if kind == "file":
        if is_dir:
            raise UsageError(f"{where}: is a folder, not a file")
        if not force:
            raise UsageError(f"{where}: exists ({hint})")
        return
    if not is_dir:
        raise UsageError(f"{where}: is {'a symbolic link' if p.is_symlink() else 'a file'}, not a folder")
    if empty_dir_ok and not any(p.iterdir()):
        return
    if kind == "dir" and not replaceable(p):
        raise UsageError(f"{where}: exists and was not written by edgeseg (no {', '.join(OWNER_FILES)}); --force "
                         "replaces only edgeseg's own output folders: choose another path or remove it yourself")
    if not force:
        raise UsageError(f"{where}: exists ({hint})")


def _real(path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _inside(a: Path, b: Path) -> bool:
    return a != b and b in a.parents


def check_places(outputs: Iterable[Output], inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> None:
    """Raise UsageError when an output is, contains or lies inside an input (those that exist on disk; a recipe
    name or a URL is no path), or lies inside or is another output (`--json` inside `--out`)."""
    outs = [(o.arg, o.path, _real(o.path)) for o in outputs if o.path is not None]
    ins = [(a, p, _real(p)) for a, p in inputs if p is not None and str(p) and os.path.lexists(p)]
    for oarg, opath, o in outs:
        for iarg, ipath, i in ins:
            how = "is" if o == i else "contains" if _inside(i, o) else "lies inside" if _inside(o, i) else None
            if how:
                raise UsageError(f"{oarg} {opath}: {how} the input {iarg} {ipath}; an output never replaces or "
                                 "writes into an input: choose another path")
        for parg, ppath, q in outs:
            if parg == oarg:
                continue
            if o == q or _inside(o, q):
                how = "is the same path as" if o == q else "lies inside"
                raise UsageError(f"{oarg} {opath}: {how} {parg} {ppath}, which this command also writes: "
                                 "choose a path outside it")


def check_outputs(force: bool, outputs: Iterable[Output],
                  inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> None:
    """The whole rule for one command, before its work: `check_places`, then `check_replace` for each output."""
    outputs = [o for o in outputs if o.path is not None]
    for o in outputs:
        if o.kind not in KINDS:
            raise ValueError(f"output kind {o.kind!r}")
    check_places(outputs, inputs)
    for o in outputs:
        check_replace(o.path, o.arg, force if o.force is None else o.force, o.kind, empty_dir_ok=o.kind == "run",
                      hint=o.hint)
