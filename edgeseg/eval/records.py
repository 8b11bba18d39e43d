"""Validation records: the JSON-able record of one artifact (`base_record`), FAILED records, the one-line log of
a record, and reading records written by the CLI/pipeline back (`load_records`).

Must not import heavy runtimes.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeseg.errors import EdgesegError, UsageError, describe
from edgeseg.eval.compare import latency_stats

if TYPE_CHECKING:
    from edgeseg.artifact import Manifest

log = logging.getLogger("edgeseg.eval.validate")  # the name these lines always logged under


one_line = describe  # an error as the one line a record holds (edgeseg.errors.describe)


def base_record(art: Path, manifest: "Manifest | None") -> dict[str, Any]:
    """The record of `art` before anything ran: the manifest's facts, every score None."""
    def m(name: str) -> Any:
        return None if manifest is None else getattr(manifest, name)

    return {
        "artifact": str(art), "name": art.name, "target": m("target"), "precision": m("precision"),
        "model": m("model"), "input_hw": m("input_hw"), "class_names": m("class_names"),
        "status": "ok", "executed": False, "miou": None, "aacc": None, "macc": None, "per_class_iou": None,
        "reference": None, "reference_miou": None, "miou_drop": None, "per_class_iou_delta": None,
        "agreement": None, "boundary_disagreement": None, "interior_disagreement": None,
        "disagreement_on_boundary_share": None, "boundary_px": None,
        "latency_ms": latency_stats([]), "latency_kind": "segment() per image incl. pre/post-processing",
        "size_bytes": None, "fallback_ops": m("fallback_ops"), "calibration": m("calibration"),
        "maps": None, "num_images": 0, "passed": None, "verdict": None, "reasons": [], "notes": [], "error": None,
    }


def _mark_failed(rec: dict[str, Any], reason: str) -> dict[str, Any]:
    rec.update(status="failed", passed=False, verdict="failed", error=reason, reasons=[reason])
    return rec


def artifact_failed_record(art: Path, reason: str) -> dict[str, Any]:
    """A FAILED record for an artifact folder that could not be validated, with what its manifest still says."""
    from edgeseg.artifact import read_manifest
    from edgeseg.eval.references import artifact_size_bytes

    try:
        manifest = read_manifest(art)
    except EdgesegError:
        manifest = None
    rec = _mark_failed(base_record(art, manifest), reason)
    if manifest is not None:
        try:
            rec["size_bytes"] = artifact_size_bytes(art, manifest)
        except OSError:
            pass
    return rec


def failed_record(target: str, precision: str, reason: str, artifact: str | Path | None = None) -> dict[str, Any]:
    """A FAILED validation record for an artifact that never came to exist (e.g. its export failed)."""
    rec = base_record(Path(artifact or f"{target}-{precision}"), None)
    rec.update(target=target, precision=precision)
    return _mark_failed(rec, reason)


def log_record(rec: dict[str, Any]) -> None:
    if rec["status"] == "failed":
        log.info("validate %s: FAILED: %s", rec["name"], rec["error"])
    elif rec["status"] == "not run":
        log.info("validate %s: %s", rec["name"], "; ".join(rec["notes"]))
    else:
        agree = "n/a" if rec["agreement"] is None else f"{100 * rec['agreement']:.2f}%"
        verdict = ("NO REFERENCE: nothing compared" if rec["passed"] is None else
                   "passed" if rec["passed"] else "FAILED: " + "; ".join(rec["reasons"]))
        log.info("validate %s: mIoU %.2f%%, agreement %s, %s", rec["name"], 100 * rec["miou"], agree, verdict)


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
