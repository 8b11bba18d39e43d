"""Atomic outputs: every file and folder is written under a temporary name and renamed into place.

An interrupted write (SIGINT, SIGKILL) then leaves either the previous complete output or nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from edgeseg.errors import UsageError

# Set by the CLI's SIGINT handler. A library can swallow the KeyboardInterrupt a Ctrl-C raises (CI once saw an
# export interrupted right after its temporary folder appeared run to the end, exit 0); every commit below checks
# this first, so an interrupted command never publishes its output.
_interrupted: list[int] = []


def note_interrupt(signum: int) -> None:
    _interrupted.append(signum)


def reset_interrupt() -> None:
    _interrupted.clear()


def interrupted() -> bool:
    return bool(_interrupted)


def _refuse_if_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


def refuse_existing(path: str | os.PathLike | None, arg: str, force: bool, *, empty_dir_ok: bool = False,
                    hint: str = "use --force to overwrite") -> None:
    """Raise UsageError if the output `path` given as `arg` (e.g. "--json") exists and `force` is false.

    Commands call it for every output before the long work, so nothing is overwritten without --force and a
    refusal costs nothing. `empty_dir_ok`: an existing empty folder counts as absent (run folders).
    """
    if path is None or force:
        return
    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        return
    if empty_dir_ok and p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
        return
    raise UsageError(f"{arg} {path}: exists ({hint})")


def _tmp_name(path: Path, suffix: str = "") -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}{suffix}"


def temp_sibling(path: str | os.PathLike, keep_suffix: bool = False) -> Path:
    """A hidden temporary name beside `path` for a writer that is not a context manager (a video recorder):
    write it, then `publish(tmp, path)`, or remove it on failure. A SIGKILLed writer's leftover is removed by
    the next write of `path` (clean_stale). `keep_suffix`: end in path's suffix (writers that pick the format
    from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    return _tmp_name(path, path.suffix if keep_suffix else "")


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename the finished temporary `tmp` (from temp_sibling) onto `path`."""
    _replace(Path(tmp), Path(path))
    return Path(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporaries of `path` (`.NAME.tmp-PID[-*]`, `.NAME.old-PID`) left by a process that
    was killed (SIGKILL, power loss) before it could clean up; those of a live process are kept. Returns them."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for kind in (".tmp-", ".old-"):
        prefix = f".{path.name}{kind}"
        for p in path.parent.iterdir():
            if not p.name.startswith(prefix):
                continue
            pid = re.match(r"\d*", p.name[len(prefix):]).group()  # `PID`, `PID-*` or `PID.suffix`
            if pid and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                _remove(p)
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary sibling of `path` for writing; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _refuse_if_interrupted()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path (file or folder) next to `path`; rename it onto `path` if the block succeeds.

    Use for outputs written by third-party tools (a `.pte`, an `.mlpackage` folder) that take a path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = _tmp_name(path)
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp} was not written")
        _replace(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Build an output folder under a temporary name, then swap it into place.

    Raises UsageError if `path` exists and `force` is false (nothing is overwritten without --force).
    A SIGKILL leaves only a hidden `.NAME.tmp-PID-*` sibling, removed by the next write of `path`.
    """
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(f"{path}: exists (use --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an output folder gets the usual permissions
    try:
        yield tmp
        _replace(tmp, path)
    finally:
        _remove(tmp)


def _replace(src: Path, dst: Path) -> None:
    _refuse_if_interrupted()
    if dst.is_dir() and not dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under `path` (a file or a folder such as an .mlpackage), keyed by relative path."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {
        str(p.relative_to(path.parent)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()
    }


def _read_umask() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


# Where /proc cannot say, the umask is read once here, at import: reading it with os.umask means setting it,
# and a umask flipped to 0 while other threads create files would give those files the wrong permissions.
_IMPORT_UMASK = _read_umask()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = os.umask(0o022)
    os.umask(_IMPORT_UMASK)


def _umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status; elsewhere: as at import)."""
    mask = _read_umask()
    return _IMPORT_UMASK if mask is None else mask
