"""Streaming confusion-matrix metrics for semantic segmentation, with an ignore index.

`SegMetrics(K, ignore)` accumulates a K x K confusion matrix (rows = ground truth, columns = prediction) with
one bincount per update (on the tensor's device for torch input). `compute()` gives, as fractions 0..1:

- `per_class_iou[c] = TP / (TP + FP + FN)`; None for a class absent from both labels and predictions
  ("excluded", listed in `excluded_classes`, left out of every mean);
- `miou`: mean IoU over the other classes (a class predicted but never labelled counts with IoU 0);
- `aacc`: correct pixels / labelled pixels; `per_class_acc[c] = TP / labelled pixels of c` (None when c is
  never labelled); `macc`: mean of the per-class accuracies that exist;
- `fwiou`: sum over classes of (labelled-pixel frequency x IoU).
Pixels whose label is the ignore index are not counted at all.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgeseg.errors import printable


class SegMetrics:
    """Accumulate predictions against labels. `update(pred, label)` takes numpy arrays or torch tensors of any
    (equal) shape holding class indices; `merge(other)` adds another accumulator (data-parallel shards)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

    def reset(self) -> None:
        self.confusion[:] = 0

    def update(self, pred, label) -> None:
        k = self.num_classes
        if _is_torch(pred) or _is_torch(label):
            import torch

            if all(not isinstance(t, torch.Tensor) or t.device.type == "cpu" for t in (pred, label)):
                # numpy's bincount is faster than torch's on CPU (no thread start-up)
                pred = pred.numpy() if isinstance(pred, torch.Tensor) else pred
                label = label.numpy() if isinstance(label, torch.Tensor) else label
                return self.update(pred, label)

            pred_t = torch.as_tensor(pred)
            label_t = torch.as_tensor(label, device=pred_t.device)
            if pred_t.shape != label_t.shape:
                raise ValueError(f"prediction shape {tuple(pred_t.shape)} != label shape {tuple(label_t.shape)}")
            pred_t, label_t = pred_t.reshape(-1).long(), label_t.reshape(-1).long()
            keep = label_t != self.ignore_index
            pred_t, label_t = pred_t[keep], label_t[keep]
            if label_t.numel():
                _check_range(int(label_t.min()), int(label_t.max()), k, "label")
                _check_range(int(pred_t.min()), int(pred_t.max()), k, "prediction")
            counts = torch.bincount(label_t * k + pred_t, minlength=k * k)
            self.confusion += counts.cpu().numpy().reshape(k, k)
            return
        pred, label = np.asarray(pred), np.asarray(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {pred.shape} != label shape {label.shape}")
        pred, label = pred.reshape(-1), label.reshape(-1)
        keep = label != self.ignore_index
        pred, label = pred[keep].astype(np.int64), label[keep].astype(np.int64)
        if label.size:
            _check_range(int(label.min()), int(label.max()), k, "label")
            _check_range(int(pred.min()), int(pred.max()), k, "prediction")
        self.confusion += np.bincount(label * k + pred, minlength=k * k).reshape(k, k)

    def merge(self, other: "SegMetrics") -> "SegMetrics":
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError("cannot merge metrics with different num_classes/ignore_index")
        self.confusion += other.confusion
        return self

    def all_reduce(self) -> "SegMetrics":
        """Sum the confusion matrix over a torch.distributed process group (no-op when not initialised)."""
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            t = torch.from_numpy(self.confusion.copy())
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            self.confusion = t.cpu().numpy().astype(np.int64)
        return self

    def compute(self) -> dict[str, Any]:
        return metrics_from_confusion(self.confusion)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _check_range(lo: int, hi: int, k: int, what: str) -> None:
    if lo < 0 or hi >= k:
        raise ValueError(f"{what} values must be in 0..{k - 1} (or the ignore index for labels); got {lo}..{hi}")


def metrics_from_confusion(conf: np.ndarray) -> dict[str, Any]:
    """The metrics dict (see the module docstring) from a K x K confusion matrix (rows = ground truth)."""
    conf = np.asarray(conf, np.int64)
    tp = np.diag(conf).astype(np.float64)
    gt = conf.sum(1).astype(np.float64)
    pr = conf.sum(0).astype(np.float64)
    union = gt + pr - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    acc = np.divide(tp, gt, out=np.zeros_like(tp), where=gt > 0)
    total = gt.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else None,
        "per_class_iou": [float(v) if p else None for v, p in zip(iou, present)],
        "aacc": float(tp.sum() / total) if total else None,
        "macc": float(acc[gt > 0].mean()) if (gt > 0).any() else None,
        "per_class_acc": [float(v) if g > 0 else None for v, g in zip(acc, gt)],
        "fwiou": float((gt / total * iou).sum()) if total else None,
        "excluded_classes": [int(c) for c in np.flatnonzero(~present)],
        "num_pixels": int(total),
        "confusion": conf.tolist(),
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def format_table(result: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """A per-class table (IoU and accuracy in %) and a summary line naming the excluded classes."""
    ious = result["per_class_iou"]
    accs = result.get("per_class_acc") or [None] * len(ious)
    # names come from model.json / classes.txt: shown with control characters escaped (no terminal sequences)
    names = [printable(n) for n in class_names] if class_names is not None else \
        [f"class{i}" for i in range(len(ious))]
    if len(names) != len(ious):
        raise ValueError(f"{len(names)} class names for {len(ious)} classes")
    w = max([len("Class")] + [len(n) for n in names])
    lines = [f"{'Class':<{w}}  {'IoU %':>7}  {'Acc %':>7}", f"{'-' * w}  {'-' * 7}  {'-' * 7}"]
    excluded = set(result.get("excluded_classes", []))
    for i, (n, iou, acc) in enumerate(zip(names, ious, accs)):
        note = "  (excluded: absent from labels and predictions)" if i in excluded else ""
        lines.append(f"{n:<{w}}  {_pct(iou):>7}  {_pct(acc):>7}{note}")
    lines.append("")
    counted = len(ious) - len(excluded)
    summary = (f"mIoU {_pct(result['miou'])}%  aAcc {_pct(result['aacc'])}%  mAcc {_pct(result['macc'])}%  "
               f"fwIoU {_pct(result['fwiou'])}%  (mean over {counted} of {len(ious)} classes")
    if excluded:
        summary += "; excluded, absent from both labels and predictions: " + \
            ", ".join(names[i] for i in sorted(excluded)) + ")"
    else:
        summary += "; none excluded)"
    lines.append(summary)
    return "\n".join(lines)
