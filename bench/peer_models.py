"""The two mobile segmentation peers that torchvision ships, written here from their papers with torchvision's
layer shapes (torchvision itself cannot be installed beside this torch), for `bench/peers.py`.

- `lraspp_mobilenet_v3_large`: MobileNetV3-Large (Howard et al., "Searching for MobileNetV3", ICCV 2019) with the
  last stage dilated (rate 2, so the backbone ends at output stride 16) and the Lite R-ASPP head of the same
  paper: a 1x1 conv-BN-ReLU (960 -> 128) on the stride-16 features gated by a sigmoid of a global-pool 1x1 conv,
  upsampled to the stride-8 features (40 channels, the last block at stride 8) where two 1x1 classifiers are
  summed. torchvision pools globally where the paper used a large strided average pool; we follow torchvision.
- `deeplabv3_mobilenet_v3_large`: the same dilated backbone with DeepLabV3's ASPP head (Chen et al.,
  "Rethinking Atrous Convolution", 2017): a 1x1 branch, three 3x3 branches at rates 12/24/36 and an image-pool
  branch, 256 channels each, projected to 256 (dropout 0.5), then 3x3 conv-BN-ReLU and a 1x1 classifier. Output
  stride 16. `aux=True` adds the training-time FCN head (on the stride-8 features) that torchvision's released
  weights carry.

Both are registered with `edgeseg.models.registry` on import, so edgeseg checkpoints of them load and export
through edgeseg's exporters like its own models. `forward` returns logits at the model's `output_stride` (8 and
16), like edgeseg's models; `upsample=True` adds torchvision's final bilinear resize to the input size.

Parameter counts with 21 classes equal torchvision's model cards (tests/test_peers.py): LR-ASPP 3,221,538;
DeepLabV3 11,029,328 with the aux head (the card counts the released weights, which include it), 11,025,477
without it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeseg.models.registry import list_models, register_model

# MobileNetV3-Large bottlenecks (paper Table 1): input, kernel, expanded, output, squeeze-excite, hard-swish,
# stride. The last three form the stage that is dilated for segmentation.
MOBILENET_V3_LARGE = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),  # the last block at stride 8: LR-ASPP's "low" features
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)
LOW_BLOCK = 5  # index in MOBILENET_V3_LARGE of the stride-8 output
DILATED_FROM = 12  # blocks from here on are dilated (rate 2) instead of strided
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # the MobileNetV3 backbone's BatchNorm settings


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round `v` to the nearest multiple of `divisor`, never going below 90 % of `v` (MobileNet's rule)."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class ConvBNAct(nn.Sequential):
    """k x k conv (no bias, 'same' padding for its dilation) + BatchNorm + optional activation."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, dilation: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 * dilation, dilation, groups, bias=False),
                  nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Channel gate: global average -> 1x1 conv (to make_divisible(C/4)) -> ReLU -> 1x1 conv -> hard-sigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        squeezed = make_divisible(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand (skipped when expanded == input) -> k x k depth-wise -> [SE] -> 1x1 project
    (linear); identity shortcut when the shape is kept. A dilated block keeps stride 1."""

    def __init__(self, cin: int, k: int, expanded: int, cout: int, se: bool, hswish: bool, stride: int,
                 dilation: int = 1):
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        stride = 1 if dilation > 1 else stride
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, act=act))
        layers.append(ConvBNAct(expanded, expanded, k, stride, dilation, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcite(expanded))
        layers.append(ConvBNAct(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Large(nn.Module):
    """The feature extractor: stem (3x3/2 conv, hard-swish), 15 bottlenecks, 1x1 conv to 960 (hard-swish).
    `forward` returns (stride-8 features (40 ch), last features (960 ch; stride 16 when dilated, else 32))."""

    def __init__(self, dilated: bool = True):
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(3, 16, 3, 2, act=nn.Hardswish)]
        for i, cfg in enumerate(MOBILENET_V3_LARGE):
            layers.append(Bottleneck(*cfg, dilation=2 if dilated and i >= DILATED_FROM else 1))
        layers.append(ConvBNAct(160, 960, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.low_index = LOW_BLOCK + 1  # features[0] is the stem
        self.low_channels, self.high_channels = MOBILENET_V3_LARGE[LOW_BLOCK][3], 960
        # MobileNetV3's own initialisation (the heads keep PyTorch's defaults)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = None
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == self.low_index:
                low = x
        return low, x


class LRASPPHead(nn.Module):
    """Lite R-ASPP: relu(bn(conv1x1(high))) * sigmoid(conv1x1(globalpool(high))), upsampled to `low`'s size,
    classified and added to a classifier of `low`."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int = 128):
        super().__init__()
        self.cbr = nn.Sequential(nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                 nn.BatchNorm2d(inter_channels), nn.ReLU())
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                   nn.Sigmoid())
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=(k - 1) // 2 * dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU()]


class ImagePool(nn.Module):
    """ASPP's image-level branch: global average -> 1x1 conv-BN-ReLU -> broadcast back (bilinear) to the map."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Sequential(*_conv_bn_relu(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(F.adaptive_avg_pool2d(x, 1))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pool branch, concatenated, projected."""

    def __init__(self, cin: int, rates: tuple[int, ...] = (12, 24, 36), channels: int = 256):
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(cin, channels))]
        branches += [nn.Sequential(*_conv_bn_relu(cin, channels, 3, r)) for r in rates]
        branches.append(ImagePool(cin, channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(*_conv_bn_relu(len(branches) * channels, channels), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabHead(nn.Sequential):
    def __init__(self, cin: int, num_classes: int, rates: tuple[int, ...] = (12, 24, 36)):
        super().__init__(ASPP(cin, rates), *_conv_bn_relu(256, 256, 3), nn.Conv2d(256, num_classes, 1))


class FCNHead(nn.Sequential):
    """The auxiliary training head: 3x3 conv-BN-ReLU to C/4, dropout 0.1, 1x1 classifier."""

    def __init__(self, cin: int, num_classes: int):
        super().__init__(*_conv_bn_relu(cin, cin // 4, 3), nn.Dropout(0.1), nn.Conv2d(cin // 4, num_classes, 1))


class _Upsampled(nn.Module):
    """Shared forward tail: the logits at `output_stride`, or (upsample=True) resized to the input like
    torchvision's models."""

    output_stride = 1

    def _finish(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


class LRASPP(_Upsampled):
    def __init__(self, num_classes: int, upsample: bool = False):
        super().__init__()
        self.backbone = MobileNetV3Large(dilated=True)
        self.classifier = LRASPPHead(self.backbone.low_channels, self.backbone.high_channels, num_classes)
        self.upsample = bool(upsample)
        self.output_stride = 1 if upsample else 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(x)
        return self._finish(self.classifier(low, high), x)


class DeepLabV3(_Upsampled):
    def __init__(self, num_classes: int, aux: bool = False, upsample: bool = False):
        super().__init__()
        self.backbone = MobileNetV3Large(dilated=True)
        self.classifier = DeepLabHead(self.backbone.high_channels, num_classes)
        self.aux_classifier = FCNHead(self.backbone.low_channels, num_classes) if aux else None
        self.upsample = bool(upsample)
        self.output_stride = 1 if upsample else 16

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        low, high = self.backbone(x)
        out = self._finish(self.classifier(high), x)
        if self.aux_classifier is not None and self.training:  # the aux head only serves the training loss
            return out, self._finish(self.aux_classifier(low), x)
        return out


def _register(fn):
    # a second import of this file (as `bench.peer_models` and as `peer_models`) must not register twice
    return fn if fn.__name__ in list_models() else register_model(fn)


@_register
def lraspp_mobilenet_v3_large(num_classes: int, upsample: bool = False) -> nn.Module:
    """Peer: LR-ASPP on dilated MobileNetV3-Large (torchvision's layer shapes; logits at stride 8)."""
    return LRASPP(num_classes, upsample=upsample)


@_register
def deeplabv3_mobilenet_v3_large(num_classes: int, aux: bool = False, upsample: bool = False) -> nn.Module:
    """Peer: DeepLabV3 (ASPP 12/24/36, 256 ch) on dilated MobileNetV3-Large (torchvision's shapes; stride 16)."""
    return DeepLabV3(num_classes, aux=aux, upsample=upsample)


# Ultralytics' YOLO26n-sem (Ultralytics 8.4 semantic segmentation), built from the YAML that ultralytics ships, for
# the benchmark only: ultralytics is never an edgeseg dependency. It installs beside edgeseg's torch without its
# dependencies (ultralytics only reads torchvision's version from its metadata; the semantic model never calls
# torchvision's C ops), into a folder of its own that `bench/peers.py --ultralytics-site DIR` puts on the path:
ULTRALYTICS_INSTALL = ("pip install --no-deps --target .bench-site ultralytics==8.4.190 ultralytics-thop==2.2.3 "
                       "torchvision==0.28.0")
ULTRALYTICS_YAML = "yolo26n-sem.yaml"


def ultralytics_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ultralytics") is not None


class YoloSem(nn.Module):
    """Ultralytics' SemanticSegmentationModel from its YAML (random weights); forward returns its eval-mode
    output, logits at stride 8 (its SemanticSegment head's classifier on P3)."""

    output_stride = 8

    def __init__(self, num_classes: int, yaml: str = ULTRALYTICS_YAML):
        super().__init__()
        if not ultralytics_available():
            raise ImportError(f"yolo26n_sem needs ultralytics, installed for the benchmark only: "
                              f"{ULTRALYTICS_INSTALL}, then bench/peers.py --ultralytics-site .bench-site")
        import logging

        logging.getLogger("ultralytics").setLevel(logging.ERROR)  # "Overriding model.yaml nc=19 with nc=11"
        from ultralytics.nn.tasks import SemanticSegmentationModel

        self.net = SemanticSegmentationModel(yaml, nc=num_classes, verbose=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@_register
def yolo26n_sem(num_classes: int) -> nn.Module:
    """Peer: Ultralytics YOLO26n-sem built from ultralytics' yolo26n-sem.yaml (benchmark only; logits at stride 8)."""
    return YoloSem(num_classes)


PEERS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "yolo26n_sem")
# torchvision's model cards (weights meta "num_params", 21 VOC classes); DeepLabV3's released weights have the aux
# head
CARD_PARAMS = {"lraspp_mobilenet_v3_large": 3_221_538, "deeplabv3_mobilenet_v3_large": 11_029_328}

__all__ = ["PEERS", "CARD_PARAMS", "YoloSem", "yolo26n_sem", "ultralytics_available", "ULTRALYTICS_INSTALL", "MobileNetV3Large", "LRASPP", "DeepLabV3", "lraspp_mobilenet_v3_large",
           "deeplabv3_mobilenet_v3_large", "make_divisible"]
