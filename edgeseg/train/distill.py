"""Knowledge distillation (`--teacher CKPT`): a trained edgeseg checkpoint, frozen in eval mode, predicts every
training batch without gradients, and the student also learns `kd_weight · kd_loss(student, teacher, kd_temp)`
(edgeseg.train.losses.kd_loss: KL of the softened distributions, teacher logits resized to the student's, over the
labelled pixels). The teacher sees the batch in its own normalisation when its mean/std differ from the run's.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from edgeseg.errors import UsageError

log = logging.getLogger(__name__)


class Teacher:
    """A frozen checkpoint that predicts training batches: `teacher(x) -> logits` (no gradients)."""

    def __init__(self, model: nn.Module, path: str, renorm: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.model, self.path, self.renorm = model, path, renorm

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.renorm is not None:
            scale, shift = self.renorm
            x = x * scale + shift
        return self.model(x)


def load_teacher(path, info, mean, std, device: torch.device, channels_last: bool) -> Teacher:
    """The checkpoint folder at `path` as a Teacher for a run on classes `info` with input normalisation
    mean/std (0..255 scale). UsageError (one line) when its classes are not the run's."""
    from edgeseg.checkpoint import load_checkpoint

    model, spec = load_checkpoint(path)
    if int(spec.num_classes) != int(info.num_classes) or tuple(spec.class_names) != tuple(info.class_names):
        raise UsageError(f"--teacher {path}: its {spec.num_classes} classes ({', '.join(spec.class_names[:3])}, "
                         f"...) are not the training data's {info.num_classes}")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    renorm = None
    if tuple(spec.mean) != tuple(mean) or tuple(spec.std) != tuple(std):
        # x_run = (img - m_r) / s_r  ->  x_teacher = (img - m_t) / s_t = x_run · s_r / s_t + (m_r - m_t) / s_t
        m_r, s_r, m_t, s_t = (torch.tensor([float(v) for v in t], device=device)[None, :, None, None]
                              for t in (mean, std, spec.mean, spec.std))
        renorm = (s_r / s_t, (m_r - m_t) / s_t)
    log.info("distilling from %s (%s)", path, spec.model)
    return Teacher(model, str(path), renorm)
