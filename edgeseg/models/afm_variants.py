"""AFM (MPLSeg) carriers: `offseg_t_afm` (AFM in place of FreqFusion in the OffSeg decoder) and `segnext_t_afm`
(AFM as the multi-scale fusion of LightHamHead instead of bilinear resizing), plus tiny CI variants.

In both, a low-resolution map is brought to the finer scale by AFM's spectral zero-padding (no bilinear
resize), its spectrum modulated by the magnitude perceptron and the phase amender. MPLSeg's training recipe is
kept: each AFM stage has an auxiliary 1x1 classifier (`decode_head.auxiliary_head.<i>`, training only) whose
logits get CE (weight 0.1) and the phase-sensitive loss (weights 0.75 / 0.5 / 0.25 from the finest stage);
`model.aux_loss(labels, ignore_index)` returns that sum after a train-mode forward.

Backbones and the rest of the heads keep the official names, so official OffSeg / SegNeXt checkpoints can
initialise them (`strict=False`; the AFM and auxiliary keys are new).

Must not import export/ or runtime/.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from edgeseg.models.afm import AFM, PSLMixin
from edgeseg.models.ham_head import LightHamHead
from edgeseg.models.offseg import OffSeg, OffSegHead, build_offseg, build_test_offseg, interleave_groups
from edgeseg.models.registry import register_model
from edgeseg.models.segnext import SegNeXt, build_segnext

PSL_WEIGHTS = (0.75, 0.5, 0.25)  # finest stage first (MPLSeg's auxiliary heads)
AUX_CE_WEIGHT = 0.1


class _AuxStages:
    """Head mixin: auxiliary classifiers on AFM stage outputs, logits kept from the last train-mode forward."""

    def _init_aux(self, stage_channels: list[int], num_classes: int) -> None:
        self.auxiliary_head = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in stage_channels)
        self._aux_logits: list[torch.Tensor] = []

    def _record_stage(self, i: int, feat: torch.Tensor) -> None:
        if self.training:
            self._aux_logits.append(self.auxiliary_head[i](feat))

    def pop_aux_logits(self) -> list[torch.Tensor]:
        out, self._aux_logits = self._aux_logits, []
        return out


class _PSLCarrier(PSLMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decode_head(self.backbone(x))
        if self.training:
            self._psl_reset()
            stages = self.decode_head.pop_aux_logits()  # coarse -> fine order of creation
            weights = PSL_WEIGHTS[:len(stages)][::-1]  # finest gets the largest weight
            for lg, w in zip(stages, weights):
                self._psl_cache(lg, w, AUX_CE_WEIGHT)
        return out


# --------------------------------------------------------------------------------------------------------
# OffSeg + AFM
# --------------------------------------------------------------------------------------------------------
class AFMFusion(nn.Module):
    """Fusion stage with FreqFusion's contract: (hr, lr) -> (None, hr, lr') with lr' = AFM(lr) zero-padded in
    the spectrum to hr's size (lr_channels kept)."""

    def __init__(self, lr_channels: int, lr_stride: int, hr_stride: int):
        super().__init__()
        self.afm = AFM(lr_channels, lr_channels, stride=lr_stride, out_stride=hr_stride)

    def forward(self, hr: torch.Tensor, lr: torch.Tensor):
        return None, hr, self.afm(lr, out_hw=(int(hr.shape[-2]), int(hr.shape[-1])))


class OffSegAFMHead(_AuxStages, OffSegHead):
    """OffSeg head whose three FreqFusion stages are AFM stages (attribute `freqfusions` kept for structure)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        coarse_first = self.new_channels[::-1]
        stage_ch = [sum(coarse_first[:i + 2]) for i in range(len(coarse_first) - 1)]
        self._init_aux(stage_ch, self.num_classes)

    def build_fusion(self, hr_channels: int, lr_channels: int, compressed_channels: int) -> nn.Module:
        i = getattr(self, "_n_fusions", 0)
        self._n_fusions = i + 1
        lr_stride = 32 // (2 ** i)  # stages run from stride 32 down to 4
        return AFMFusion(lr_channels, lr_stride, lr_stride // 2)

    def fuse(self, feats: list[torch.Tensor]) -> torch.Tensor:
        levels = [pre(f) for pre, f in zip(self.pre, feats)][::-1]
        low = levels[0]
        for i, (high, fusion) in enumerate(zip(levels[1:], self.freqfusions)):
            _, high, low = fusion(high, low)
            low = interleave_groups(high, low)
            self._record_stage(i, low)
        return low


class OffSegAFM(_PSLCarrier, OffSeg):
    """OffSeg with AFM fusion; `aux_loss` adds MPLSeg's auxiliary CE + PSL."""


# --------------------------------------------------------------------------------------------------------
# SegNeXt + AFM
# --------------------------------------------------------------------------------------------------------
class LightHamHeadAFM(_AuxStages, LightHamHead):
    """LightHamHead whose multi-scale fusion brings the coarser inputs to the first one's scale with AFM
    (spectral zero-padding) instead of bilinear resizing; `in_strides` are the inputs' strides."""

    def __init__(self, *args, in_strides=(8, 16, 32), **kwargs):
        super().__init__(*args, **kwargs)
        self.in_strides = list(in_strides)
        base = self.in_strides[0]
        self.afm = nn.ModuleList(AFM(c, c, stride=s, out_stride=base)
                                 for c, s in zip(self.in_channels[1:], self.in_strides[1:]))
        self._init_aux(self.in_channels[1:][::-1], self.num_classes)  # coarse first

    def fuse_inputs(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = (int(feats[0].shape[-2]), int(feats[0].shape[-1]))
        outs = [feats[0]]
        for afm, f in zip(self.afm, feats[1:]):
            outs.append(afm(f, out_hw=size))
        n = len(outs) - 1
        for j, o in enumerate(outs[1:][::-1]):  # record coarse first
            self._record_stage(j, o)
        del n
        return torch.cat(outs, dim=1)


class SegNeXtAFM(_PSLCarrier, SegNeXt):
    """SegNeXt with AFM fusion in the head; `aux_loss` adds MPLSeg's auxiliary CE + PSL."""


def _as(model: nn.Module, cls: type) -> nn.Module:
    out = cls(model.backbone, model.decode_head)
    return out


@register_model
def offseg_t_afm(num_classes: int, **kw) -> nn.Module:
    """OffSeg-T with MPLSeg's AFM (spectral up-sampling) in place of FreqFusion; PSL auxiliary loss."""
    return _as(build_offseg("t", num_classes, head_cls=OffSegAFMHead, **kw), OffSegAFM)


@register_model
def segnext_t_afm(num_classes: int, **kw) -> nn.Module:
    """SegNeXt-T with MPLSeg's AFM as LightHamHead's multi-scale fusion; PSL auxiliary loss."""
    return _as(build_segnext(num_classes, LightHamHeadAFM, **kw), SegNeXtAFM)


@register_model
def test_offseg_afm(num_classes: int, **kw) -> nn.Module:
    """Tiny OffSeg + AFM (CI)."""
    return _as(build_test_offseg(num_classes, head_cls=OffSegAFMHead, **kw), OffSegAFM)


@register_model
def test_segnext_afm(num_classes: int, **kw) -> nn.Module:
    """Tiny SegNeXt + AFM (CI)."""
    return _as(build_segnext(num_classes, LightHamHeadAFM, tiny=True, **kw), SegNeXtAFM)
