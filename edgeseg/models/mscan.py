"""MSCAN (SegNeXt's Multi-Scale Convolutional Attention Network) backbone in plain PyTorch.

Module hierarchy and parameter names follow mmseg's `MSCAN` (mmseg/models/backbones/mscan.py), so official
state dicts (keys under `backbone.`) load with `strict=True`. The computation is kept in NCHW throughout
(the official blocks flatten to tokens and back, which is a pure re-layout); per-stage LayerNorms are
applied over channels, identical to the official token-wise `nn.LayerNorm`.

Must not import export/ or runtime/.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

DEFAULT_KERNELS = (5, (1, 7), (1, 11), (1, 21))
DEFAULT_PADDINGS = (2, (0, 3), (0, 5), (0, 10))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """1x1 conv -> depthwise 3x3 -> GELU -> 1x1 conv (names: fc1, dwconv, fc2)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 drop: float = 0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, 1, 1, bias=True, groups=hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.dwconv(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        return self.drop(x)


class StemConv(nn.Module):
    """Two stride-2 3x3 convs with BN (stage-1 patch embedding; names proj.0, proj.1, proj.3, proj.4)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, out_channels // 2, 3, 2, 1),
            nn.BatchNorm2d(out_channels // 2),
            nn.GELU(),
            nn.Conv2d(out_channels // 2, out_channels, 3, 2, 1),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class OverlapPatchEmbed(nn.Module):
    """Stride-2 3x3 conv + BN (names proj, norm)."""

    def __init__(self, patch_size: int = 3, stride: int = 2, in_channels: int = 3, embed_dim: int = 768):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride, patch_size // 2)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class MSCAAttention(nn.Module):
    """Multi-scale convolutional attention: depthwise 5x5, three strip-conv branches (1xk then kx1),
    sum, 1x1 channel mixing, multiply with the input (names conv0, conv{i}_1, conv{i}_2, conv3)."""

    def __init__(self, channels: int, kernel_sizes=DEFAULT_KERNELS, paddings=DEFAULT_PADDINGS):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, kernel_sizes[0], padding=paddings[0], groups=channels)
        self.num_branches = len(kernel_sizes) - 1
        for i, (k, p) in enumerate(zip(kernel_sizes[1:], paddings[1:])):
            k, p = tuple(k), tuple(p)
            self.add_module(f"conv{i}_1", nn.Conv2d(channels, channels, k, padding=p, groups=channels))
            self.add_module(f"conv{i}_2", nn.Conv2d(channels, channels, k[::-1], padding=p[::-1],
                                                    groups=channels))
        self.conv3 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x
        attn = self.conv0(x)
        acc = attn
        for i in range(self.num_branches):
            b = getattr(self, f"conv{i}_1")(attn)
            acc = acc + getattr(self, f"conv{i}_2")(b)
        attn = self.conv3(acc)
        return attn * u


class MSCASpatialAttention(nn.Module):
    """proj_1 -> GELU -> MSCA -> proj_2, plus the shortcut."""

    def __init__(self, in_channels: int, kernel_sizes=DEFAULT_KERNELS, paddings=DEFAULT_PADDINGS):
        super().__init__()
        self.proj_1 = nn.Conv2d(in_channels, in_channels, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = MSCAAttention(in_channels, kernel_sizes, paddings)
        self.proj_2 = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.proj_1(x)
        x = self.activation(x)
        x = self.spatial_gating_unit(x)
        x = self.proj_2(x)
        return x + shortcut


class MSCABlock(nn.Module):
    """BN -> attention and BN -> MLP residual branches with layer scales (NCHW in, NCHW out)."""

    def __init__(self, channels: int, kernel_sizes=DEFAULT_KERNELS, paddings=DEFAULT_PADDINGS,
                 mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.attn = MSCASpatialAttention(channels, kernel_sizes, paddings)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(channels)
        self.mlp = Mlp(channels, int(channels * mlp_ratio), drop=drop)
        self.layer_scale_1 = nn.Parameter(1e-2 * torch.ones(channels))
        self.layer_scale_2 = nn.Parameter(1e-2 * torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1.view(1, -1, 1, 1) * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale_2.view(1, -1, 1, 1) * self.mlp(self.norm2(x)))
        return x


class MSCAN(nn.Module):
    """SegNeXt backbone; returns the four stage outputs (strides 4, 8, 16, 32) as NCHW tensors."""

    def __init__(self, in_channels: int = 3, embed_dims: Sequence[int] = (64, 128, 256, 512),
                 mlp_ratios: Sequence[float] = (4, 4, 4, 4), drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 depths: Sequence[int] = (3, 4, 6, 3), num_stages: int = 4,
                 attention_kernel_sizes=DEFAULT_KERNELS, attention_kernel_paddings=DEFAULT_PADDINGS):
        super().__init__()
        self.depths = list(depths)
        self.num_stages = num_stages
        self.embed_dims = list(embed_dims)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        cur = 0
        for i in range(num_stages):
            if i == 0:
                patch_embed: nn.Module = StemConv(in_channels, embed_dims[0])
            else:
                patch_embed = OverlapPatchEmbed(3, 2, embed_dims[i - 1], embed_dims[i])
            block = nn.ModuleList([
                MSCABlock(embed_dims[i], attention_kernel_sizes, attention_kernel_paddings, mlp_ratios[i],
                          drop_rate, dpr[cur + j]) for j in range(depths[i])
            ])
            norm = nn.LayerNorm(embed_dims[i])
            cur += depths[i]
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", block)
            setattr(self, f"norm{i + 1}", norm)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(self.num_stages):
            x = getattr(self, f"patch_embed{i + 1}")(x)
            for blk in getattr(self, f"block{i + 1}"):
                x = blk(x)
            x = getattr(self, f"norm{i + 1}")(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


def mscan_t(**kw) -> MSCAN:
    """MSCAN-T as in segnext_mscan-t: dims 32/64/160/256, depths 3/3/5/2, MLP ratios 8/8/4/4."""
    cfg = dict(embed_dims=(32, 64, 160, 256), mlp_ratios=(8, 8, 4, 4), depths=(3, 3, 5, 2), drop_path_rate=0.1)
    cfg.update(kw)
    return MSCAN(**cfg)
