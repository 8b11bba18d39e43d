"""Training losses: cross-entropy with the ignore index on logits upsampled to the label size, plus the
model's own auxiliary losses (`model.aux_loss(labels, ignore_index)`, e.g. AFM's PSL) when it defines them.

Options for thin classes (off by default): per-class weights (`enet_weights`: ENet's 1/ln(1.02 + p) from the
training labels' class frequencies) and online hard example mining (`ohem_keep`: mmseg's OHEM pixel sampler, the
pixels whose loss is above a threshold, at least a fraction of the valid ones). And `kd_loss`, the pixel-wise
distillation term (KL of the temperature-softened class distributions, teacher -> student).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Ohem:
    """Keep the pixels whose predicted probability of their class is below `thresh` (loss above -ln thresh),
    and at least the `min_kept` fraction of the valid pixels (the hardest ones)."""

    thresh: float = 0.7
    min_kept: float = 1 / 16


def enet_weights(counts, c: float = 1.02) -> list[float]:
    """ENet's class weights 1 / ln(c + p_k), p_k = counts[k] / sum(counts) (a class never seen gets 1/ln(c))."""
    total = float(sum(counts))
    return [1.0 / math.log(c + (float(n) / total if total else 0.0)) for n in counts]


def ohem_keep(pixel_loss: torch.Tensor, valid: torch.Tensor, ohem: Ohem) -> torch.Tensor:
    """Boolean mask of the pixels OHEM keeps: valid and with loss >= min(-ln thresh, the k-th largest valid loss),
    k = ceil(min_kept · valid pixels)."""
    vals = pixel_loss[valid]
    n = vals.numel()
    if n == 0:
        return valid
    k = min(n, max(1, math.ceil(ohem.min_kept * n)))
    kth = torch.kthvalue(vals.detach().float(), n - k + 1).values  # the k-th largest
    thr = torch.clamp(kth, max=-math.log(ohem.thresh))
    return valid & (pixel_loss.detach() >= thr)


def _ce(logits, labels, ignore_index, class_weight, ohem) -> torch.Tensor:
    if ohem is None:
        return F.cross_entropy(logits, labels, weight=class_weight, ignore_index=ignore_index)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    pix = F.cross_entropy(logits, safe, reduction="none")  # selection on the unweighted loss, as mmseg
    keep = ohem_keep(pix, valid, ohem)
    w = keep.float() if class_weight is None else keep.float() * class_weight[safe]
    return (pix * w).sum() / w.sum().clamp(min=1e-12)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
             model: nn.Module | None = None, *, class_weight: torch.Tensor | None = None,
             ohem: Ohem | None = None) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
    """`logits` (N,K,h,w) at the model's stride; `labels` (N,H,W) long. Returns (total loss, parts).

    The logits are upsampled bilinearly (align_corners=False) to the label size and the loss is computed in
    float32 (mmseg's protocol). Pixels labelled `ignore_index` do not count. `class_weight` (K,) weighs each
    pixel by its class (the mean is then weighted: sum w·l / sum w); `ohem` keeps only the hard pixels.
    """
    logits = logits.float()
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if class_weight is not None:
        class_weight = class_weight.to(logits.device, torch.float32)
    ce = _ce(logits, labels, ignore_index, class_weight, ohem)
    if not bool((labels != ignore_index).any()):
        ce = logits.sum() * 0.0  # a crop of only ignored pixels: no signal, but keep the graph (and DDP) happy
    parts: dict[str, float | torch.Tensor] = {"ce": ce.detach()}
    total = ce
    aux = getattr(model, "aux_loss", None) if model is not None else None
    if callable(aux):
        a = aux(labels, ignore_index)
        if a is not None:
            a = a.float()
            parts["aux"] = a.detach()
            total = total + a
    return total, parts


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
            labels: torch.Tensor | None = None, ignore_index: int = 255) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)) per pixel, averaged over the pixels at the student's
    logits size (the teacher's logits are resized to it bilinearly); with `labels`, over the labelled pixels
    only (the label map resized by nearest neighbour), so crop padding teaches nothing."""
    s = student.float()
    t = teacher.detach().float()
    if t.shape[-2:] != s.shape[-2:]:
        t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
    log_ps = F.log_softmax(s / temperature, dim=1)
    log_pt = F.log_softmax(t / temperature, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1)  # (N, h, w)
    if labels is not None:
        lab = F.interpolate(labels[:, None].float(), size=s.shape[-2:], mode="nearest")[:, 0]
        valid = (lab != ignore_index).float()
        kl = (kl * valid).sum() / valid.sum().clamp(min=1.0)
    else:
        kl = kl.mean()
    return kl * temperature ** 2
