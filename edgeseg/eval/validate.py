"""Validation of exported artifacts on real images, each in its own runtime, against a reference.

One job: run every artifact over a dataset with the preprocessing its manifest describes (through
`edgeseg.runtime.open_session(...).segment`), compute mIoU / per-class IoU / aAcc / mAcc, and compare its argmax
maps with a reference (an fp32 artifact, or the eager PyTorch checkpoint): mIoU drop, per-class IoU deltas, pixel
agreement, and whether the disagreement sits on class boundaries or in the interior of regions.

Returns one JSON-able record per artifact; a record never hides a failure: an artifact that cannot be opened or
run is a record with `status: "failed"`, `passed: False` and the one-line reason; one that this host cannot execute
(Core ML on Linux) is `status: "not run"`, `executed: False`, `passed: None`; one that ran but had no reference to
compare with is `status: "ok"`, `passed: None`, `verdict: "no reference"` (an mIoU alone is not a pass).
`verdict` is one of "pass", "fail", "no reference", "not run", "failed".

This module runs the artifacts; the scoring is `edgeseg.eval.compare`, the references `edgeseg.eval.references`,
the records `edgeseg.eval.records` (their public names are re-exported here).

Must not import heavy runtimes (they come in through `edgeseg.runtime`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from edgeseg.errors import ArtifactError
from edgeseg.eval.compare import (DEFAULT_MAX_MIOU_DROP, DEFAULT_MIN_AGREEMENT, Agreement, Thresholds,
                                  boundary_mask, judge, latency_stats)
from edgeseg.eval.records import (artifact_failed_record, base_record, failed_record, load_records, log_record,
                                  one_line)
from edgeseg.eval.references import (MANIFEST, ReferenceCache, artifact_size_bytes, find_fp32_sibling, is_artifact,
                                     is_checkpoint, progress_bar, read_manifest_dict, resolve_reference)

if TYPE_CHECKING:
    from edgeseg.artifact import Manifest

log = logging.getLogger(__name__)


__all__ = ["DEFAULT_MAX_MIOU_DROP", "DEFAULT_MIN_AGREEMENT", "MANIFEST", "Thresholds", "artifact_size_bytes",
           "boundary_mask", "failed_record", "find_fp32_sibling", "is_artifact", "is_checkpoint", "latency_stats",
           "load_records", "read_manifest_dict", "resolve_reference", "validate"]


def _default_opener(path: Path):
    from edgeseg import vendorlog
    from edgeseg.runtime import open_session

    with vendorlog.quiet():  # what a runtime prints while it loads goes to the vendor log (no-op without one)
        return open_session(path)


@dataclass
class _Job:
    """What every artifact of one `validate` call shares."""

    dataset: Any
    indices: list[int]
    reference: str | Path | None
    refs: ReferenceCache
    opener: Callable
    boundary_px: int
    maps_dir: str | Path | None
    num_maps: int
    thresholds: Thresholds
    progress: bool


def validate(artifacts: Sequence[str | Path], data: str | Path, split: str = "val",
             reference: str | Path | None = None, *, boundary_px: int = 3, max_images: int | None = None,
             maps_dir: str | Path | None = None, num_maps: int = 3, thresholds: Thresholds | None = None,
             progress: bool = True, open_session: Callable | None = None) -> list[dict[str, Any]]:
    """Validate artifacts on a dataset, each in its own runtime, against a reference.

    Args:
        artifacts: artifact folders (each with manifest.json).
        data: dataset root (any layout `open_dataset` reads).
        split: dataset split ("val" | "test" | ...).
        reference: an fp32 artifact folder or a checkpoint folder used for every artifact; None picks, per
            artifact, its recorded source checkpoint, else its fp32 sibling (see `resolve_reference`).
        boundary_px: pixels within this distance of a reference class edge count as boundary.
        max_images: validate on the first N images only (None: all).
        maps_dir: if set, save the first `num_maps` (image, label, prediction, reference) maps of each artifact as
            `<maps_dir>/<artifact folder name>.npz` for the report's disagreement maps.
        thresholds: pass/fail rules; default `Thresholds()`.
        progress: tqdm bars on stderr.
        open_session: the session factory (default `edgeseg.runtime.open_session`).
    Returns:
        One record per artifact (see module docstring and `edgeseg.eval.records.base_record`), in the order given.
    Raises:
        DataError if the dataset cannot be opened; UsageError for a bad `reference`.
    """
    from edgeseg.data.formats import open_dataset

    opener = open_session or _default_opener
    dataset = open_dataset(data, split=split)
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    if n == 0:
        from edgeseg.errors import DataError

        raise DataError(f"{data}: split {split!r} holds no images")
    job = _Job(dataset, list(range(n)), reference, ReferenceCache(opener), opener, boundary_px, maps_dir, num_maps,
               thresholds or Thresholds(), progress)
    from edgeseg.cpu import host_cpu

    cpu = {**host_cpu().to_json(), "summary": host_cpu().summary()}
    records = []
    for art in artifacts:
        art = Path(art)
        t0 = time.perf_counter()
        try:
            rec = _validate_one(art, job)
        except Exception as e:  # one failed artifact is a FAILED record, never a silently dropped one
            log.debug("validate %s failed", art, exc_info=True)
            rec = artifact_failed_record(art, one_line(e))
        rec["validate_seconds"] = round(time.perf_counter() - t0, 3)
        rec["data"] = {"root": str(data), "split": split, "num_images": n}
        rec["cpu"] = cpu  # the host its per-image latencies were measured on (the table and report name it)
        log_record(rec)
        records.append(rec)
    return records


def _open_or_not_run(art: Path, manifest: "Manifest", opener: Callable):
    """Open the artifact's session (sha256 checked first). For an artifact its exporter marked as not executable
    here (Core ML on Linux), a runtime that cannot even load it gives None (after the hash check) instead of an
    error; anything else that fails to open raises."""
    if manifest.executed_here:
        return opener(art)
    from edgeseg.artifact import verify_manifest

    verify_manifest(art)
    try:
        return opener(art)
    except Exception as e:  # the runtime is absent on this OS; the artifact is "converted, not run"
        log.debug("%s: session not opened on this host: %s", art, e)
        return None


def _validate_one(art: Path, job: _Job) -> dict[str, Any]:
    from edgeseg.artifact import read_manifest

    manifest = read_manifest(art)
    rec = base_record(art, manifest)
    rec["size_bytes"] = artifact_size_bytes(art, manifest)
    session = _open_or_not_run(art, manifest, job.opener)
    if session is None or not session.executes_here:
        why = manifest.not_executed_reason or f"{manifest.target} cannot execute on this host"
        rec.update(status="not run", executed=False, passed=None, verdict="not run", notes=[f"not run: {why}"])
        return rec
    rec["executed"] = True
    rec["float_compute"] = session.float_compute  # e.g. OpenVINO's bf16 inference precision
    rec["notes"] += list(getattr(session, "notes", []))  # how this host runs it (e.g. the Jetson int8 emulation)
    class_names, ignore_index = _classes(art, manifest, job.dataset)
    input_hw = tuple(int(v) for v in manifest.input_hw or manifest.input["shape"][-2:])
    ref_maps, ref_metrics = _reference_maps(art, manifest, rec, job, input_hw, len(class_names), ignore_index)
    res, agree, times, saved = _run_artifact(art, session, job, ref_maps, len(class_names), ignore_index)
    rec.update(miou=res["miou"], aacc=res["aacc"], macc=res["macc"], per_class_iou=res["per_class_iou"],
               num_images=len(job.indices), class_names=class_names,
               # the first call pays one-off runtime set-up; keep it out of the latency figures
               latency_ms=latency_stats(times[1:] if len(times) > 1 else times))
    if ref_metrics is not None:
        rec["reference_miou"] = ref_metrics["miou"]
        rec["miou_drop"] = ref_metrics["miou"] - res["miou"]
        rec["per_class_iou_delta"] = [None if (a is None or b is None) else a - b
                                      for a, b in zip(res["per_class_iou"], ref_metrics["per_class_iou"])]
        rec.update(agree.result())
        rec["boundary_px"] = job.boundary_px
    if saved:
        rec["maps"] = _save_maps(art, job.maps_dir, class_names, manifest, saved)
    judge(rec, job.thresholds)
    return rec


def _classes(art: Path, manifest: "Manifest", dataset) -> tuple[list[str], int]:
    """(class names, ignore index) of the artifact, which must have as many classes as the dataset."""
    class_names = list(manifest.class_names or dataset.info.class_names)
    num_classes = len(class_names)
    if dataset.info.num_classes != num_classes:
        raise ArtifactError(f"{art}: artifact has {num_classes} classes, dataset {dataset.info.name!r} has "
                            f"{dataset.info.num_classes}")
    return class_names, int(manifest.ignore_index)


def _reference_maps(art: Path, manifest: "Manifest", rec: dict[str, Any], job: _Job, input_hw: tuple[int, ...],
                    num_classes: int, ignore_index: int) -> tuple[list[np.ndarray] | None, dict | None]:
    """The reference's label maps and metrics (None, None without a reference); notes the choice in `rec`."""
    ref = resolve_reference(art, manifest, job.reference)
    if ref is None:
        rec["notes"].append("no reference (no source checkpoint recorded and no fp32 sibling): "
                            "agreement not checked")
        return None, None
    maps, metrics = job.refs.maps(ref[0], ref[1], input_hw, job.dataset, job.indices, num_classes, ignore_index,
                                  job.progress)
    rec["reference"] = {"kind": ref[0], "path": str(ref[1])}
    return maps, metrics


def _run_artifact(art: Path, session, job: _Job, ref_maps: list[np.ndarray] | None, num_classes: int,
                  ignore_index: int) -> tuple[dict, Agreement, list[float], dict[str, np.ndarray]]:
    """Segment every image: (metrics, agreement with the reference, latencies in ms, the maps kept for the
    report)."""
    from edgeseg.eval.metrics import SegMetrics

    metrics = SegMetrics(num_classes, ignore_index)
    agree = Agreement()
    times = []
    saved: dict[str, np.ndarray] = {}
    for j, i in enumerate(progress_bar(job.indices, job.progress, f"validate {art.name}")):
        image, label = job.dataset[i]
        t = time.perf_counter()
        pred = np.asarray(session.segment(image))
        times.append((time.perf_counter() - t) * 1e3)
        if pred.shape != label.shape:
            raise ArtifactError(f"{art}: segment() returned {pred.shape} for an image of {label.shape}")
        metrics.update(pred, label)
        if ref_maps is not None:
            agree.update(pred, ref_maps[j], job.boundary_px)
        if job.maps_dir is not None and j < job.num_maps:
            saved[f"image_{j}"] = np.asarray(image, np.uint8)
            saved[f"label_{j}"] = np.asarray(label).astype(np.uint8)
            saved[f"pred_{j}"] = pred.astype(np.uint8)
            if ref_maps is not None:
                saved[f"ref_{j}"] = ref_maps[j].astype(np.uint8)
    return metrics.compute(), agree, times, saved


def _save_maps(art: Path, maps_dir: str | Path, class_names: list[str], manifest: "Manifest",
               saved: dict[str, np.ndarray]) -> str:
    """Write `<maps_dir>/<artifact folder name>.npz` for the report's disagreement maps; returns its path."""
    from edgeseg.fileio import atomic_file

    path = Path(maps_dir) / f"{art.name}.npz"
    with atomic_file(path, "wb") as f:
        np.savez_compressed(f, class_names=np.asarray(class_names), palette=np.asarray(
            manifest.palette or [], dtype=np.uint8), **saved)
    return str(path)
