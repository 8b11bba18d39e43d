"""The main job: checkpoint + images -> export every target at fp32 and int8 -> validate -> bench -> report.

`run_pipeline()` with no arguments runs on the embedded default (the shipped checkpoint and the dozen shipped
CamVid val images). A step that fails for one target (an export error, a runtime that cannot load the artifact)
becomes a FAILED row with its one-line reason and makes the exit code non-zero; it never disappears.

Calibration vs evaluation on the embedded default: the 12 embedded images are split, deterministically, into a
calibration set (every 3rd image, 4 images) and an evaluation set (the other 8), so int8 is never judged on the
images it was calibrated on; the report says so. With `--data DIR` the exporter draws calibration images from the
dataset's `train` split when it has one (else from `val`, which the report flags as an overlap).

Output folder (written under a temporary name and swapped into place at the end; `--force` to overwrite):
    artifacts/<target>-<precision>/   exported artifacts (manifest.json each)
    data/{calib,eval}/                the embedded split (embedded default only)
    validation.json, bench.json       the records of `validate` and `bench`
    maps/*.npz                        a few label maps per artifact for the disagreement plots
    report/report.md, report/*.png    the report (`edgeseg.report.render`)
    pipeline.json                     rows, failures, timings, choices
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
EMBEDDED_CALIB_EVERY = 3  # every 3rd embedded image calibrates; the rest evaluate


@dataclass
class PipelineResult:
    """What `run_pipeline` returns: where it wrote, the report rows, and whether everything passed."""

    out: Path
    report: Path | None
    rows: list[dict[str, Any]]
    failures: list[str]
    seconds: float
    step_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0


def _one_line(e: BaseException) -> str:
    from edgeseg.eval.validate import _one_line as f

    return f(e)


def split_embedded(data_root: Path, dest: Path, every: int = EMBEDDED_CALIB_EVERY) -> tuple[Path, Path, dict]:
    """Copy a CamVid-layout `val`/`valannot` set into `dest/calib` (every `every`-th pair) and `dest/eval` (the
    rest), both in CamVid layout with split `val`. Returns (calib_root, eval_root, info)."""
    from edgeseg.data.datasets import open_dataset

    ds = open_dataset(data_root, split="val")
    calib, evl = dest / "calib", dest / "eval"
    names = {"calib": [], "eval": []}
    for i, (img, lab) in enumerate(zip(ds.image_paths, ds.label_paths)):
        part = "calib" if i % every == 0 else "eval"
        root = calib if part == "calib" else evl
        for src, sub in ((Path(img), "val"), (Path(lab), "valannot")):
            (root / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / sub / src.name)
        names[part].append(Path(img).name)
    if not names["calib"] or not names["eval"]:
        from edgeseg.errors import DataError

        raise DataError(f"{data_root}: too few images ({len(ds)}) to split into calibration and evaluation")
    return calib, evl, {"calibration_images": names["calib"], "evaluation_images": names["eval"]}


def _isolated_main() -> None:
    """Entry point of the child process of `call_isolated` (argv[1]: the request JSON file)."""
    import importlib
    import json
    import sys

    req = json.loads(Path(sys.argv[1]).read_text())
    logging.basicConfig(level=req["log_level"], format=req.get("log_prefix", "").replace("%", "%%") + "%(message)s")
    if req.get("threads"):
        import torch

        torch.set_num_threads(int(req["threads"]))
    try:
        mod, name = req["func"].split(":")
        msg = ["ok", str(getattr(importlib.import_module(mod), name)(*req["args"], **req["kwargs"]))]
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as one line
        msg = ["error", _one_line(e)]
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
        proc = subprocess.run([sys.executable, "-c", "from edgeseg.pipeline import _isolated_main; _isolated_main()",
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


# Relative export cost per target (measured on offseg_t at 192x256): the longest start first, so that concurrent
# export processes finish together (longest-processing-time-first scheduling).
EXPORT_COST = {"executorch-xnnpack": 6.0, "coreml": 4.0, "onnx": 1.5, "jetson-tensorrt": 1.5, "openvino": 1.0}


def _target_precisions(targets: Sequence[str] | None, precisions: Sequence[str]
                       ) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """(target, precision) jobs from the profiles, and FAILED rows for targets whose profile does not load."""
    from edgeseg.export.profiles import list_profiles, load_profile

    known = list_profiles()
    names = list(targets) if targets else known
    jobs, failed = [], []
    for t in names:
        if t not in known:
            from edgeseg.errors import UsageError

            raise UsageError(f"--targets: unknown target {t!r}; known: {', '.join(known)}")
        try:
            prof = load_profile(t)
        except Exception as e:  # a broken profile is a FAILED row for that target, not a crash of the run
            failed.append({"target": t, "precision": "all", "reason": _one_line(e)})
            continue
        ps = [p for p in precisions if p in prof.precisions]
        if not ps:
            failed.append({"target": t, "precision": "/".join(precisions),
                           "reason": f"profile supports only {', '.join(prof.precisions)}"})
        jobs += [(t, p) for p in ps]
    return jobs, failed


# Per-row export options of the main job. Core ML int8 here is weight-only: the W8A8 flow (executorch 1.5.1's
# CoreMLQuantizer: ~400 pattern re-traces + calibration) takes over 10 minutes on 2 cores, and Core ML cannot run
# on Linux anyway; `edgeseg export --target coreml --precision int8` still gives W8A8 (the profile default).
PIPELINE_OPTIONS: dict[tuple[str, str], dict[str, Any]] = {("coreml", "int8"): {"int8_mode": "weights"}}


def run_pipeline(checkpoint: str | Path | None = None, data: str | Path | None = None,
                 targets: Sequence[str] | None = None, out: str | Path = "runs/pipeline", force: bool = False, *,
                 precisions: Sequence[str] = PRECISIONS, split: str = "val", max_images: int | None = None,
                 threads: int | None = None, warmup: int = 2, runs: int = 10, num_maps: int = 2,
                 isolate_exports: bool = True, export_jobs: int | None = None,
                 progress: bool = True) -> PipelineResult:
    """Export, validate, bench and report in one go.

    Args:
        checkpoint: checkpoint folder; None = the shipped default (`default_checkpoint()`).
        data: dataset root; None = the embedded CamVid images (`default_data_dir()`), split into calibration and
            evaluation images (see the module docstring).
        targets: target names (default: every profile in export_targets/).
        out: output folder; refuses to overwrite it without `force`.
        force: replace an existing `out`.
        precisions: precisions to export per target (those its profile supports).
        split: evaluation split of `data`.
        max_images: validate on the first N evaluation images only.
        threads: CPU threads for bench (default: min(4, cpu count)).
        warmup, runs: bench warm-up and timed runs per artifact.
        num_maps: label maps saved per artifact for the disagreement plots.
        isolate_exports: run each export in its own process (a converter that crashes the interpreter then
            fails only its own row); False runs them in this process, one after the other.
        export_jobs: exports running at once (isolated processes; default: the CPU count, at most 4). Most of an
            export is single-threaded graph work (torch.export, partitioning, conversion), so on 2 cores two at
            once take about half the wall time; each process gets cpu_count // export_jobs threads.
        progress: tqdm step bar on stderr.
    Returns:
        PipelineResult; `exit_code` is 1 if any target failed to export, validate or bench, or failed a check.
    """
    from tqdm import tqdm

    from edgeseg.data.embedded import default_checkpoint, default_data_dir
    from edgeseg.errors import UsageError
    from edgeseg.eval.bench import bench
    from edgeseg.eval.validate import failed_record, validate
    from edgeseg.export import export_checkpoint
    from edgeseg.fileio import atomic_dir, write_json, write_text
    from edgeseg.report.render import merge, render

    t_start = time.perf_counter()
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"--out {out}: already exists; pass --force to overwrite it")
    ckpt = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    if not (ckpt / "model.json").is_file():
        raise UsageError(f"--checkpoint {ckpt}: not a checkpoint folder (model.json + model.safetensors)")
    embedded = data is None
    data_root = default_data_dir() if embedded else Path(data)
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    jobs, profile_failures = _target_precisions(targets, precisions)
    notes: list[str] = [f"Checkpoint: `{ckpt}`"]
    steps: dict[str, float] = {}

    with atomic_dir(out, force=force) as tmp:
        total = 1 + len(jobs) + 3
        bar = tqdm(total=total, desc="pipeline", unit="step", disable=not progress, dynamic_ncols=True)

        done = [0]

        def step(name: str):
            done[0] += 1
            bar.set_postfix_str(name)
            log.info("[%d/%d] %s", done[0], total, name)

        # 1. data: calibration / evaluation images
        step("data")
        t = time.perf_counter()
        if embedded:
            calib_root, eval_root, split_info = split_embedded(data_root, tmp / "data")
            eval_split = "val"
            notes.append(f"Embedded default data `{data_root}`: split deterministically into "
                         f"{len(split_info['calibration_images'])} calibration images (every "
                         f"{EMBEDDED_CALIB_EVERY}rd) and {len(split_info['evaluation_images'])} evaluation images; "
                         "calibration and evaluation do not overlap. The set is tiny: numbers are indicative only.")
        else:
            calib_root, eval_root, eval_split, split_info = data_root, data_root, split, {}
            notes.append(f"Calibration images come from `{data_root}` (its train split when present; see each "
                         "manifest's calibration source); evaluation on split "
                         f"`{split}`.")
        steps["data"] = time.perf_counter() - t
        bar.update(1)

        # 2. export every (target, precision)
        artifacts: list[Path] = []
        failed_exports: list[dict[str, Any]] = [failed_record(f["target"], f["precision"], f["reason"])
                                                for f in profile_failures]
        t = time.perf_counter()
        ncpu = os.cpu_count() or 1
        njobs = max(1, min(export_jobs or min(4, ncpu), len(jobs) or 1)) if isolate_exports else 1
        per_job_threads = max(1, ncpu // njobs) if njobs > 1 else None
        order = sorted(jobs, key=lambda j: -EXPORT_COST.get(j[0], 1.0) * (1.5 if j[1] == "int8" else 1.0))
        results: dict[tuple[str, str], Any] = {}

        def one_export(job: tuple[str, str]) -> tuple[tuple[str, str], Any, float]:
            target, precision = job
            dest = tmp / "artifacts" / f"{target}-{precision}"
            t0 = time.perf_counter()
            log.info("export %s %s: started", target, precision)
            kw = dict(calib=calib_root if precision == "int8" else None, out=dest, force=True, progress=False,
                      **PIPELINE_OPTIONS.get((target, precision), {}))
            try:
                if isolate_exports:
                    art = export_isolated(ckpt, target, precision, _threads=per_job_threads,
                                          _log_prefix=f"[{target} {precision}] " if njobs > 1 else "", **kw)
                else:
                    art = export_checkpoint(ckpt, target, precision, **kw)
                return job, art, time.perf_counter() - t0
            except Exception as e:  # a failed target is a FAILED row and a non-zero exit, never dropped
                log.debug("export %s %s failed", target, precision, exc_info=True)
                return job, e, time.perf_counter() - t0

        if njobs > 1:
            log.info("exporting %d artifacts, %d at once (%d thread(s) each)", len(order), njobs, per_job_threads)
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(max_workers=njobs) as pool:  # threads only wait on the export processes
            futures = [pool.submit(one_export, j) for j in order]
            for fut in as_completed(futures):
                (target, precision), res, secs = fut.result()
                step(f"export {target} {precision}")
                results[(target, precision)] = res
                if isinstance(res, Exception):
                    reason = f"export: {_one_line(res)}"
                    log.error("export %s %s: FAILED: %s (%.1f s)", target, precision, reason, secs)
                else:
                    log.info("export %s %s: ok (%.1f s)", target, precision, secs)
                bar.update(1)
        # rows in the profiles' order, whatever order the exports finished in
        for target, precision in jobs:
            res = results[(target, precision)]
            if isinstance(res, Exception):
                failed_exports.append(failed_record(target, precision, f"export: {_one_line(res)}",
                                                    artifact=tmp / "artifacts" / f"{target}-{precision}"))
            else:
                artifacts.append(res)
        steps["export"] = time.perf_counter() - t

        # 3. validate (reference: each artifact's source checkpoint, eager PyTorch)
        step("validate")
        t = time.perf_counter()
        vrecs = validate(artifacts, eval_root, split=eval_split, max_images=max_images, maps_dir=tmp / "maps",
                         num_maps=num_maps, progress=progress) if artifacts else []
        vrecs = vrecs + failed_exports
        steps["validate"] = time.perf_counter() - t
        bar.update(1)

        # 4. bench
        step("bench")
        t = time.perf_counter()
        brecs = bench(artifacts, threads=threads, warmup=warmup, runs=runs, progress=progress) if artifacts else []
        steps["bench"] = time.perf_counter() - t
        bar.update(1)

        # 5. report
        step("report")
        t = time.perf_counter()
        final = str(out.resolve())
        vrecs = _rebase(vrecs, str(tmp), final)
        brecs = _rebase(brecs, str(tmp), final)
        write_json(tmp / "validation.json", vrecs)
        write_json(tmp / "bench.json", brecs)
        # the report reads the npz maps now, from the temporary folder; paths in its JSON name the final folder
        report = render(_rebase(vrecs, final, str(tmp)), _rebase(brecs, final, str(tmp)), tmp / "report", notes=notes,
                        title="edgeseg pipeline report")
        _rebase_file(tmp / "report" / "results.json", str(tmp), final)
        md = tmp / "report" / report.name
        write_text(md, md.read_text().replace(str(tmp), final))
        steps["report"] = time.perf_counter() - t
        bar.update(1)
        bar.close()

        rows = merge(vrecs, brecs)
        failures = []
        for r in rows:
            if r["status"] == "failed" or r.get("passed") is False:
                why = r.get("error") or "; ".join(r.get("reasons") or [])
                failures.append(f"{r.get('target')} {r.get('precision')}: {why}")
        seconds = time.perf_counter() - t_start
        write_json(tmp / "pipeline.json", {
            "checkpoint": str(ckpt), "data": str(data_root), "embedded": embedded, "split": split_info,
            "targets": sorted({t for t, _ in jobs} | {f["target"] for f in profile_failures}),
            "precisions": list(precisions), "threads": threads, "warmup": warmup, "runs": runs,
            "rows": rows, "failures": failures, "notes": notes,
            "step_seconds": {k: round(v, 2) for k, v in steps.items()}, "seconds": round(seconds, 2)})
    report_final = out / "report" / report.name
    for f in failures:
        log.error("FAILED %s", f)
    log.info("pipeline: %d artifacts, %d failures, %.1f s; report %s", len(artifacts), len(failures), seconds,
             report_final)
    return PipelineResult(out=out, report=report_final, rows=rows, failures=failures, seconds=seconds,
                          step_seconds=steps, notes=notes)


def _rebase(obj: Any, old: str, new: str) -> Any:
    """Replace the path prefix `old` by `new` in every string of a JSON-like object."""
    if isinstance(obj, str):
        return new + obj[len(old):] if obj.startswith(old) else obj
    if isinstance(obj, list):
        return [_rebase(v, old, new) for v in obj]
    if isinstance(obj, dict):
        return {k: _rebase(v, old, new) for k, v in obj.items()}
    return obj


def _rebase_file(path: Path, old: str, new: str) -> None:
    import json

    from edgeseg.fileio import write_json

    write_json(path, _rebase(json.loads(path.read_text()), old, new))
