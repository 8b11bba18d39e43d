"""EfficientFormerV2, segmentation variant (the backbone of OffSeg), in plain PyTorch.

Parameter and buffer names follow the official OffSeg code (`efficientformerv2_*_feat`), so an official
checkpoint's `backbone.*` keys load with `strict=True`:

    patch_embed.{0,1,3,4}                    stem: conv-BN-GELU-conv-BN-GELU (stride 4)
    network.0 / .2 / .4 / .6                  the four stages (blocks `FFN` or `AttnFFN`)
    network.1 / .3                            `Embedding` conv-BN downsampling (proj, norm)
    network.5                                 `Embedding` with attention downsampling (attn, conv, bn)

Outputs: four feature maps at strides 4, 8, 16, 32.

Attention (`Attention4D`, `Attention4DDownsample` and their relative-position bias tables, with the export notes):
edgeseg.models.efficientformer_v2_attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from edgeseg.models.efficientformer_v2_attention import Attention4D, Attention4DDownsample

WIDTHS = {
    "S0": (32, 48, 96, 176),
    "S1": (32, 48, 120, 224),
    "S2": (32, 64, 144, 288),
    "L": (40, 80, 192, 384),
}
DEPTHS = {
    "S0": (2, 2, 6, 4),
    "S1": (3, 3, 9, 6),
    "S2": (4, 4, 12, 8),
    "L": (5, 5, 15, 10),
}
# MLP expansion ratio of every block, per stage.
EXPANSIONS = {
    "S0": ((4, 4), (4, 4), (4, 3, 3, 3, 4, 4), (4, 3, 3, 4)),
    "S1": ((4, 4, 4), (4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)),
    "S2": ((4,) * 4, (4,) * 4, (4, 4) + (3,) * 6 + (4,) * 4, (4, 4) + (3,) * 4 + (4, 4)),
    "L": ((4,) * 5, (4,) * 5, (4,) * 4 + (3,) * 7 + (4,) * 4, (4,) * 3 + (3,) * 4 + (4,) * 3),
}
# Attention blocks at the end of stages 3 and 4.
VIT_NUM = {"S0": 2, "S1": 2, "S2": 4, "L": 6}


class Mlp(nn.Module):
    """1x1 conv - BN - act - depthwise 3x3 - BN - act - 1x1 conv - BN."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.mid_norm = nn.BatchNorm2d(hidden)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.norm2 = nn.BatchNorm2d(dim)
        for conv in (self.fc1, self.fc2):
            nn.init.trunc_normal_(conv.weight, std=0.02)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.fc1(x)))
        x = self.act(self.mid_norm(self.mid(x)))
        x = self.drop(x)
        return self.drop(self.norm2(self.fc2(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def _layer_scale(dim: int, init: float) -> nn.Parameter:
    return nn.Parameter(init * torch.ones(dim, 1, 1))


class FFN(nn.Module):
    """Convolutional block: x + ls2 * mlp(x)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, act_layer=nn.GELU, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-5):
        super().__init__()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale_2 = _layer_scale(dim, layer_scale_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.layer_scale_2 * self.mlp(x))


class AttnFFN(nn.Module):
    """Attention block: x + ls1 * attention(x), then x + ls2 * mlp(x)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, act_layer=nn.GELU, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-5, resolution: int = 7,
                 stride: int | None = None, feat_stride: int = 16, attn_cfg: dict | None = None):
        super().__init__()
        self.token_mixer = Attention4D(dim, resolution=resolution, act_layer=act_layer, stride=stride,
                                       feat_stride=feat_stride, **(attn_cfg or {}))
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale_1 = _layer_scale(dim, layer_scale_init_value)
        self.layer_scale_2 = _layer_scale(dim, layer_scale_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1 * self.token_mixer(x))
        return x + self.drop_path(self.layer_scale_2 * self.mlp(x))


class Embedding(nn.Module):
    """Downsampling between stages: conv-BN (`proj`, `norm`), or with `asub` conv-BN plus attention
    downsampling (`conv`, `bn`, `attn`)."""

    def __init__(self, in_chans: int, embed_dim: int, asub: bool = False, resolution: int = 7,
                 act_layer=nn.GELU, feat_stride: int = 16, attn_cfg: dict | None = None):
        super().__init__()
        self.asub = asub
        if asub:
            self.attn = Attention4DDownsample(in_chans, out_dim=embed_dim, resolution=resolution,
                                              act_layer=act_layer, feat_stride=feat_stride, **(attn_cfg or {}))
            self.conv = nn.Conv2d(in_chans, embed_dim, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(embed_dim)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, 3, stride=2, padding=1)
            self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asub:
            return self.attn(x) + self.bn(self.conv(x))
        return self.norm(self.proj(x))


class EfficientFormerV2(nn.Module):
    """EfficientFormerV2 feature extractor (segmentation variant): returns [C1@1/4, C2@1/8, C3@1/16, C4@1/32].

    Args:
        widths, depths, expansions: per-stage channels, block counts and MLP ratios.
        vit_num: attention blocks at the end of stages 3 and 4 (stage 3's use a stride-2 reduction).
        resolution: the input size the bias tables are built for (512 for the official models).
        attn_cfg / down_attn_cfg: overrides for Attention4D / Attention4DDownsample (key_dim, num_heads,
            attn_ratio); the defaults are the official ones, tiny CI variants shrink them.
    """

    out_indices = (0, 2, 4, 6)

    def __init__(self, widths, depths, expansions, vit_num: int = 2, resolution: int = 512,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-5,
                 act_layer=nn.GELU, attn_cfg: dict | None = None, down_attn_cfg: dict | None = None):
        super().__init__()
        widths, depths = list(widths), list(depths)
        self.widths = widths
        self.patch_embed = nn.Sequential(
            nn.Conv2d(3, widths[0] // 2, 3, stride=2, padding=1), nn.BatchNorm2d(widths[0] // 2), act_layer(),
            nn.Conv2d(widths[0] // 2, widths[0], 3, stride=2, padding=1), nn.BatchNorm2d(widths[0]), act_layer(),
        )
        total = sum(depths)
        network = []
        done = 0
        for i, (dim, depth) in enumerate(zip(widths, depths)):
            res = math.ceil(resolution / 2 ** (i + 2))
            feat_stride = 2 ** (i + 2)
            blocks = []
            for j in range(depth):
                dpr = drop_path_rate * (done + j) / max(total - 1, 1)
                ratio = expansions[i][j]
                if i >= 2 and j > depth - 1 - vit_num:
                    blocks.append(AttnFFN(dim, ratio, act_layer, drop_rate, dpr, layer_scale_init_value,
                                          resolution=res, stride=2 if i == 2 else None,
                                          feat_stride=feat_stride, attn_cfg=attn_cfg))
                else:
                    blocks.append(FFN(dim, ratio, act_layer, drop_rate, dpr, layer_scale_init_value))
            done += depth
            network.append(nn.Sequential(*blocks))
            if i < len(widths) - 1:
                network.append(Embedding(dim, widths[i + 1], asub=i >= 2, resolution=res, act_layer=act_layer,
                                         feat_stride=feat_stride, attn_cfg=down_attn_cfg))
        self.network = nn.ModuleList(network)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        feats = []
        for idx, block in enumerate(self.network):
            x = block(x)
            if idx in self.out_indices:
                feats.append(x)
        return feats


def efficientformerv2_feat(variant: str = "S1", **kw) -> EfficientFormerV2:
    """The official `efficientformerv2_<variant>_feat` backbone (S0, S1, S2, L)."""
    drop_path = {"S0": 0.0, "S1": 0.0, "S2": 0.02, "L": 0.1}[variant]
    kw.setdefault("drop_path_rate", drop_path)
    return EfficientFormerV2(WIDTHS[variant], DEPTHS[variant], EXPANSIONS[variant], vit_num=VIT_NUM[variant], **kw)
