"""OffSeg-Lite0: an ImageNet-pretrainable EfficientNet-Lite0 backbone + a light FPN decoder + OffSeg's offset-learning
head for the logits.

    backbone      EfficientNetLite0, blocks 0-14 (edgeseg.models.efficientnet_lite; `backbone.*` keys are the
                  ImageNet checkpoint's, so `edgeseg train --pretrained-backbone` loads them strictly). Features at
                  strides 8, 16, 32 (40, 112, 192 channels) feed the decoder. Block 15 (192 -> 320 at stride 32) and
                  the 1280-wide head serve the classifier only; without block 15 the model has 8 % fewer MACs.
    decode_head   LiteFPNHead: 1x1 conv-BN laterals to 64 channels, top-down bilinear x2 upsample + add, a
                  depth-wise-separable 3x3 (dw 3x3-BN-ReLU, 1x1-BN-ReLU) and `offset_learning` (OffsetLearning,
                  64-d class embeddings) -> logits at stride 8.

Why this decoder (measured at 384x480, 2 threads, README.md "Models"): OffSeg's FreqFusion head on this backbone was
9-18x slower than LR-ASPP-MobileNetV3 on ONNX Runtime, OpenVINO and ExecuTorch/XNNPACK (and left gather ops off
XNNPACK); this one keeps the model at or below LR-ASPP's latency on all three, and lowers to one XNNPACK partition.
`decoder="freqfusion"` builds OffSeg's own head (FreqFusion stages, GroupNorm, logits at stride 4) on the same
backbone for comparison.

Must not import export/ or runtime/.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeseg.models.efficientnet_lite import EfficientNetLite0, init_conv_bn
from edgeseg.models.offseg import OffSeg, OffSegHead
from edgeseg.models.offset_learning import OffsetLearning
from edgeseg.models.registry import register_model

SEG_BLOCKS = 15  # EfficientNet-Lite0 blocks the segmentation backbone keeps (of 16)


class ConvBN(nn.Sequential):
    """k x k conv (no bias) + BatchNorm (+ ReLU): keys `0.weight`, `1.weight`, `1.bias`, `1.running_*`."""

    def __init__(self, cin: int, cout: int, k: int = 1, groups: int = 1, act: bool = True):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class LiteFPNHead(nn.Module):
    """FPN-style decode head for edge CPUs: one 1x1 conv-BN lateral per used level (`in_channels[first_level:]`) to
    `fpn_channels`; from the coarsest level down, the running map is bilinearly upsampled to the next level's size
    and added to its lateral; a depth-wise 3x3 conv-BN-ReLU and a 1x1 conv-BN-ReLU to `channels` smooth the sum;
    `offset_learning` turns it into logits at the finest used level's stride."""

    def __init__(self, in_channels=(24, 40, 112, 192), num_classes: int = 19, fpn_channels: int = 64,
                 channels: int = 64, first_level: int = 1):
        super().__init__()
        self.in_channels = list(in_channels)
        self.first_level = first_level
        self.lateral = nn.ModuleList(ConvBN(c, fpn_channels, 1, act=False) for c in self.in_channels[first_level:])
        self.smooth = nn.Sequential(ConvBN(fpn_channels, fpn_channels, 3, groups=fpn_channels),
                                    ConvBN(fpn_channels, channels, 1))
        init_conv_bn(self)
        self.offset_learning = OffsetLearning(num_classes, channels)

    def fuse(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Backbone features (fine to coarse) -> the smoothed map at the finest used level, `channels` wide."""
        feats = feats[self.first_level:]
        x = self.lateral[-1](feats[-1])
        for lateral, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            x = F.interpolate(x, size=f.shape[-2:], mode="bilinear", align_corners=False) + lateral(f)
        return self.smooth(x)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.offset_learning(self.fuse(feats))


class OffSegLite(OffSeg):
    """Segmentor `decode_head(backbone(x))` with the stride of its head's logits as `output_stride`."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, output_stride: int):
        super().__init__(backbone, decode_head)
        self.output_stride = output_stride


def build_offseg_lite(num_classes: int, decoder: str = "fpn", tiny: bool = False, drop_path_rate: float = 0.0,
                      fpn_channels: int | None = None, channels: int | None = None, first_level: int = 1,
                      num_blocks: int | None = None) -> OffSegLite:
    """EfficientNet-Lite0 (first `num_blocks` blocks, default 15) + `decoder` ("fpn": LiteFPNHead, logits at stride
    4 * 2**first_level; "freqfusion": OffSeg's head, stride 4). `tiny`: widths / 4 and one block per stage (the last
    dropped likewise), small head (CI)."""
    if tiny:
        backbone = EfficientNetLite0(width_div=4, depth=1, num_blocks=num_blocks or 6)
    else:
        backbone = EfficientNetLite0(drop_path_rate=drop_path_rate, num_blocks=num_blocks or SEG_BLOCKS)
    widths = backbone.out_channels
    if decoder == "fpn":
        default = 32 if tiny else 64
        head = LiteFPNHead(widths, num_classes, fpn_channels or default, channels or default, first_level)
        return OffSegLite(backbone, head, 4 * 2 ** first_level)
    if decoder == "freqfusion":
        new = (16, 16, 16, 32) if tiny else (32, 32, 64, 128)  # test_offseg's and OffSeg-T's
        head = OffSegHead(widths, new, channels or (32 if tiny else 256), num_classes, norm_groups=8 if tiny else 32)
        return OffSegLite(backbone, head, 4)
    raise ValueError(f"offseg_lite0: decoder {decoder!r} is not 'fpn' or 'freqfusion'")


@register_model
def offseg_lite0(num_classes: int, **kw) -> nn.Module:
    """OffSeg-Lite0: ImageNet EfficientNet-Lite0 + light FPN decoder + offset learning, logits at 1/8."""
    return build_offseg_lite(num_classes, **kw)


@register_model
def test_offseg_lite0(num_classes: int, **kw) -> nn.Module:
    """Tiny OffSeg-Lite0 for CI (same code, widths / 4, one block per stage; no pretrained weights)."""
    return build_offseg_lite(num_classes, tiny=True, **kw)
