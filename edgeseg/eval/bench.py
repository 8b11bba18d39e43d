"""Latency benchmark of artifacts in their own runtimes: warm-up, timed runs, p50/p90/mean, throughput, process
peak memory, model size, threads pinned; flags int8 artifacts that are not faster than their fp32 sibling.

Times `Session.run(x)` on an input in the manifest's contract (model only: no image decode, resize or argmax on
the host). Structure is tested in CI; absolute timings belong to `edgeseg bench` and `bench/` scripts.

Thread pinning: `torch.set_num_threads(threads)` for PyTorch, and `num_threads` is handed to
`open_session(path, num_threads=N)` (ONNX Runtime `intra_op_num_threads`, OpenVINO `INFERENCE_NUM_THREADS`);
executorch 1.5.1's Python runtime cannot pin per session (XNNPACK's process-wide pool keeps its default). Each
record's `thread_control` says what was used.

Must not import heavy runtimes (they come in through `edgeseg.runtime`).
"""
from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeseg.eval.validate import (_one_line, _session_executes, artifact_size_bytes, latency_stats,
                                   read_manifest_dict)

log = logging.getLogger(__name__)

# How each runtime's threads are pinned when the session accepts `num_threads` (printed with the results).
THREAD_CONTROL = {
    "onnx": "onnxruntime SessionOptions.intra_op_num_threads",
    "jetson-tensorrt": "onnxruntime SessionOptions.intra_op_num_threads",
    "openvino": "openvino INFERENCE_NUM_THREADS",
    # executorch 1.5.1's Python runtime has no per-session thread setting: XNNPACK uses its process-wide pool
    "executorch-xnnpack": "NOT pinned: executorch XNNPACK process-wide threadpool (runtime default)",
    "torch": "torch.set_num_threads",
}


def _rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # psutil missing or no /proc: report unknown, never fail the benchmark
        return None


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        import resource
        import sys

        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return v / 2**20 if sys.platform == "darwin" else v / 2**10
    except Exception:  # Windows has no resource module
        return None


def make_input(manifest: dict[str, Any], seed: int = 0) -> np.ndarray:
    """A deterministic input in the artifact's contract (manifest `input.shape`/`dtype`)."""
    inp = manifest.get("input") or {}
    shape = [int(v) for v in inp.get("shape") or [1, 3, *manifest["input_hw"]]]
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
    from edgeseg.runtime import open_session

    return open_session(path, **kw)


def bench(artifacts: Sequence[str | Path], threads: int | None = 1, warmup: int = 3, runs: int = 20,
          progress: bool = True, open_session: Callable | None = None) -> list[dict[str, Any]]:
    """Benchmark artifacts one after another in this process.

    Args:
        artifacts: artifact folders.
        threads: CPU threads every runtime is pinned to (None: each runtime's default).
        warmup: untimed runs first (>= 0).
        runs: timed runs (>= 1).
        progress: tqdm bar on stderr.
        open_session: session factory (default `edgeseg.runtime.open_session`).
    Returns:
        One record per artifact: target, precision, model, input_hw, artifact, name, status ("ok" | "failed" |
        "not run"), executed, threads, thread_control, warmup, runs, latency_ms {p50, p90, mean, min, max, n},
        throughput_ips (inferences/s at batch 1), peak_rss_mb (process peak so far), rss_mb (after the runs),
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
            rec = _bench_one(art, opener, threads, warmup, runs)
        except Exception as e:  # a failed artifact is a FAILED record, and the caller exits non-zero
            log.debug("bench %s failed", art, exc_info=True)
            rec = _record(art, None)
            rec.update(status="failed", error=_one_line(e))
        _log(rec)
        records.append(rec)
    flag_int8_not_faster(records)
    return records


def _record(art: Path, manifest: dict[str, Any] | None) -> dict[str, Any]:
    m = manifest or {}
    return {"artifact": str(art), "name": art.name, "target": m.get("target"), "precision": m.get("precision"),
            "model": m.get("model"), "input_hw": m.get("input_hw"),
            "input": {k: (m.get("input") or {}).get(k) for k in ("shape", "dtype", "layout")},
            "status": "ok", "executed": False, "threads": None, "thread_control": None, "warmup": 0, "runs": 0,
            "latency_ms": latency_stats([]), "throughput_ips": None, "peak_rss_mb": None, "rss_mb": None,
            "size_bytes": None, "fallback_ops": m.get("fallback_ops"), "speedup_vs_fp32": None,
            "int8_not_faster": None, "error": None}


def _bench_one(art: Path, opener: Callable, threads: int | None, warmup: int, runs: int) -> dict[str, Any]:
    import torch

    manifest = read_manifest_dict(art)
    rec = _record(art, manifest)
    rec["size_bytes"] = artifact_size_bytes(art, manifest)
    session, passed = _open(opener, art, threads) if manifest.get("executed_here", True) else (None, False)
    rec["threads"] = threads if threads is not None else "runtime default"
    target = manifest.get("target") or ""
    if session is None:
        rec["thread_control"] = "n/a (not run)"
    elif threads is None:
        rec["thread_control"] = "runtime default"
    elif passed:
        how = getattr(session, "thread_control", None) or THREAD_CONTROL.get(target, "session num_threads")
        rec["thread_control"] = f"{how}; torch.set_num_threads"
    else:
        rec["thread_control"] = (f"torch.set_num_threads only (session takes no num_threads; "
                                 f"{target} uses its runtime default, os.cpu_count()={os.cpu_count()})")
    if not _session_executes(session, manifest):
        rec.update(status="not run", executed=False,
                   error=manifest.get("not_executed_reason") or f"{target} cannot execute on this host")
        return rec
    rec["executed"] = True
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
               peak_rss_mb=_peak_rss_mb(), rss_mb=_rss_mb())
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
