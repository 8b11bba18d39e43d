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
    report/report.html                the same report in one self-contained page (plots inlined)
    pipeline.json                     rows, failures, timings, choices, the CPU every latency was measured on
    vendor.log                        converter/runtime output (`edgeseg pipeline` only; edgeseg/vendorlog.py)
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from edgeseg.errors import describe
from edgeseg.isolate import export_isolated

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


def split_embedded(data_root: Path, dest: Path, every: int = EMBEDDED_CALIB_EVERY) -> tuple[Path, Path, dict]:
    """Copy a CamVid-layout `val`/`valannot` set into `dest/calib` (every `every`-th pair) and `dest/eval` (the
    rest), both in CamVid layout with split `val`. Returns (calib_root, eval_root, info)."""
    from edgeseg.data.formats import open_dataset

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


@dataclass
class _Run:
    """What the steps of one run share: the checkpoint, the temporary output folder, the step bar (with its
    "[i/n] name" log lines) and each step's seconds."""

    ckpt: Path
    tmp: Path
    total: int
    progress: bool
    input_hw: tuple[int, int] | None = None  # export size (None: the checkpoint's)
    seconds: dict[str, float] = field(default_factory=dict)
    done: int = 0
    bar: Any = None

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc="pipeline", unit="step", disable=not self.progress,
                        dynamic_ncols=True)

    def step(self, name: str) -> None:
        self.done += 1
        self.bar.set_postfix_str(name)
        log.info("[%d/%d] %s", self.done, self.total, name)

    @contextlib.contextmanager
    def timed(self, key: str, name: str | None = None):
        """Time a step into `seconds[key]`; with `name`, also announce it and advance the bar once it is done."""
        if name:
            self.step(name)
        t = time.perf_counter()
        yield
        self.seconds[key] = time.perf_counter() - t
        if name:
            self.bar.update(1)


def _plan(targets: Sequence[str] | None, precisions: Sequence[str]
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
            failed.append({"target": t, "precision": "all", "reason": describe(e)})
            continue
        ps = [p for p in precisions if p in prof.precisions]
        if not ps:
            failed.append({"target": t, "precision": "/".join(precisions),
                           "reason": f"profile supports only {', '.join(prof.precisions)}"})
        jobs += [(t, p) for p in ps]
    return jobs, failed


def _data(run: _Run, data_root: Path, embedded: bool, split: str, notes: list[str]
          ) -> tuple[Path, Path, str, dict[str, Any]]:
    """Step 1: the calibration and evaluation images -> (calib_root, eval_root, eval_split, split_info)."""
    with run.timed("data", "data"):
        if embedded:
            calib_root, eval_root, split_info = split_embedded(data_root, run.tmp / "data")
            notes.append(f"Embedded default data `{data_root}`: split deterministically into "
                         f"{len(split_info['calibration_images'])} calibration images (every "
                         f"{EMBEDDED_CALIB_EVERY}rd) and {len(split_info['evaluation_images'])} evaluation images; "
                         "calibration and evaluation do not overlap. The set is tiny: numbers are indicative only.")
            return calib_root, eval_root, "val", split_info
        notes.append(f"Calibration images come from `{data_root}` (its train split when present; see each "
                     "manifest's calibration source); evaluation on split "
                     f"`{split}`.")
    return data_root, data_root, split, {}


def _export_order(jobs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The costliest export first (each profile's `export_cost`, int8 half as costly again), so that concurrent
    export processes finish together (longest-processing-time-first scheduling)."""
    from edgeseg.targets import load_profile

    cost = {t: load_profile(t).export_cost for t in dict.fromkeys(t for t, _ in jobs)}
    return sorted(jobs, key=lambda j: -cost[j[0]] * (1.5 if j[1] == "int8" else 1.0))


def _export_one(run: _Run, job: tuple[str, str], calib_root: Path, isolate: bool, njobs: int,
                threads: int | None) -> tuple[tuple[str, str], Any, float]:
    """One export -> (job, artifact folder or the exception, seconds)."""
    from edgeseg.export import export_checkpoint
    from edgeseg.targets import load_profile

    target, precision = job
    dest = run.tmp / "artifacts" / f"{target}-{precision}"
    t0 = time.perf_counter()
    log.info("export %s %s: started", target, precision)
    kw = dict(calib=calib_root if precision == "int8" else None, out=dest, force=True, progress=False,
              input_hw=list(run.input_hw) if run.input_hw else None,
              **load_profile(target).pipeline_options.get(precision, {}))
    try:
        if isolate:
            art = export_isolated(run.ckpt, target, precision, _threads=threads,
                                  _log_prefix=f"[{target} {precision}] " if njobs > 1 else "", **kw)
        else:
            art = export_checkpoint(run.ckpt, target, precision, **kw)
        return job, art, time.perf_counter() - t0
    except Exception as e:  # a failed target is a FAILED row and a non-zero exit, never dropped
        log.debug("export %s %s failed", target, precision, exc_info=True)
        return job, e, time.perf_counter() - t0


def _export_all(run: _Run, jobs: list[tuple[str, str]], calib_root: Path, isolate: bool,
                export_jobs: int | None) -> dict[tuple[str, str], Any]:
    """Step 2: export every (target, precision), `export_jobs` at once -> job -> artifact folder or exception."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    ncpu = os.cpu_count() or 1
    njobs = max(1, min(export_jobs or min(4, ncpu), len(jobs) or 1)) if isolate else 1
    per_job_threads = max(1, ncpu // njobs) if njobs > 1 else None
    order = _export_order(jobs)
    results: dict[tuple[str, str], Any] = {}
    if njobs > 1:
        log.info("exporting %d artifacts, %d at once (%d thread(s) each)", len(order), njobs, per_job_threads)
    with ThreadPoolExecutor(max_workers=njobs) as pool:  # threads only wait on the export processes
        futures = [pool.submit(_export_one, run, j, calib_root, isolate, njobs, per_job_threads) for j in order]
        for fut in as_completed(futures):
            (target, precision), res, secs = fut.result()
            run.step(f"export {target} {precision}")
            results[(target, precision)] = res
            if isinstance(res, Exception):
                reason = f"export: {describe(res)}"
                log.error("export %s %s: FAILED: %s (%.1f s)", target, precision, reason, secs)
            else:
                log.info("export %s %s: ok (%.1f s)", target, precision, secs)
            run.bar.update(1)
    return results


def _artifacts(run: _Run, jobs: list[tuple[str, str]], results: dict[tuple[str, str], Any],
               profile_failures: list[dict[str, Any]]) -> tuple[list[Path], list[dict[str, Any]]]:
    """(artifact folders, FAILED records) in the profiles' order, whatever order the exports finished in."""
    from edgeseg.eval.validate import failed_record

    failed = [failed_record(f["target"], f["precision"], f["reason"]) for f in profile_failures]
    artifacts: list[Path] = []
    for target, precision in jobs:
        res = results[(target, precision)]
        if isinstance(res, Exception):
            failed.append(failed_record(target, precision, f"export: {describe(res)}",
                                        artifact=run.tmp / "artifacts" / f"{target}-{precision}"))
        else:
            artifacts.append(res)
    return artifacts, failed


def _validate_all(run: _Run, artifacts: list[Path], eval_root: Path, eval_split: str, cpu: dict[str, Any],
                  max_images: int | None, num_maps: int) -> list[dict[str, Any]]:
    """Step 3: validate every artifact (reference: its source checkpoint, eager PyTorch)."""
    from edgeseg import vendorlog
    from edgeseg.eval.validate import validate

    with run.timed("validate", "validate"):
        with vendorlog.quiet(python_too=False):  # runtimes' native output to the vendor log, our bars stay
            vrecs = validate(artifacts, eval_root, split=eval_split, max_images=max_images,
                             maps_dir=run.tmp / "maps", num_maps=num_maps, progress=run.progress) if artifacts else []
    return [{**r, "cpu": cpu} for r in vrecs]


def _bench_all(run: _Run, artifacts: list[Path], cpu: dict[str, Any], threads: int, warmup: int,
               runs: int) -> list[dict[str, Any]]:
    """Step 4: bench every artifact."""
    from edgeseg import vendorlog
    from edgeseg.eval.bench import bench

    with run.timed("bench", "bench"):
        with vendorlog.quiet(python_too=False):
            brecs = bench(artifacts, threads=threads, warmup=warmup, runs=runs,
                          progress=run.progress) if artifacts else []
    return [{**r, "cpu": cpu} for r in brecs]  # the host every latency was measured on


def _report(run: _Run, out: Path, vrecs: list[dict[str, Any]], brecs: list[dict[str, Any]], notes: list[str]
            ) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Step 5: validation.json, bench.json and the report -> (report file name, validation records, bench records).
    Every path inside the run folder is recorded relative to it (artifacts/<target>-<precision>, maps/..., data/eval), so the
    records stay true when the folder moves: from its temporary name to `out` now, or anywhere later."""
    from edgeseg.fileio import write_json
    from edgeseg.report.render import render

    tmp = run.tmp
    with run.timed("report", "report"):
        vrecs, brecs = _relative(vrecs, tmp), _relative(brecs, tmp)
        write_json(tmp / "validation.json", vrecs)
        write_json(tmp / "bench.json", brecs)
        report = render(vrecs, brecs, tmp / "report", notes=notes, title="edgeseg pipeline report", base=tmp)
    run.bar.close()
    return report.name, vrecs, brecs


def _failures(rows: list[dict[str, Any]]) -> list[str]:
    """One "target precision: why" line per row that failed or failed a check."""
    return [f"{r.get('target')} {r.get('precision')}: {r.get('error') or '; '.join(r.get('reasons') or [])}"
            for r in rows if r["status"] == "failed" or r.get("passed") is False]


def run_pipeline(checkpoint: str | Path | None = None, data: str | Path | None = None,
                 targets: Sequence[str] | None = None, out: str | Path = "runs/pipeline", force: bool = False, *,
                 precisions: Sequence[str] = PRECISIONS, split: str = "val", max_images: int | None = None,
                 threads: int | None = None, warmup: int = 2, runs: int = 10, num_maps: int = 2,
                 isolate_exports: bool = True, export_jobs: int | None = None,
                 input_hw: Sequence[int] | None = None, progress: bool = True) -> PipelineResult:
    """Export, validate, bench and report in one go.

    Args:
        checkpoint: checkpoint folder; None = the shipped default (`default_checkpoint()`).
        data: dataset root; None = the embedded CamVid images (`default_data_dir()`), split into calibration and
            evaluation images (see the module docstring).
        targets: target names (default: every profile in export_targets/).
        out, force: output folder; an existing one is replaced only with `force`.
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
        input_hw: (H, W) every artifact is exported, validated and timed at (multiples of 32); None = the
            checkpoint's input size. The eager reference runs at the same size.
        progress: tqdm step bar on stderr.
    Returns:
        PipelineResult; `exit_code` is 1 if any target failed to export, validate or bench, or failed a check.
    """
    from edgeseg import vendorlog
    from edgeseg.cpu import host_cpu
    from edgeseg.data.embedded import default_checkpoint, default_data_dir
    from edgeseg.errors import UsageError
    from edgeseg.fileio import atomic_dir, write_json
    from edgeseg.outputs import Output, check_outputs
    from edgeseg.report.render import merge

    t_start = time.perf_counter()
    out = Path(out)
    check_outputs(force, [Output("--out", out, "dir")], [("--checkpoint", checkpoint), ("--data", data)])
    ckpt = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    if not (ckpt / "model.json").is_file():
        raise UsageError(f"--checkpoint {ckpt}: not a checkpoint folder (model.json + model.safetensors)")
    embedded = data is None
    data_root = default_data_dir() if embedded else Path(data)
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    jobs, profile_failures = _plan(targets, precisions)
    vendorlog.place(out / "vendor.log")
    cpu = {**host_cpu().to_json(), "summary": host_cpu().summary()}
    notes: list[str] = [f"Checkpoint: `{ckpt}`", "Paths inside the run folder (artifacts/, maps/, data/) are relative "
                        "to it, in the report and in every JSON of the run"]

    with atomic_dir(out, force=force) as tmp:
        run = _Run(ckpt=ckpt, tmp=tmp, total=1 + len(jobs) + 3, progress=progress,
                   input_hw=tuple(int(v) for v in input_hw) if input_hw else None)
        calib_root, eval_root, eval_split, split_info = _data(run, data_root, embedded, split, notes)
        with run.timed("export"):
            results = _export_all(run, jobs, calib_root, isolate_exports, export_jobs)
            artifacts, failed_exports = _artifacts(run, jobs, results, profile_failures)
        vrecs = _validate_all(run, artifacts, eval_root, eval_split, cpu, max_images, num_maps) + failed_exports
        brecs = _bench_all(run, artifacts, cpu, threads, warmup, runs)
        report_name, vrecs, brecs = _report(run, out, vrecs, brecs, notes)
        rows = merge(vrecs, brecs)
        failures = _failures(rows)
        seconds = time.perf_counter() - t_start
        write_json(tmp / "pipeline.json", {
            "checkpoint": str(ckpt), "data": str(data_root), "embedded": embedded, "split": split_info,
            "targets": sorted({t for t, _ in jobs} | {f["target"] for f in profile_failures}),
            "precisions": list(precisions), "input_hw": list(run.input_hw) if run.input_hw else None,
            "threads": threads, "warmup": warmup, "runs": runs, "cpu": cpu,
            "rows": rows, "failures": failures, "notes": notes,
            "step_seconds": {k: round(v, 2) for k, v in run.seconds.items()}, "seconds": round(seconds, 2)})
    report_final = out / "report" / report_name
    for f in failures:
        log.error("FAILED %s", f)
    log.info("pipeline: %d artifacts, %d failures, %.1f s; report %s", len(artifacts), len(failures), seconds,
             report_final)
    return PipelineResult(out=out, report=report_final, rows=rows, failures=failures, seconds=seconds,
                          step_seconds=run.seconds, notes=notes)


def _relative(obj: Any, root: Path) -> Any:
    """Every string of a JSON-like object that is a path inside `root`, made relative to it (POSIX form)."""
    if isinstance(obj, str):
        p = Path(obj)
        if p.is_absolute() and p.is_relative_to(root):
            return p.relative_to(root).as_posix() or "."
        return obj
    if isinstance(obj, list):
        return [_relative(v, root) for v in obj]
    if isinstance(obj, dict):
        return {k: _relative(v, root) for k, v in obj.items()}
    return obj
