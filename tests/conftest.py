"""Shared fixtures: the real data beside the repo (../shared), found relative to this file or $EDGESEG_SHARED, and
one export cache for the whole session (tests/test_export*.py share tiny checkpoints and artifacts through it).

Export prefetch: most of an export is single-threaded graph work, so on CI's 2 cores a second process halves the
wall time. Tests declare the artifacts they will ask for with `@pytest.mark.exports(...)`; for the selected
tests, one helper process at a time makes those artifacts, from the last test backwards, while the tests run
from the first forwards. A test that needs an artifact the helper has not started makes it itself; one the
helper is making waits for it; one the helper failed on is made again in the test, so errors surface there as
before. The helper starts only if the machine has an idle core when the session starts (EDGESEG_TEST_PREFETCH=1
forces it, =0 turns it off); the terminal summary says what it made.

Strict runs: with `CI` set (as `.ci/run` does) or EDGESEG_NO_SKIPS=1, a skip is a failure - a missing toolchain,
missing ../shared data or a missing display tool must turn CI red, never quietly shrink what it checked.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tests/_tiny.py
REPO = TESTS.parent
SHARED = Path(os.environ.get("EDGESEG_SHARED", REPO.parent / "shared"))
EXPORT_HW = (64, 64)  # every shared tiny checkpoint and artifact


def strict() -> bool:
    """Skips are failures (CI, or EDGESEG_NO_SKIPS=1)."""
    return bool(os.environ.get("CI")) or os.environ.get("EDGESEG_NO_SKIPS") == "1"


def unavailable(what: str):
    """Skip for a missing resource here; fail in strict runs (CI must have every resource)."""
    if strict():
        pytest.fail(f"{what} (required in CI: skips are failures there)")
    pytest.skip(what)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Backstop of `unavailable`: in strict runs any other skip (importorskip, skipif, pytest.skip) fails too."""
    outcome = yield
    rep = outcome.get_result()
    if strict() and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped in a strict run (CI / EDGESEG_NO_SKIPS=1), which counts as a failure: {reason}"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    p = SHARED / "data" / "camvid"
    if not p.is_dir():
        unavailable(f"CamVid not present at {p}")
    return p


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    p = SHARED / "parity"
    if not p.is_dir():
        unavailable(f"parity references not present at {p}")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Shared exports
# ----------------------------------------------------------------------------------------------------------------
_GC = {"full": 0, "full_s": 0.0, "young_s": 0.0, "t0": 0.0}


def _gc_timer(phase: str, info: dict) -> None:
    """gc.callbacks: the time the collector takes, per generation (reported at the end of the session: a suite that
    keeps many objects alive pays for them in every full collection)."""
    if phase == "start":
        _GC["t0"] = time.perf_counter()
        return
    dt = time.perf_counter() - _GC["t0"]
    if info.get("generation") == 2:
        _GC["full"] += 1
        _GC["full_s"] += dt
    else:
        _GC["young_s"] += dt


def pytest_configure(config):
    gc.callbacks.append(_gc_timer)
    config.addinivalue_line("markers", "exports(spec): artifacts the test asks the `exports` fixture for; spec is "
                            "a list of (target, model, precision[, options]) or a callable of the test's "
                            "parameters returning one (lets the session prefetch them)")


def export_key(target: str, model: str, precision: str, options: dict | None = None) -> tuple:
    return target, model, precision, tuple(sorted((options or {}).items()))


def _declared(item) -> list[tuple]:
    keys = []
    for mark in item.iter_markers("exports"):
        for spec in mark.args:
            if callable(spec):
                spec = spec(getattr(getattr(item, "callspec", None), "params", {}))
            keys += [export_key(*s) for s in spec]
    return keys


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: plan only what runs
def pytest_collection_modifyitems(session, config, items):
    planned: list[tuple] = []
    for item in items:
        for key in _declared(item):
            if key not in planned:
                planned.append(key)
    config.stash[_PLAN] = planned


_PLAN = pytest.StashKey[list]()
# The helper: one long-lived process (imports and converter start-up paid once), one export per request line on
# stdin, with tests/_tiny.py's tiny_ops registered, one thread and seed 0 as in the test; it writes
# `<out>.status` ("ok" or the error) when done.
_HELPER = ("import json, sys, traceback; from pathlib import Path\n"
           "sys.path.insert(0, {tests!r}); import _tiny, torch\n"
           "from edgeseg.export import export_checkpoint\n"
           "torch.set_num_threads(1)\n"
           "for line in sys.stdin:\n"
           "    r = json.loads(line); torch.manual_seed(0); status = 'ok'\n"
           "    try:\n"
           "        export_checkpoint(r['checkpoint'], r['target'], r['precision'], out=r['out'], **r['options'])\n"
           "    except Exception:\n"
           "        status = traceback.format_exc()\n"
           "    Path(r['out'] + '.status~').write_text(status)\n"
           "    Path(r['out'] + '.status~').replace(r['out'] + '.status')\n")


class SharedExports:
    """Tiny checkpoints (4 classes, 64x64, tests/_tiny.make_checkpoint) and their exports, made once per session.

    Artifacts are shared: a test that changes one must copy it first."""

    def __init__(self, root: Path, plan: list[tuple], prefetch: bool):
        self.root = root
        self._ckpts: dict[str, Path] = {}
        self._done: dict[tuple, Path] = {}
        self._n = 0
        self._queue = list(plan) if prefetch else []
        self._proc: subprocess.Popen | None = None
        self._busy: tuple[tuple, Path] | None = None  # (key, out) the helper is making
        self._failed: set[tuple] = set()
        self.made_here = self.made_by_helper = 0

    def checkpoint(self, model: str) -> Path:
        import _tiny

        if model not in self._ckpts:
            self._ckpts[model] = _tiny.make_checkpoint(self.root / f"ckpt-{model}", model, EXPORT_HW)
        return self._ckpts[model]

    def _out(self, key: tuple) -> Path:
        self._n += 1
        return self.root / f"{key[0]}-{key[1]}-{key[2]}-{self._n}"

    def get(self, target: str, model: str, precision: str, **options) -> Path:
        key = export_key(target, model, precision, options)
        if key in self._queue:
            self._queue.remove(key)  # not started by the helper: made here
        if self._busy is not None and self._busy[0] == key:
            self._collect(wait=True)
        if key not in self._done:
            from edgeseg.export import export_checkpoint

            torch.set_num_threads(1)
            self._done[key] = export_checkpoint(self.checkpoint(model), target, precision, out=self._out(key),
                                                **options)
            self.made_here += 1
        self.pump()
        return self._done[key]

    # -- prefetch helper --------------------------------------------------------------------------------------
    def _collect(self, wait: bool) -> None:
        import time

        key, out = self._busy
        status = Path(str(out) + ".status")
        while not status.exists() and self._proc.poll() is None and wait:
            time.sleep(0.1)
        if status.exists():
            ok = status.read_text() == "ok" and (out / "manifest.json").is_file()
        elif self._proc.poll() is not None:  # the helper died (a converter crash): restarted on the next pump
            ok, self._proc = False, None
        else:
            return  # still working
        self._busy = None
        if ok:
            self._done[key] = out
            self.made_by_helper += 1
        else:
            self._failed.add(key)  # the test makes it itself and shows the real error

    def pump(self) -> None:
        """Collect the helper's finished export and hand it the next planned one (the last test's first)."""
        if self._busy is not None:
            self._collect(wait=False)
        while self._busy is None and self._queue:
            key = self._queue.pop()
            if key in self._done or key in self._failed:
                continue  # (a target whose tools are missing fails in the helper; the test then skips)
            if self._proc is None:
                env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
                log = open(self.root / f"helper-{self._n}.log", "w")
                self._proc = subprocess.Popen([sys.executable, "-c", _HELPER.format(tests=str(TESTS))],
                                              stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True,
                                              env=env, cwd=REPO)
                log.close()
            target, model, precision, options = key
            out = self._out(key)
            try:
                self._proc.stdin.write(json.dumps({"checkpoint": str(self.checkpoint(model)), "target": target,
                                                   "precision": precision, "out": str(out),
                                                   "options": dict(options)}) + "\n")
                self._proc.stdin.flush()
            except BrokenPipeError:  # the helper is gone: the tests make the rest themselves
                self._queue.clear()
                return
            self._busy = (key, out)

    def close(self) -> None:
        self._queue.clear()
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def _idle_cpus(seconds: float = 0.5) -> float:
    """Idle CPU cores over a short sample (/proc/stat; load average elsewhere). The helper only pays off on an
    idle core (CI's second one): on a machine others keep busy it just slows everyone, this run included."""
    import time

    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total

    n = os.cpu_count() or 1
    try:
        (i0, t0), _ = sample(), time.sleep(seconds)
        i1, t1 = sample()
        return n * (i1 - i0) / max(1, t1 - t0)
    except (OSError, ValueError, IndexError):
        return n - os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


@pytest.fixture(scope="session")
def exports(tmp_path_factory, pytestconfig):
    """`exports.get(target, model, precision, **options) -> artifact dir` and `exports.checkpoint(model)`."""
    plan = pytestconfig.stash.get(_PLAN, [])
    wanted = os.environ.get("EDGESEG_TEST_PREFETCH", "auto")
    prefetch = len(plan) > 1 and (wanted == "1" or (wanted == "auto" and (os.cpu_count() or 1) > 1
                                                    and _idle_cpus() >= 0.75))
    shared = SharedExports(tmp_path_factory.mktemp("exports"), plan, prefetch)
    pytestconfig.stash[_SHARED] = shared
    yield shared
    shared.close()


_SHARED = pytest.StashKey[SharedExports]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(f"garbage collector: {_GC['full']} full collections, {_GC['full_s']:.1f} s; younger "
                                f"generations {_GC['young_s']:.1f} s; {len(gc.get_objects())} objects tracked now")
    shared = config.stash.get(_SHARED, None)
    if shared is not None:  # a helper that always fails would only show as a slower run: say what it did
        terminalreporter.write_line(f"shared exports: {shared.made_here} made in tests, {shared.made_by_helper} by "
                                    f"the prefetch helper, {len(shared._failed)} failed in the helper "
                                    f"(logs: {shared.root}/helper-*.log)")


@pytest.fixture(autouse=True)
def _keep_prefetching(request):
    """Between tests, hand the helper its next export (only in sessions whose tests declared exports)."""
    if request.config.stash.get(_PLAN, []):
        request.getfixturevalue("exports").pump()
    yield


@pytest.fixture(scope="session")
def checkpoints(exports):
    """`checkpoints(model) -> checkpoint dir` of the shared tiny checkpoint of `model`."""
    return exports.checkpoint
