"""Training losses: cross-entropy with the ignore index on logits upsampled to the label size, plus the
model's own auxiliary losses (`model.aux_loss(labels, ignore_index)`, e.g. AFM's PSL) when it defines them."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
             model: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
    """`logits` (N,K,h,w) at the model's stride; `labels` (N,H,W) long. Returns (total loss, parts).

    The logits are upsampled bilinearly (align_corners=False) to the label size and the loss is computed in
    float32 (mmseg's protocol). Pixels labelled `ignore_index` do not count.
    """
    logits = logits.float()
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index)
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
