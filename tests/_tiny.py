"""A tiny segmentation model with the export-hostile ops of OffSeg/SegNeXt in miniature, for export tests.

`tiny_ops`: conv stem, LayerNorm, EfficientFormerV2-style talking-head attention (matmul -> conv -> softmax(-1)
-> conv -> matmul), grid_sample driven by a learned offset, a CARAFE-like unfold upsampler, bmm and a bilinear
interpolate. Output stride 4, like OffSeg. Registered on import (once) so checkpoints of it load normally.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeseg.models.registry import list_models, register_model

TINY = "tiny_ops"
CLASSES = ("sky", "road", "car", "tree")
PALETTE = ((128, 128, 128), (128, 64, 128), (64, 0, 128), (128, 128, 0))


class TalkingHeadAttention(nn.Module):
    """EfficientFormerV2 Attention4D in miniature: q@k -> conv(heads) -> softmax(-1) -> conv(heads) -> @v."""

    def __init__(self, dim: int, heads: int = 4, key_dim: int = 8):
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.qkv = nn.Conv2d(dim, heads * key_dim * 3, 1)
        self.th1 = nn.Conv2d(heads, heads, 1)
        self.th2 = nn.Conv2d(heads, heads, 1)
        self.proj = nn.Conv2d(heads * key_dim, dim, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)  # (N, heads*d, HW)
        q = q.reshape(n, self.heads, self.key_dim, h * w).transpose(-1, -2)
        k = k.reshape(n, self.heads, self.key_dim, h * w)
        v = v.reshape(n, self.heads, self.key_dim, h * w).transpose(-1, -2)
        attn = (q @ k) * self.key_dim ** -0.5  # (N, heads, HW, HW)
        attn = self.th2(self.th1(attn).softmax(dim=-1))
        out = (attn @ v).transpose(-1, -2).reshape(n, self.heads * self.key_dim, h, w)
        return x + self.proj(out)


class TinyOps(nn.Module):
    output_stride = 4

    def __init__(self, num_classes: int = 4, width: int = 16):
        super().__init__()
        self.backbone = nn.ModuleDict({
            "stem": nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.GELU(),
                                  nn.Conv2d(width, width, 3, 2, 1), nn.ReLU()),
            "down": nn.Conv2d(width, width, 3, 2, 1),
            "attn": TalkingHeadAttention(width),
        })
        self.norm = nn.LayerNorm(width)
        self.decode_head = nn.ModuleDict({
            "offset": nn.Conv2d(width, 2, 3, 1, 1),
            "kernel": nn.Conv2d(width, 9, 3, 1, 1),
            "mix": nn.Linear(width, width),
            "cls": nn.Conv2d(width * 2, num_classes, 1),
        })

    def forward(self, x):
        s4 = self.backbone["stem"](x)  # (N,C,H/4,W/4)
        s8 = self.backbone["attn"](self.backbone["down"](s4))  # (N,C,H/8,W/8)
        s8 = self.norm(s8.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        # CARAFE-like: predict a 3x3 kernel per output pixel, softmax over it, reassemble an unfolded neighbourhood
        n, c, h, w = s8.shape
        kern = F.interpolate(self.decode_head["kernel"](s8), scale_factor=2, mode="nearest").softmax(dim=1)
        up = F.unfold(s8, 3, padding=1).view(n, c, 9, h, w)
        up = F.interpolate(up.view(n, c * 9, h, w), scale_factor=2, mode="nearest").view(n, c, 9, 2 * h, 2 * w)
        up = (up * kern.unsqueeze(1)).sum(2)
        # offset learning: grid_sample of the stride-4 features at a learned offset
        off = self.decode_head["offset"](s4).permute(0, 2, 3, 1).tanh() * 0.1
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, s4.shape[2]), torch.linspace(-1, 1, s4.shape[3]),
                                indexing="ij")
        grid = torch.stack((xs, ys), -1).unsqueeze(0).to(s4) + off
        warped = F.grid_sample(s4, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # channel mixing with bmm
        tokens = warped.flatten(2)  # (N,C,HW)
        mix = self.decode_head["mix"].weight.unsqueeze(0).expand(n, -1, -1)
        warped = torch.bmm(mix, tokens).view_as(warped)
        fused = torch.cat((warped, F.interpolate(up, size=s4.shape[-2:], mode="bilinear", align_corners=False)), 1)
        return self.decode_head["cls"](fused)


if TINY not in list_models(TINY):
    @register_model
    def tiny_ops(num_classes: int, **kw) -> nn.Module:
        """Tiny model with talking-head attention, grid_sample, CARAFE-like unfold, LayerNorm, bmm (tests only)."""
        return TinyOps(num_classes, **kw)


def make_checkpoint(path: Path, model_name: str = TINY, input_hw=(64, 64), seed: int = 0) -> Path:
    """Seeded weights for `model_name` (4 classes) saved as a checkpoint folder at `path`."""
    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.models import create_model
    from edgeseg.types import ModelSpec

    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=len(CLASSES)).eval()
    # non-trivial BN statistics so that folding matters
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    spec = ModelSpec(model=model_name, num_classes=len(CLASSES), class_names=CLASSES, palette=PALETTE,
                     ignore_index=255, input_hw=tuple(input_hw))
    return save_checkpoint(path, model, spec, force=True)
