"""OffSeg (ICCV 2025): EfficientFormerV2 backbone + OffSeg head (FreqFusion decoder + offset learning).

State-dict layout equals the official mmseg model's (`backbone.*`, `decode_head.*`), so official checkpoints
load with `strict=True`. `forward(x)` returns `decode_head(backbone(x))`: logits at 1/4 of the input.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from edgeseg.models.efficientformer_v2 import EfficientFormerV2, efficientformerv2_feat
from edgeseg.models.encoder_decoder import EncoderDecoder
from edgeseg.models.freqfusion import FreqFusion
from edgeseg.models.offset_learning import OffsetLearning
from edgeseg.models.registry import register_model


class ConvGNReLU(nn.Module):
    """mmcv ConvModule(conv 1x1 without bias, GroupNorm, ReLU): keys `conv.weight`, `gn.weight`, `gn.bias`."""

    def __init__(self, cin: int, cout: int, groups: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.gn = nn.GroupNorm(groups, cout)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.gn(self.conv(x)))


def interleave_groups(hr: torch.Tensor, lr: torch.Tensor, groups: int = 4) -> torch.Tensor:
    """Concatenate two maps group-interleaved: [hr_0, lr_0, hr_1, lr_1, ...] with `groups` channel groups each
    (the official `cat([hr.reshape(b*4,-1,h,w), lr.reshape(b*4,-1,h,w)], 1).reshape(b,-1,h,w)`)."""
    b, _, h, w = hr.shape
    return torch.cat([hr.reshape(b * groups, -1, h, w), lr.reshape(b * groups, -1, h, w)], dim=1).reshape(b, -1, h, w)


class OffSegHead(nn.Module):
    """OffSeg decode head.

    1x1 conv-GN-ReLU per backbone level to `new_channels`; then, from the coarsest level down, a fusion stage
    merges the running low-res map with the next finer level and the two outputs are concatenated
    group-interleaved; a 1x1 conv-GN-ReLU `align` to `channels`; `offset_learning` gives the logits.

    Fusion stages are made by `build_fusion(hr_channels, lr_channels, compressed_channels) -> nn.Module`, which
    a subclass may override (e.g. AFM instead of FreqFusion). The returned module must implement
    `forward(hr_feat, lr_feat) -> (aux, hr_out, lr_out)` where hr_out is (B, hr_channels, H, W) and lr_out is
    (B, lr_channels, H, W) (lr upsampled to hr's size); `aux` is ignored by this head (FreqFusion returns its
    low-pass kernel logits there). Stage i fuses hr_channels = reversed(new_channels)[i+1] with
    lr_channels = sum of the coarser new_channels; compressed_channels = (hr + lr) // 4 (official rule).

    `conv_seg` (and `dropout`) exist only because official checkpoints carry them; they are unused.
    """

    def __init__(self, in_channels=(32, 48, 120, 224), new_channels=(32, 32, 64, 128), channels: int = 256,
                 num_classes: int = 150, norm_groups: int = 32, dropout_ratio: float = 0.1):
        super().__init__()
        self.in_channels = list(in_channels)
        self.new_channels = list(new_channels)
        self.channels = channels
        self.num_classes = num_classes
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)  # unused (official checkpoints hold it)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.pre = nn.ModuleList(ConvGNReLU(ci, co, norm_groups) for ci, co in zip(self.in_channels, self.new_channels))
        self.freqfusions = nn.ModuleList()
        coarse_first = self.new_channels[::-1]
        acc = coarse_first[0]
        for c in coarse_first[1:]:
            self.freqfusions.append(self.build_fusion(c, acc, (acc + c) // 4))
            acc += c
        self.align = ConvGNReLU(sum(self.new_channels), channels, norm_groups)
        self.offset_learning = OffsetLearning(num_classes, channels)

    def build_fusion(self, hr_channels: int, lr_channels: int, compressed_channels: int) -> nn.Module:
        """One fusion stage (see the class docstring for the contract). Default: OffSeg's FreqFusion."""
        return FreqFusion(hr_channels=hr_channels, lr_channels=lr_channels, compressed_channels=compressed_channels)

    def fuse(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Backbone features (fine to coarse) -> fused map at the finest level, sum(new_channels) channels."""
        levels = [pre(f) for pre, f in zip(self.pre, feats)][::-1]
        low = levels[0]
        for high, fusion in zip(levels[1:], self.freqfusions):
            _, high, low = fusion(high, low)
            low = interleave_groups(high, low)
        return low

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.offset_learning(self.align(self.fuse(feats)))


class OffSeg(EncoderDecoder):
    """Segmentor: `backbone` (EfficientFormerV2) + `decode_head` (OffSegHead); logits at stride 4."""

    output_stride = 4


# Official configs: backbone variant, decode_head in_channels / new_channels (channels 256, GN 32 groups).
_CONFIGS = {
    "t": ("S1", (32, 48, 120, 224), (32, 32, 64, 128)),
    "b": ("S2", (32, 64, 144, 288), (32, 64, 128, 256)),
    "l": ("L", (40, 80, 192, 384), (32, 64, 128, 256)),
}


def build_offseg(size: str, num_classes: int, head_cls: type = OffSegHead, drop_path_rate: float | None = None,
                 **head_kw) -> OffSeg:
    """OffSeg-T/B/L with the official widths; `head_cls` lets variants swap the head class."""
    variant, in_ch, new_ch = _CONFIGS[size]
    bkw = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
    backbone = efficientformerv2_feat(variant, **bkw)
    head = head_cls(in_channels=in_ch, new_channels=new_ch, channels=256, num_classes=num_classes, **head_kw)
    return OffSeg(backbone, head)


def build_test_offseg(num_classes: int, head_cls: type = OffSegHead, **head_kw) -> OffSeg:
    """Tiny CI OffSeg: same code, small widths/depths/attention, bias tables for 64x64."""
    widths = (16, 16, 32, 32)
    backbone = EfficientFormerV2(widths, (1, 1, 2, 2), ((2,), (2,), (2, 2), (2, 2)), vit_num=2, resolution=64,
                                 attn_cfg=dict(key_dim=8, num_heads=2, attn_ratio=2),
                                 down_attn_cfg=dict(key_dim=8, num_heads=2, attn_ratio=2))
    head_kw.setdefault("norm_groups", 8)
    head = head_cls(in_channels=widths, new_channels=(16, 16, 16, 32), channels=32, num_classes=num_classes,
                    **head_kw)
    return OffSeg(backbone, head)


@register_model
def offseg_t(num_classes: int, **kw) -> nn.Module:
    """OffSeg-T: EfficientFormerV2-S1 + FreqFusion decoder + offset learning (official, ~6.2M params)."""
    return build_offseg("t", num_classes, **kw)


@register_model
def offseg_b(num_classes: int, **kw) -> nn.Module:
    """OffSeg-B: EfficientFormerV2-S2 + FreqFusion decoder + offset learning (official widths)."""
    return build_offseg("b", num_classes, **kw)


@register_model
def offseg_l(num_classes: int, **kw) -> nn.Module:
    """OffSeg-L: EfficientFormerV2-L + FreqFusion decoder + offset learning (official widths)."""
    return build_offseg("l", num_classes, **kw)


@register_model
def test_offseg(num_classes: int, **kw) -> nn.Module:
    """Tiny OffSeg for CI (same code, small widths/depths; fast at 64x64)."""
    return build_test_offseg(num_classes, **kw)
