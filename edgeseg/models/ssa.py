"""SSA-Seg's semantic and spatial adaptive pixel-level classifier (Ma, Ni, Chen, NeurIPS 2024) as a head option
on SegNeXt's LightHamHead: the inference path of the official `LightHamHead_ssa`
(github.com/xwmaxwma/SSAClassifier, models/decode_heads/ham_head_ssa.py, `forward_test`).

Inference: coarse logits from the fixed classifier `conv_seg`; spatial prototype adaptation (a depthwise 3x3
positional feature, class centre positions from spatially-softmaxed coarse masks); semantic prototype
adaptation (class centres pooled with the class-softmaxed coarse masks, fused with the fixed prototypes); the
final logits are 15 x cosine similarity between (feature + position) and the adapted centres.

The official module names are kept so official SSA checkpoints load strictly, including the training-only
ground-truth branches (`gt_center_content_proj`, `gt_center_pos_proj`, `gt_center_proj`) and the Mask2Former-style
criterion buffer `ssa_loss.criterion.empty_weight`. Training here returns the same adaptive logits (the
trainer's CE trains the whole path); the official online multi-domain distillation losses (which need OpenCV
edge maps of the labels) are not reproduced.

Must not import export/ or runtime/.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeseg.models.ham_head import LightHamHead

SSA_SCALE = 15.0


def _proj(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c * 2, c // 2, bias=False), nn.ReLU(), nn.Linear(c // 2, c))


def _l2n(x: torch.Tensor, dim: int) -> torch.Tensor:
    # x / (||x|| + 1e-12) as in the official get_pred, written with sqrt(sum(x^2)) (exports everywhere)
    return x / (torch.sqrt((x * x).sum(dim=dim, keepdim=True)) + 1e-12)


class _SetCriterionState(nn.Module):
    def __init__(self, num_classes: int, eos_coef: float = 0.1):
        super().__init__()
        w = torch.ones(num_classes + 1)
        w[-1] = eos_coef
        self.register_buffer("empty_weight", w)


class _SSALossState(nn.Module):
    """Holds only the state the official SSALoss stores (so official checkpoints load strictly)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.criterion = _SetCriterionState(num_classes)


class SSAClassifier(nn.Module):
    """The scope of the adaptive classifier's ops (no parameters or buffers: the official names stay on the head, so
    official checkpoints still load strictly). Quantizers see its module path on every op of `classify`, so the
    mixed-precision policy can keep the whole cosine classifier float (edgeseg.quant.policy)."""

    def forward(self, classify, feat: torch.Tensor) -> torch.Tensor:
        return classify(feat)


class LightHamHeadSSA(LightHamHead):
    """LightHamHead whose classifier is SSA-Seg's semantic/spatial adaptive classifier."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c, k = self.channels, self.num_classes
        self.get_feat_pos = nn.Conv2d(c, c, 3, 1, 1, bias=True, groups=c)
        self.center_pos = nn.Embedding(k, c)
        self.center_content_proj = _proj(c)
        self.gt_center_content_proj = _proj(c)
        self.center_pos_proj = _proj(c)
        self.gt_center_pos_proj = _proj(c)
        self.center_proj = nn.Linear(c, c, bias=False)
        self.gt_center_proj = nn.Linear(c, c, bias=False)
        self.feat_proj = nn.Identity()
        self.ssa_loss = _SSALossState(k)
        self.adaptive_classifier = SSAClassifier()
        # conv_seg's weight as (1, K, C) prototype data, baked by prepare_for_export (not in the state dict)
        self.register_buffer("_export_proto", None, persistent=False)

    def prepare_for_export(self, input_hw) -> None:
        """Bake the fixed prototypes (conv_seg's weight) as a separate 3-D constant for the export form: the XNNPACK
        delegate (executorch 1.5.1) crashes at run time when a 4-D conv weight is also read as data."""
        k, c = self.num_classes, self.channels
        self._export_proto = self.conv_seg.weight.detach().reshape(1, k, c).clone()

    def _load_from_state_dict(self, *args, **kwargs):
        self._export_proto = None  # new weights: the baked copy is stale
        super()._load_from_state_dict(*args, **kwargs)

    def classify(self, feat: torch.Tensor) -> torch.Tensor:
        return self.adaptive_classifier(self._classify, feat)

    def _classify(self, feat: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._classify_export(feat)
        b, c, h, w = feat.shape
        k = self.num_classes
        coarse = self.cls_seg(feat).reshape(b, k, h * w)  # b, k, hw
        feat_pos = self.get_feat_pos(feat)
        feat_flat = feat.reshape(b, c, h * w).transpose(1, 2)  # b, hw, c

        # spatial prototype adaptation: class centre positions
        attn = F.softmax(coarse, dim=-1)  # over space
        pos_flat = feat_pos.reshape(b, c, h * w).transpose(1, 2)
        center_pos = self.center_pos.weight.unsqueeze(0).expand(b, -1, -1)
        center_pos = self.center_pos_proj(torch.cat([center_pos, attn @ pos_flat], dim=-1))  # b, k, c

        # semantic prototype adaptation: class centres from the coarse masks
        pred = F.softmax(coarse, dim=1)  # over classes
        pred_proto = (pred @ feat_flat) / (pred.sum(-1, keepdim=True) + 1e-12)  # b, k, c
        proto = self.conv_seg.weight.reshape(k, c).unsqueeze(0).expand(b, -1, -1)
        pred_proto = self.center_content_proj(torch.cat([pred_proto, proto], dim=-1))

        x = self.feat_proj(feat + feat_pos)
        center = self.center_proj(pred_proto + center_pos)  # b, k, c
        x = _l2n(x.reshape(b, c, h * w), dim=1)
        center = _l2n(center, dim=-1)
        return (center @ x).reshape(b, k, h, w) * SSA_SCALE

    def _classify_export(self, feat: torch.Tensor) -> torch.Tensor:
        """`classify` as traced graphs should hold it (torch.export / compile), equal up to float rounding: 3-D bmm
        instead of matmul (no expand ops), softmax only over the last axis, sums over an axis as 4-D means over
        the last two axes, no expand of a parameter for batch 1 - only ops the XNNPACK delegate takes."""
        b, c, h, w = feat.shape
        k, n = self.num_classes, h * w
        coarse = self.cls_seg(feat).reshape(b, k, n)  # b, k, hw
        feat_pos = self.get_feat_pos(feat)
        feat_t = feat.reshape(b, c, n).transpose(1, 2)  # b, hw, c

        # spatial prototype adaptation: class centre positions
        attn = coarse.softmax(dim=-1)  # over space
        pos_t = feat_pos.reshape(b, c, n).transpose(1, 2)
        center_pos = self.center_pos.weight.reshape(1, k, c)
        if b != 1:
            center_pos = center_pos.expand(b, -1, -1)
        center_pos = self.center_pos_proj(torch.cat([center_pos, torch.bmm(attn, pos_t)], dim=-1))  # b, k, c

        # semantic prototype adaptation: class centres from the coarse masks
        pred = coarse.transpose(1, 2).softmax(dim=-1).transpose(1, 2)  # over classes; b, k, hw
        pred_proto = torch.bmm(pred, feat_t) / (_sum_last(pred) + 1e-12)  # b, k, c
        proto = self._export_proto if self._export_proto is not None else self.conv_seg.weight.reshape(1, k, c)
        if b != 1:
            proto = proto.expand(b, -1, -1)
        pred_proto = self.center_content_proj(torch.cat([pred_proto, proto], dim=-1))

        x = self.feat_proj(feat + feat_pos).reshape(b, c, n).transpose(1, 2)  # b, hw, c
        x = x / (torch.sqrt(_sum_last(x * x)) + 1e-12)
        center = self.center_proj(pred_proto + center_pos)  # b, k, c
        center = center / (torch.sqrt(_sum_last(center * center)) + 1e-12)
        return torch.bmm(center, x.transpose(1, 2)).reshape(b, k, h, w) * SSA_SCALE


def _sum_last(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis of a 3-D tensor, keepdim, as a 4-D mean over the last two axes (what XNNPACK's
    mean takes; it has no sum)."""
    b, m, n = t.shape
    # (float(n): an int scalar becomes an int64 constant cast outside the delegate, a 0-dim delegate input that
    # XNNPACK rejects at run time, "Propagating input shapes failed")
    return t.reshape(b, m, n, 1).mean(dim=(2, 3), keepdim=True).reshape(b, m, 1) * float(n)
