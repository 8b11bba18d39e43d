"""How one artifact's predictions are scored against a reference: pixel agreement split into class boundaries and
region interiors, latency statistics, and the pass/fail thresholds per precision (`judge`).

Must not import heavy runtimes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edgeseg.errors import ArtifactError, UsageError

# Acceptance thresholds against the reference, per precision. fp32: argmax agreement >= 99.9 % is the proof that
# export changed nothing; int8: PTQ must stay within 1 mIoU point and agree on >= 95 % of pixels (the tighter
# 0.5-point bar is for QAT).
# "bf16": an fp32/fp16 artifact whose runtime computes its float parts in bf16 (OpenVINO's inference precision on CPUs
# with native bf16), judged like fp16 (8 mantissa bits; offseg_t's fp32 IR at 384x480 agreed 99.57 % with eager)
DEFAULT_MIN_AGREEMENT = {"fp32": 0.999, "fp16": 0.99, "bf16": 0.99, "int8": 0.95}
DEFAULT_MAX_MIOU_DROP = {"fp32": 0.002, "fp16": 0.005, "bf16": 0.005, "int8": 0.01}


@dataclass
class Thresholds:
    """Pass/fail rules of `validate` (fractions 0..1), keyed by precision."""

    min_agreement: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIN_AGREEMENT))
    max_miou_drop: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MAX_MIOU_DROP))


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
class Agreement:
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


def judge(rec: dict[str, Any], th: Thresholds) -> None:
    """Set rec['passed'], rec['verdict'] and rec['reasons'] from the thresholds. Without a reference nothing was
    compared: passed stays None and the verdict is "no reference", never a pass."""
    reasons = []
    p = rec.get("precision") or "fp32"
    if p in ("fp32", "fp16") and rec.get("float_compute") == "bf16":  # what the runtime computed, not the file
        p = "bf16"
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
    if rec.get("agreement") is None and rec.get("miou_drop") is None:
        rec["passed"], rec["verdict"] = None, "no reference"
        return
    rec["passed"] = not reasons
    rec["verdict"] = "pass" if not reasons else "fail"
