"""Atomic outputs: every file and folder is written under a temporary name and renamed into place.

An interrupted write (SIGINT, SIGKILL) then leaves either the previous complete output or nothing.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from edgeseg.errors import OutputError
from edgeseg.outputs import check_replace, replaceable

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
    """Raise UsageError if the output `path` given as `arg` (e.g. "--json") may not be written: it exists and
    `force` is false, or it is a folder that edgeseg did not write (`edgeseg.outputs.check_replace`, kind "any").

    Commands call `edgeseg.outputs.check_outputs` (this rule plus: no output is, contains or lies inside an input
    or another output) for all their outputs before the long work, so a refusal costs nothing.
    """
    check_replace(path, arg, force, "any", empty_dir_ok=empty_dir_ok, hint=hint)


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

    Raises UsageError if `path` exists and `force` is false, or if it is not a folder edgeseg wrote (or an empty
    one): --force never replaces anything else (`edgeseg.outputs`). The commit never replaces what appeared
    meanwhile: a folder found at `path` when the block began is replaced only if it is still that folder and still
    edgeseg's; otherwise (another run published `path` first) OutputError, and this output is discarded.
    A SIGKILL leaves only a hidden `.NAME.tmp-PID-*` sibling, removed by the next write of `path`.
    """
    path = Path(path)
    check_replace(path, None, force, "dir")
    found = _identity(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    prefix = f".{path.name}.tmp-{os.getpid()}-"
    ours_before = {p.name for p in path.parent.iterdir() if p.name.startswith(prefix)}  # a nested writer's
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an output folder gets the usual permissions
        yield tmp
        _commit_dir(tmp, path, found)
    finally:
        if tmp is not None:
            _remove(tmp)
        else:  # a Ctrl-C inside mkdtemp, after its mkdir (seen once in the SIGINT test): the folder it made
            for p in path.parent.iterdir():
                if p.name.startswith(prefix) and p.name not in ours_before:
                    _remove(p)


def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _conflict(dst: Path) -> OutputError:
    return OutputError(f"{dst}: another run wrote it while this one was working; left as it is, this run's output "
                       "discarded (write to another path, or rerun with --force to replace it)")


def _commit_dir(tmp: Path, dst: Path, found: tuple[int, int] | None) -> None:
    """Rename `tmp` onto `dst`, replacing only the folder `found` (its identity when the write began, None: there
    was nothing) and only while it is edgeseg's; OutputError when `dst` changed meanwhile."""
    _refuse_if_interrupted()
    old = None
    if found is not None:
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        _remove(old)
        try:
            os.rename(dst, old)
        except FileNotFoundError:  # removed meanwhile: publish into the free place (or lose to whoever took it)
            old = None
        if old is not None and (_identity(old) != found or not replaceable(old)):
            if not rename_noreplace(old, dst):  # put back what another run published; never delete it
                os.rename(old, dst.parent / f"{dst.name}.kept-{os.getpid()}")
            raise _conflict(dst)
    if not rename_noreplace(tmp, dst):
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # what we were asked to replace; `dst` is another run's now
        raise _conflict(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's renameat2 (Linux, glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Rename `src` to `dst` unless something is at `dst` (then False, nothing moved). Atomic with renameat2
    RENAME_NOREPLACE; where the kernel or file system lacks it, a check then os.rename, which still never replaces
    a file or a non-empty folder (only an empty folder created in that instant could be replaced)."""
    fn = _renameat2()
    if fn is not None:
        import ctypes

        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # EINVAL etc.: no RENAME_NOREPLACE here
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        return False
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        raise
    return True


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
