"""PNG plots of validation and bench records (matplotlib, Agg backend). Never runs a model.

- `accuracy_vs_latency`: mIoU vs p50 latency, one colour per target, one marker per precision, fp32 -> int8 arrows.
- `iou_delta_chart`: per-class IoU change against the reference, one bar group per class.
- `disagreement_maps`: image | reference | artifact | where they differ, from the npz maps `validate` saves.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from edgeseg.fileio import atomic_file

    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def accuracy_vs_latency(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Scatter of `rows` (dicts with target, precision, miou, p50_ms); rows missing either value are skipped.

    Returns the PNG path, or None when there is nothing to plot."""
    pts = [r for r in rows if r.get("miou") is not None and r.get("p50_ms") is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    targets = sorted({r["target"] for r in pts})
    cmap = plt.get_cmap("tab10")
    for ti, t in enumerate(targets):
        own = [r for r in pts if r["target"] == t]
        for r in own:
            ax.scatter(r["p50_ms"], 100 * r["miou"], color=cmap(ti % 10), marker=_MARKERS.get(r["precision"], "x"),
                       s=60, label=f"{t} {r['precision']}", edgecolors="black", linewidths=0.5)
        by_p = {r["precision"]: r for r in own}
        if "fp32" in by_p and "int8" in by_p:
            a, b = by_p["fp32"], by_p["int8"]
            ax.annotate("", xy=(b["p50_ms"], 100 * b["miou"]), xytext=(a["p50_ms"], 100 * a["miou"]),
                        arrowprops={"arrowstyle": "->", "color": cmap(ti % 10), "alpha": 0.6})
    ax.set_xlabel("p50 latency (ms, batch 1)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("Accuracy vs latency per target (arrow: fp32 -> int8)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, Path(path))


def iou_delta_chart(records: Sequence[dict[str, Any]], class_names: Sequence[str], path: str | Path
                    ) -> Path | None:
    """Grouped bars: per-class IoU change (points) of each record against its reference.

    Returns the PNG path, or None when no record has deltas."""
    recs = [r for r in records if r.get("per_class_iou_delta")]
    if not recs:
        return None
    plt = _plt()
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * k + 2), 4.5))
    width = 0.8 / len(recs)
    cmap = plt.get_cmap("tab10")
    x = np.arange(k)
    for i, r in enumerate(recs):
        d = np.array([np.nan if v is None else 100 * v for v in r["per_class_iou_delta"]], dtype=float)
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(d), width, color=cmap(i % 10),
               label=f"{r['target']} {r['precision']}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(class_names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IoU change vs reference (points)")
    ax.set_title("Per-class IoU change against the reference")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def colorize(label_map: np.ndarray, palette: np.ndarray | None) -> np.ndarray:
    """(H, W) class map -> (H, W, 3) uint8 RGB with the dataset palette (classes past the palette are black)."""
    lm = np.asarray(label_map).astype(np.int64)
    if palette is None or len(palette) == 0:
        import matplotlib

        cmap = matplotlib.colormaps["tab20"]
        palette = (np.array([cmap(i % 20)[:3] for i in range(256)]) * 255).astype(np.uint8)
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(palette)] = np.asarray(palette, np.uint8)[:256]
    return pal[np.clip(lm, 0, 255)]


def disagreement_maps(npz_path: str | Path, path: str | Path, title: str = "", ref_label: str = "reference",
                      pred_label: str = "artifact") -> Path | None:
    """Rows of image | reference | artifact | where they differ (red) for the maps saved by `validate`.

    Returns the PNG path, or None when the npz holds no reference maps."""
    with np.load(npz_path) as z:
        idx = sorted(int(k.split("_")[1]) for k in z.files if k.startswith("ref_"))
        if not idx:
            return None
        palette = z["palette"] if "palette" in z.files else None
        rows = [(z[f"image_{i}"], z[f"ref_{i}"], z[f"pred_{i}"]) for i in idx]
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 2.6 * len(rows)), squeeze=False)
    for r, (img, ref, pred) in enumerate(rows):
        diff = img.copy() // 3
        mask = ref != pred
        diff[mask] = (255, 0, 0)
        panels = [(img, "image"), (colorize(ref, palette), ref_label), (colorize(pred, palette), pred_label),
                  (diff, f"differ: {100 * mask.mean():.2f}% of pixels")]
        for c, (im, name) in enumerate(panels):
            axes[r, c].imshow(im)
            axes[r, c].set_title(name, fontsize=9)
            axes[r, c].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, Path(path))
