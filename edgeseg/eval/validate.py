"""Validation of exported artifacts on real images, each in its own runtime, against a reference.

One job: run every artifact over a dataset with the preprocessing its manifest describes (through
`edgeseg.runtime.open_session(...).segment`), compute mIoU / per-class IoU / aAcc / mAcc, and compare its argmax
maps with a reference (an fp32 artifact, or the eager PyTorch checkpoint): mIoU drop, per-class IoU deltas, pixel
agreement, and whether the disagreement sits on class boundaries or in the interior of regions.

Returns one JSON-able record per artifact; a record never hides a failure: an artifact that cannot be opened or
run is a record with `status: "failed"`, `passed: False` and the one-line reason; one that this host cannot execute
(Core ML on Linux) is `status: "not run"`, `executed: False`, `passed: None`.

Must not import heavy runtimes (they come in through `edgeseg.runtime`).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeseg.errors import ArtifactError, EdgesegError, UsageError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

# Acceptance thresholds against the reference, per precision. fp32: issue #4's proof (argmax agreement >= 99.9 %);
# int8: PTQ must stay within 1 mIoU point and agree on >= 95 % of pixels (issue #5's 0.5-point bar is for QAT).
DEFAULT_MIN_AGREEMENT = {"fp32": 0.999, "fp16": 0.99, "int8": 0.95}
DEFAULT_MAX_MIOU_DROP = {"fp32": 0.002, "fp16": 0.005, "int8": 0.01}


@dataclass
class Thresholds:
    """Pass/fail rules of `validate` (fractions 0..1), keyed by precision."""

    min_agreement: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIN_AGREEMENT))
    max_miou_drop: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MAX_MIOU_DROP))


# ----------------------------------------------------------------------------------------------------------------
# Boundary / interior disagreement
# ----------------------------------------------------------------------------------------------------------------
def boundary_mask(label_map: np.ndarray, k: int = 3) -> np.ndarray:
    """Pixels within `k` px (Chebyshev distance) of a class edge of `label_map`.

    A pixel is on a boundary when the (2k+1)x(2k+1) window around it holds more than one class: the grey-level
    dilation (max) and erosion (min) of the label map differ there.

    Args:
        label_map: (H, W) integer class map (the reference prediction).
        k: boundary half-width in pixels (>= 1).
    Returns:
        (H, W) bool mask.
    """
    import cv2

    if k < 1:
        raise UsageError(f"boundary width k={k}: must be >= 1")
    lm = np.ascontiguousarray(label_map)
    if lm.dtype not in (np.uint8, np.uint16):
        lm = lm.astype(np.uint16 if lm.max(initial=0) > 255 else np.uint8)
    kernel = np.ones((2 * k + 1, 2 * k + 1), np.uint8)
    return cv2.dilate(lm, kernel) != cv2.erode(lm, kernel)


@dataclass
class _Agreement:
    """Running pixel counts of prediction-vs-reference agreement, split by boundary/interior."""

    total: int = 0
    agree: int = 0
    boundary: int = 0
    boundary_disagree: int = 0
    interior_disagree: int = 0

    def update(self, pred: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
        if pred.shape != ref.shape:
            raise ArtifactError(f"prediction of shape {pred.shape} vs reference {ref.shape}")
        diff = pred != ref
        edge = boundary_mask(ref, k)
        self.total += diff.size
        self.agree += int(diff.size - diff.sum())
        self.boundary += int(edge.sum())
        self.boundary_disagree += int((diff & edge).sum())
        self.interior_disagree += int((diff & ~edge).sum())
        return diff

    def result(self) -> dict[str, float | None]:
        interior = self.total - self.boundary
        disagree = self.total - self.agree
        return {
            "agreement": self.agree / self.total if self.total else None,
            # disagreement rate among boundary pixels / interior pixels
            "boundary_disagreement": self.boundary_disagree / self.boundary if self.boundary else 0.0,
            "interior_disagreement": self.interior_disagree / interior if interior else 0.0,
            # what share of all disagreeing pixels lies on a boundary, and how much of the image is boundary
            "disagreement_on_boundary_share": self.boundary_disagree / disagree if disagree else 0.0,
            "boundary_pixel_share": self.boundary / self.total if self.total else 0.0,
        }


def latency_stats(times_ms: Sequence[float]) -> dict[str, float | int | None]:
    """{p50, p90, mean, min, max, n} of a list of latencies in ms (None values when empty)."""
    if not len(times_ms):
        return {"p50": None, "p90": None, "mean": None, "min": None, "max": None, "n": 0}
    t = np.asarray(times_ms, dtype=np.float64)
    return {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)), "mean": float(t.mean()),
            "min": float(t.min()), "max": float(t.max()), "n": int(t.size)}


# ----------------------------------------------------------------------------------------------------------------
# Artifacts and references
# ----------------------------------------------------------------------------------------------------------------
def read_manifest_dict(artifact_dir: str | Path) -> dict[str, Any]:
    """The artifact's manifest as a dict, parsed and checked by `edgeseg.export.base.read_manifest` (one parser,
    one set of checks: types, paths inside the folder, model_file hashed); no hash check (`open_session` does
    that). Fields the file omits hold the Manifest defaults, as the runtimes see them.

    Raises:
        ArtifactError (one line naming the manifest) for a missing, unparsable or malformed manifest.
    """
    from edgeseg.export.base import read_manifest  # imported here: validate stays light until it is used

    return read_manifest(artifact_dir).to_json()


def artifact_size_bytes(artifact_dir: str | Path, manifest: dict[str, Any]) -> int:
    """Bytes of the artifact's files (those hashed in the manifest; every file but manifest.json otherwise)."""
    root = Path(artifact_dir)
    files = list((manifest.get("sha256") or {}).keys())
    if files:
        return int(sum((root / f).stat().st_size for f in files if (root / f).is_file()))
    return int(sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != MANIFEST))


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "model.json").is_file()


def find_fp32_sibling(artifact_dir: Path, manifest: dict[str, Any]) -> Path | None:
    """An fp32 artifact next to `artifact_dir` with the same target, model and input size (None if none)."""
    for cand in sorted(Path(artifact_dir).parent.iterdir()):
        if cand.resolve() == Path(artifact_dir).resolve() or not is_artifact(cand):
            continue
        try:
            m = read_manifest_dict(cand)
        except ArtifactError:
            continue
        if (m.get("precision") == "fp32" and m.get("target") == manifest.get("target")
                and m.get("model") == manifest.get("model")
                and list(m.get("input_hw") or []) == list(manifest.get("input_hw") or [])):
            return cand
    return None


def resolve_reference(artifact_dir: Path, manifest: dict[str, Any], reference: str | Path | None
                      ) -> tuple[str, Path] | None:
    """Which reference an artifact is judged against: ("checkpoint"|"artifact", path), or None.

    Order: the explicit `reference`; else the source checkpoint recorded in the manifest (if it still exists);
    else the fp32 sibling artifact (same target, model, input size) for a non-fp32 artifact.
    """
    if reference is not None:
        ref = Path(reference)
        if is_artifact(ref):
            return "artifact", ref
        if is_checkpoint(ref):
            return "checkpoint", ref
        raise UsageError(f"--reference {ref}: neither an artifact folder (manifest.json) nor a checkpoint "
                         "folder (model.json)")
    src = (manifest.get("source_checkpoint") or {}).get("path")
    if src and is_checkpoint(src):
        return "checkpoint", Path(src)
    if manifest.get("precision") != "fp32":
        sib = find_fp32_sibling(artifact_dir, manifest)
        if sib is not None:
            return "artifact", sib
    return None


class _CheckpointReference:
    """Eager PyTorch reference: the checkpoint's model at the artifact's input size, through the same
    `Session.segment` preprocessing as the artifacts but with the checkpoint's own mean/std (never the artifact's,
    so a wrong manifest shows up as disagreement)."""

    def __init__(self, path: Path):
        self.path = path
        self._sessions: dict[tuple[int, int], Any] = {}

    def segment(self, image: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
        if input_hw not in self._sessions:
            from edgeseg.runtime.torch import TorchSession

            self._sessions[input_hw] = TorchSession.from_checkpoint(self.path, input_hw=input_hw)
        return np.asarray(self._sessions[input_hw].segment(image))


class _ArtifactReference:
    def __init__(self, path: Path, opener: Callable):
        self.session = opener(path)
        self.path = path
        if not _session_executes(self.session, read_manifest_dict(path)):
            raise ArtifactError(f"reference {path}: cannot be executed on this host")

    def segment(self, image: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
        return np.asarray(self.session.segment(image))


class _ReferenceCache:
    """Reference label maps, computed once per (reference, input size) and shared by every artifact."""

    def __init__(self, opener: Callable):
        self.opener = opener
        self._refs: dict[Path, Any] = {}
        self._maps: dict[tuple, list[np.ndarray]] = {}
        self._metrics: dict[tuple, dict] = {}

    def maps(self, kind: str, path: Path, input_hw: tuple[int, int], dataset, indices: Sequence[int],
             num_classes: int, ignore_index: int, progress: bool) -> tuple[list[np.ndarray], dict]:
        from edgeseg.eval.metrics import SegMetrics

        key = (kind, path.resolve(), tuple(input_hw), tuple(indices))
        if key not in self._maps:
            rp = path.resolve()
            if rp not in self._refs:
                self._refs[rp] = _CheckpointReference(path) if kind == "checkpoint" else \
                    _ArtifactReference(path, self.opener)
            ref = self._refs[rp]
            metrics = SegMetrics(num_classes, ignore_index)
            maps = []
            for i in _progress(indices, progress, f"reference {path.name}"):
                image, label = dataset[i]
                m = ref.segment(image, tuple(input_hw))
                metrics.update(m, label)
                maps.append(m)
            self._maps[key] = maps
            self._metrics[key] = metrics.compute()
        return self._maps[key], self._metrics[key]


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="img", leave=False, dynamic_ncols=True)


def _session_executes(session: Any, manifest: dict[str, Any]) -> bool:
    v = getattr(session, "executed", None)
    if v is None:
        v = getattr(session, "executed_here", None)
    if v is None:
        v = manifest.get("executed_here", True)
    return bool(v)


def _open_or_not_run(art: Path, manifest: dict[str, Any], opener: Callable):
    """Open the artifact's session (sha256 checked first). For an artifact its exporter marked as not executable
    here (Core ML on Linux), a runtime that cannot even load it gives None (after the hash check) instead of an
    error; anything else that fails to open raises."""
    if manifest.get("executed_here", True):
        return opener(art)
    from edgeseg.export.base import verify_manifest

    verify_manifest(art)
    try:
        return opener(art)
    except Exception as e:  # the runtime is absent on this OS; the artifact is "converted, not run"
        log.debug("%s: session not opened on this host: %s", art, e)
        return None


def _default_opener(path: Path):
    from edgeseg.runtime import open_session

    return open_session(path)


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    msg = s[0] if s else ""
    return msg if isinstance(e, EdgesegError) else f"{type(e).__name__}: {msg}"


# ----------------------------------------------------------------------------------------------------------------
# validate
# ----------------------------------------------------------------------------------------------------------------
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
        One record per artifact (see module docstring and `_record`), in the order given.
    Raises:
        DataError if the dataset cannot be opened; UsageError for a bad `reference`.
    """
    from edgeseg.data.datasets import open_dataset

    thresholds = thresholds or Thresholds()
    opener = open_session or _default_opener
    dataset = open_dataset(data, split=split)
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    if n == 0:
        from edgeseg.errors import DataError

        raise DataError(f"{data}: split {split!r} holds no images")
    indices = list(range(n))
    refs = _ReferenceCache(opener)
    records = []
    for art in artifacts:
        art = Path(art)
        t0 = time.perf_counter()
        try:
            rec = _validate_one(art, dataset, indices, reference, refs, opener, boundary_px, maps_dir, num_maps,
                                thresholds, progress)
        except Exception as e:  # one failed artifact is a FAILED record, never a silently dropped one
            log.debug("validate %s failed", art, exc_info=True)
            rec = _failed_record(art, _one_line(e))
        rec["validate_seconds"] = round(time.perf_counter() - t0, 3)
        rec["data"] = {"root": str(data), "split": split, "num_images": n}
        _log_record(rec)
        records.append(rec)
    return records


def _base_record(art: Path, manifest: dict[str, Any] | None) -> dict[str, Any]:
    m = manifest or {}
    return {
        "artifact": str(art), "name": art.name, "target": m.get("target"), "precision": m.get("precision"),
        "model": m.get("model"), "input_hw": m.get("input_hw"), "class_names": m.get("class_names"),
        "status": "ok", "executed": False, "miou": None, "aacc": None, "macc": None, "per_class_iou": None,
        "reference": None, "reference_miou": None, "miou_drop": None, "per_class_iou_delta": None,
        "agreement": None, "boundary_disagreement": None, "interior_disagreement": None,
        "disagreement_on_boundary_share": None, "boundary_px": None,
        "latency_ms": latency_stats([]), "latency_kind": "segment() per image incl. pre/post-processing",
        "size_bytes": None, "fallback_ops": m.get("fallback_ops"), "calibration": m.get("calibration"),
        "maps": None, "num_images": 0, "passed": None, "reasons": [], "notes": [], "error": None,
    }


def _failed_record(art: Path, reason: str) -> dict[str, Any]:
    try:
        manifest = read_manifest_dict(art)
    except EdgesegError:
        manifest = None
    rec = _base_record(art, manifest)
    rec.update(status="failed", passed=False, error=reason, reasons=[reason])
    if manifest is not None:
        try:
            rec["size_bytes"] = artifact_size_bytes(art, manifest)
        except OSError:
            pass
    return rec


def failed_record(target: str, precision: str, reason: str, artifact: str | Path | None = None) -> dict[str, Any]:
    """A FAILED validation record for an artifact that never came to exist (e.g. its export failed)."""
    rec = _base_record(Path(artifact or f"{target}-{precision}"), {"target": target, "precision": precision})
    rec.update(status="failed", passed=False, error=reason, reasons=[reason])
    return rec


def _validate_one(art: Path, dataset, indices, reference, refs: _ReferenceCache, opener, boundary_px, maps_dir,
                  num_maps, thresholds: Thresholds, progress) -> dict[str, Any]:
    from edgeseg.eval.metrics import SegMetrics

    manifest = read_manifest_dict(art)
    rec = _base_record(art, manifest)
    rec["size_bytes"] = artifact_size_bytes(art, manifest)
    session = _open_or_not_run(art, manifest, opener)
    if session is None or not _session_executes(session, manifest):
        why = manifest.get("not_executed_reason") or f"{manifest.get('target')} cannot execute on this host"
        rec.update(status="not run", executed=False, passed=None, notes=[f"not run: {why}"])
        return rec
    rec["executed"] = True
    rec["notes"] += list(getattr(session, "notes", []))  # how this host runs it (e.g. the Jetson int8 emulation)
    class_names = list(manifest.get("class_names") or dataset.info.class_names)
    num_classes = len(class_names)
    ignore_index = int(manifest.get("ignore_index", dataset.info.ignore_index))
    if dataset.info.num_classes != num_classes:
        raise ArtifactError(f"{art}: artifact has {num_classes} classes, dataset {dataset.info.name!r} has "
                            f"{dataset.info.num_classes}")
    input_hw = tuple(int(v) for v in manifest.get("input_hw") or manifest["input"]["shape"][-2:])

    ref = resolve_reference(art, manifest, reference)
    ref_maps, ref_metrics = (None, None)
    if ref is not None:
        ref_maps, ref_metrics = refs.maps(ref[0], ref[1], input_hw, dataset, indices, num_classes, ignore_index,
                                          progress)
        rec["reference"] = {"kind": ref[0], "path": str(ref[1])}
    else:
        rec["notes"].append("no reference (no source checkpoint recorded and no fp32 sibling): "
                            "agreement not checked")

    metrics = SegMetrics(num_classes, ignore_index)
    agree = _Agreement()
    times = []
    saved: dict[str, np.ndarray] = {}
    for j, i in enumerate(_progress(indices, progress, f"validate {art.name}")):
        image, label = dataset[i]
        t = time.perf_counter()
        pred = np.asarray(session.segment(image))
        times.append((time.perf_counter() - t) * 1e3)
        if pred.shape != label.shape:
            raise ArtifactError(f"{art}: segment() returned {pred.shape} for an image of {label.shape}")
        metrics.update(pred, label)
        if ref_maps is not None:
            agree.update(pred, ref_maps[j], boundary_px)
        if maps_dir is not None and j < num_maps:
            saved[f"image_{j}"] = np.asarray(image, np.uint8)
            saved[f"label_{j}"] = np.asarray(label).astype(np.uint8)
            saved[f"pred_{j}"] = pred.astype(np.uint8)
            if ref_maps is not None:
                saved[f"ref_{j}"] = ref_maps[j].astype(np.uint8)
    res = metrics.compute()
    rec.update(miou=res["miou"], aacc=res["aacc"], macc=res["macc"], per_class_iou=res["per_class_iou"],
               num_images=len(indices), class_names=class_names,
               # the first call pays one-off runtime set-up; keep it out of the latency figures
               latency_ms=latency_stats(times[1:] if len(times) > 1 else times))
    if ref_metrics is not None:
        rec["reference_miou"] = ref_metrics["miou"]
        rec["miou_drop"] = ref_metrics["miou"] - res["miou"]
        rec["per_class_iou_delta"] = [None if (a is None or b is None) else a - b
                                      for a, b in zip(res["per_class_iou"], ref_metrics["per_class_iou"])]
        rec.update(agree.result())
        rec["boundary_px"] = boundary_px
    if saved:
        from edgeseg.fileio import atomic_file

        path = Path(maps_dir) / f"{art.name}.npz"
        with atomic_file(path, "wb") as f:
            np.savez_compressed(f, class_names=np.asarray(class_names), palette=np.asarray(
                manifest.get("palette") or [], dtype=np.uint8), **saved)
        rec["maps"] = str(path)
    _judge(rec, thresholds)
    return rec


def _judge(rec: dict[str, Any], th: Thresholds) -> None:
    """Set rec['passed'] and rec['reasons'] from the thresholds (only when there is a reference)."""
    reasons = []
    p = rec.get("precision") or "fp32"
    if rec.get("agreement") is not None:
        need = th.min_agreement.get(p, th.min_agreement.get("int8", 0.95))
        if rec["agreement"] < need:
            reasons.append(f"argmax agreement {rec['agreement']:.2%} < {need:.1%} required for {p} "
                           f"(against {rec['reference']['kind']} {rec['reference']['path']})")
    if rec.get("miou_drop") is not None:
        cap = th.max_miou_drop.get(p, th.max_miou_drop.get("int8", 0.01))
        if rec["miou_drop"] > cap:
            reasons.append(f"mIoU drop {100 * rec['miou_drop']:.2f} points > {100 * cap:.2f} allowed for {p}")
    rec["reasons"] = reasons
    rec["passed"] = not reasons


def _log_record(rec: dict[str, Any]) -> None:
    if rec["status"] == "failed":
        log.info("validate %s: FAILED: %s", rec["name"], rec["error"])
    elif rec["status"] == "not run":
        log.info("validate %s: %s", rec["name"], "; ".join(rec["notes"]))
    else:
        agree = "n/a" if rec["agreement"] is None else f"{100 * rec['agreement']:.2f}%"
        log.info("validate %s: mIoU %.2f%%, agreement %s, %s", rec["name"], 100 * rec["miou"], agree,
                 "passed" if rec["passed"] else "FAILED: " + "; ".join(rec["reasons"]))


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a validation or bench JSON file written by the CLI/pipeline (a list of records, or {"records": [...]})."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: file not found")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{p}: not valid JSON ({e})") from None
    if isinstance(d, dict):
        d = d.get("records")
    if not isinstance(d, list):
        raise UsageError(f"{p}: expected a list of records")
    return d
