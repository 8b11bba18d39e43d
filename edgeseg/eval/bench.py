"""Latency benchmark of artifacts in their own runtimes: warm-up, timed runs, p50/p90/mean, throughput, each
artifact's own peak memory, model size, threads pinned; flags int8 artifacts that are not faster than their fp32
sibling.

Peak memory is per artifact, never the process's running maximum (which grows across artifacts and includes
whatever ran before, e.g. validation): on Linux the resident high-water mark is reset (`/proc/self/clear_refs`
"5") when the artifact's session is about to open and `VmHWM` is read after its runs, so `peak_rss_mb` is the
largest RSS of this process while that artifact was opened and run (`rss_before_mb`: the RSS it started from).
Elsewhere (or with `isolate=True`) each artifact runs in a fresh spawned child process and that process's peak
is reported (VmHWM where /proc has it, else ru_maxrss). `peak_rss_source` says which; a peak that could not be measured is None.

Times `Session.run(x)` on an input in the manifest's contract (model only: no image decode, resize or argmax on
the host). Structure is tested in CI; absolute timings belong to `edgeseg bench` and `bench/` scripts.

Thread pinning: `torch.set_num_threads(threads)` for PyTorch, and `num_threads` is handed to
`open_session(path, num_threads=N)` (ONNX Runtime `intra_op_num_threads`, OpenVINO `INFERENCE_NUM_THREADS`);
executorch 1.5.1's Python runtime cannot pin per session (XNNPACK's process-wide pool keeps its default). Each
record's `thread_control` says what was used.

Must not import heavy runtimes (they come in through `edgeseg.runtime`).
"""
from __future__ import annotations

import gc
import inspect
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from edgeseg.eval.compare import latency_stats
from edgeseg.eval.records import one_line
from edgeseg.eval.references import artifact_size_bytes

if TYPE_CHECKING:
    from edgeseg.artifact import Manifest

log = logging.getLogger(__name__)

def _thread_control(manifest) -> str:
    """How the artifact's runtime threads are pinned (`thread_control` of its target's profile, recorded in the
    manifest); the eager reference ("torch") uses torch.set_num_threads."""
    from edgeseg.errors import ArtifactError
    from edgeseg.targets import artifact_runtime

    if manifest.target == "torch":
        return "torch.set_num_threads"
    try:
        return artifact_runtime(manifest).get("thread_control") or "session num_threads"
    except ArtifactError:
        return "session num_threads"


def _rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # psutil missing or no /proc: report unknown, never fail the benchmark
        return None


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process since it started (ru_maxrss: KiB on Linux, bytes on macOS); only
    an artifact's own peak in a child process that ran nothing else."""
    try:
        import resource

        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return v / 2**20 if sys.platform == "darwin" else v / 2**10
    except Exception:  # Windows has no resource module
        return None


PEAK_SOURCE_HWM = "VmHWM after a clear_refs reset at this artifact's start (session open, warm-up, runs)"
PEAK_SOURCE_CHILD = "peak RSS of a spawned child process that ran only this artifact"


def _reset_peak() -> bool:
    """Reset this process's resident high-water mark to its current RSS (Linux); False where that is not
    possible (other OS, /proc not writable)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _hwm_mb() is not None
    except OSError:
        return False


def _hwm_mb() -> float | None:
    """VmHWM (resident high-water mark) of this process from /proc/self/status, MiB."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) / 2**10 if m else None


def make_input(manifest: "Manifest", seed: int = 0) -> np.ndarray:
    """A deterministic input in the artifact's contract (manifest `input.shape`/`dtype`)."""
    inp = manifest.input or {}
    shape = [int(v) for v in inp.get("shape") or [1, 3, *manifest.input_hw]]
    rng = np.random.default_rng(seed)
    if inp.get("dtype") == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(np.float32)


def _open(opener: Callable, path: Path, threads: int | None) -> tuple[Any, bool]:
    """Open a session, passing num_threads when the factory takes it. Returns (session, threads_passed)."""
    if threads is not None:
        try:
            params = inspect.signature(opener).parameters
        except (TypeError, ValueError):
            params = {}
        if "num_threads" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return opener(path, num_threads=threads), True
    return opener(path), False


def _default_opener(path, **kw):
    from edgeseg import vendorlog
    from edgeseg.runtime import open_session

    with vendorlog.quiet():  # what a runtime prints while it loads goes to the vendor log (no-op without one)
        return open_session(path, **kw)


def bench(artifacts: Sequence[str | Path], threads: int | None = 1, warmup: int = 3, runs: int = 20,
          progress: bool = True, open_session: Callable | None = None,
          isolate: bool | None = None) -> list[dict[str, Any]]:
    """Benchmark artifacts one after another (in this process, or each in a child process: `isolate`).

    Args:
        artifacts: artifact folders.
        threads: CPU threads every runtime is pinned to (None: each runtime's default).
        warmup: untimed runs first (>= 0).
        runs: timed runs (>= 1).
        progress: tqdm bar on stderr.
        open_session: session factory (default `edgeseg.runtime.open_session`; picklable for `isolate`).
        isolate: run each artifact in a spawned child process and report its own ru_maxrss; None: only where
            this process's high-water mark cannot be reset (not Linux).
    Returns:
        One record per artifact: target, precision, model, input_hw, artifact, name, status ("ok" | "failed" |
        "not run"), executed, threads, thread_control, warmup, runs, latency_ms {p50, p90, mean, min, max, n},
        throughput_ips (inferences/s at batch 1), peak_rss_mb (this artifact's own peak, see the module docstring),
        peak_rss_source, rss_before_mb (RSS when its session was about to open), rss_mb (after the runs),
        size_bytes, fallback_ops, speedup_vs_fp32 / int8_not_faster (int8 only, when its fp32 sibling was
        benchmarked in the same call), error.
    """
    import torch

    from edgeseg.errors import UsageError

    if runs < 1 or warmup < 0:
        raise UsageError(f"--runs {runs} / --warmup {warmup}: need runs >= 1 and warmup >= 0")
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads {threads}: must be >= 1")
        torch.set_num_threads(threads)
    opener = open_session or _default_opener
    it = [Path(a) for a in artifacts]
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="bench", unit="artifact", leave=False, dynamic_ncols=True)
    records = []
    for art in it:
        try:
            rec = _measured(art, opener, threads, warmup, runs, isolate)
        except Exception as e:  # a failed artifact is a FAILED record, and the caller exits non-zero
            log.debug("bench %s failed", art, exc_info=True)
            rec = _record(art, None)
            rec.update(status="failed", error=one_line(e))
        _log(rec)
        records.append(rec)
    flag_int8_not_faster(records)
    return records


def _measured(art: Path, opener: Callable, threads: int | None, warmup: int, runs: int,
              isolate: bool | None) -> dict[str, Any]:
    """`_bench_one` with the artifact's own peak RSS: in this process after a high-water-mark reset, or in a
    spawned child process."""
    if not isolate:
        gc.collect()  # the previous artifact's session goes before the mark is reset
        rss_before = _rss_mb()
        if _reset_peak():
            rec = _bench_one(art, opener, threads, warmup, runs, peak=_hwm_mb)
            rec.update(peak_rss_source=PEAK_SOURCE_HWM, rss_before_mb=rss_before)
            return rec
        if isolate is False:
            rec = _bench_one(art, opener, threads, warmup, runs, peak=lambda: None)
            rec["peak_rss_source"] = "not measured: the resident high-water mark cannot be reset on this host"
            return rec
    import multiprocessing
    import pickle

    try:
        pickle.dumps(opener)
    except Exception as e:  # noqa: BLE001 - e.g. a lambda: run here, and say the peak is unknown
        rec = _bench_one(art, opener, threads, warmup, runs, peak=lambda: None)
        rec["peak_rss_source"] = f"not measured: the session factory cannot go to a child process ({e})"
        return rec
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_bench_child, (art, opener, threads, warmup, runs))


def _bench_child(art: Path, opener: Callable, threads: int | None, warmup: int, runs: int) -> dict[str, Any]:
    """Child-process side of `isolate`: this process runs nothing else, so its peak is the artifact's. VmHWM
    where there is one: Linux carries ru_maxrss over fork+exec, so there it would hold the parent's RSS."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    hwm = _hwm_mb() is not None
    rec = _bench_one(art, opener, threads, warmup, runs, peak=_hwm_mb if hwm else _peak_rss_mb)
    rec.update(rss_before_mb=None, peak_rss_source=f"{PEAK_SOURCE_CHILD} ({'VmHWM' if hwm else 'ru_maxrss'})")
    return rec


def _record(art: Path, manifest: "Manifest | None") -> dict[str, Any]:
    def m(name: str) -> Any:
        return None if manifest is None else getattr(manifest, name)

    return {"artifact": str(art), "name": art.name, "target": m("target"), "precision": m("precision"),
            "model": m("model"), "input_hw": m("input_hw"),
            "input": {k: (m("input") or {}).get(k) for k in ("shape", "dtype", "layout")},
            "status": "ok", "executed": False, "threads": None, "thread_control": None, "warmup": 0, "runs": 0,
            "latency_ms": latency_stats([]), "throughput_ips": None, "peak_rss_mb": None, "peak_rss_source": None,
            "rss_before_mb": None, "rss_mb": None,
            "size_bytes": None, "fallback_ops": m("fallback_ops"), "speedup_vs_fp32": None,
            "int8_not_faster": None, "error": None}


def _bench_one(art: Path, opener: Callable, threads: int | None, warmup: int, runs: int,
               peak: Callable[[], float | None] = _peak_rss_mb) -> dict[str, Any]:
    import torch

    from edgeseg.artifact import read_manifest

    manifest = read_manifest(art)
    rec = _record(art, manifest)
    rec["size_bytes"] = artifact_size_bytes(art, manifest)
    # an artifact its exporter could not run is not opened at all (unlike validate, bench never tries)
    session, passed = _open(opener, art, threads) if manifest.executed_here else (None, False)
    rec["threads"] = threads if threads is not None else "runtime default"
    target = manifest.target or ""
    if session is None:
        rec["thread_control"] = "n/a (not run)"
    elif threads is None:
        rec["thread_control"] = "runtime default"
    elif passed:
        how = getattr(session, "thread_control", None) or _thread_control(manifest)
        rec["thread_control"] = f"{how}; torch.set_num_threads"
    else:
        rec["thread_control"] = (f"torch.set_num_threads only (session takes no num_threads; "
                                 f"{target} uses its runtime default, os.cpu_count()={os.cpu_count()})")
    if session is None or not session.executes_here:
        rec.update(status="not run", executed=False,
                   error=manifest.not_executed_reason or f"{target} cannot execute on this host")
        return rec
    rec["executed"] = True
    rec["float_compute"] = session.float_compute  # e.g. OpenVINO's bf16 inference precision
    x = make_input(manifest)
    for _ in range(warmup):
        session.run(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(x)
        times.append((time.perf_counter() - t) * 1e3)
    lat = latency_stats(times)
    rec.update(warmup=warmup, runs=runs, latency_ms=lat, torch_threads=torch.get_num_threads(),
               throughput_ips=1000.0 / lat["mean"] if lat["mean"] else None,
               peak_rss_mb=peak(), rss_mb=_rss_mb())
    close = getattr(session, "close", None)
    if callable(close):
        close()
    return rec


def flag_int8_not_faster(records: list[dict[str, Any]]) -> None:
    """For each int8 record, compare p50 with its fp32 sibling (same target, model and input size) in `records`:
    set `speedup_vs_fp32` (fp32 p50 / int8 p50) and `int8_not_faster` (True when the ratio is <= 1)."""
    fp32 = {}
    for r in records:
        if r.get("precision") == "fp32" and r.get("status") == "ok":
            fp32[(r["target"], r["model"], tuple(r["input_hw"] or ()))] = r
    for r in records:
        if r.get("precision") != "int8" or r.get("status") != "ok":
            continue
        base = fp32.get((r["target"], r["model"], tuple(r["input_hw"] or ())))
        if base is None:
            continue
        speedup = base["latency_ms"]["p50"] / r["latency_ms"]["p50"]
        r["speedup_vs_fp32"] = speedup
        r["int8_not_faster"] = bool(speedup <= 1.0)
        if r["int8_not_faster"]:
            log.warning("bench %s: int8 is NOT faster than fp32 on %s (%.2f ms vs %.2f ms p50)", r["name"],
                        r["target"], r["latency_ms"]["p50"], base["latency_ms"]["p50"])


def _log(rec: dict[str, Any]) -> None:
    if rec["status"] == "ok":
        lat = rec["latency_ms"]
        log.info("bench %s: p50 %.2f ms, p90 %.2f ms (%s threads: %s)", rec["name"], lat["p50"], lat["p90"],
                 rec["threads"], rec["thread_control"])
    else:
        log.info("bench %s: %s: %s", rec["name"], "FAILED" if rec["status"] == "failed" else "not run",
                 rec["error"])
