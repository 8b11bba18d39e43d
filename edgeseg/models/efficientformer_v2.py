"""EfficientFormerV2, segmentation variant (the backbone of OffSeg), in plain PyTorch.

Parameter and buffer names follow the official OffSeg code (`efficientformerv2_*_feat`), so an official
checkpoint's `backbone.*` keys load with `strict=True`:

    patch_embed.{0,1,3,4}                    stem: conv-BN-GELU-conv-BN-GELU (stride 4)
    network.0 / .2 / .4 / .6                  the four stages (blocks `FFN` or `AttnFFN`)
    network.1 / .3                            `Embedding` conv-BN downsampling (proj, norm)
    network.5                                 `Embedding` with attention downsampling (attn, conv, bn)

Outputs: four feature maps at strides 4, 8, 16, 32.

Attention biases: each attention module owns `attention_biases_seg` (heads, #offsets), a table of relative
position biases built for a 512x512 input (`resolution`). The table is expanded with the index buffer
`attention_bias_idxs_seg` to a (heads, Nq0, Nk0) matrix and that *matrix* is resized bicubically to the
actual (Nq, Nk) token counts, as the official code does, so any input size works (H != W included).
The official code caches the expanded table on `.eval()`; here nothing is cached that a later
`load_state_dict` could leave stale: eager inference (eval, no grad) reuses the resized table only while
the parameter's version counter is unchanged (training, autograd and tracing always recompute it), and
`prepare_for_export(input_hw)` bakes the resized table for one static size into a non-persistent buffer
(not in the state dict, so strict loading is unaffected) so that no bicubic interpolation reaches an
exported graph.

Note for exporters: `Attention4D.forward` runs conv(talking_head1) -> softmax(dim=-1) -> conv(talking_head2)
on the 4-D attention tensor (B, heads, Nq, Nk); the softmax is over the keys axis (last), not channels.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups), nn.BatchNorm2d(cout))


def _resize_bias(table: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """(heads, Nq0, Nk0) -> (1, heads, nq, nk), bicubic on the matrix as an image (align_corners=False)."""
    table = table.unsqueeze(0)
    if table.shape[-2:] == (nq, nk):  # bicubic at scale 1 is the identity
        return table
    return F.interpolate(table, size=(nq, nk), mode="bicubic", align_corners=False)


class _BiasTableMixin:
    """Shared handling of the relative-position bias table (expand, resize, bake for export)."""

    def _init_bias_tables(self, heads: int, offsets: dict, idxs: list, nq: int, nk: int,
                          legacy_table: tuple[int, int], legacy_idx: tuple[int, int]) -> None:
        # Unused ImageNet-resolution tables: kept because official checkpoints carry them.
        self.register_buffer("attention_biases", torch.zeros(heads, legacy_table[1]))
        self.register_buffer("attention_bias_idxs", torch.ones(*legacy_idx, dtype=torch.long))
        self.attention_biases_seg = nn.Parameter(torch.zeros(heads, len(offsets)))
        self.register_buffer("attention_bias_idxs_seg", torch.tensor(idxs, dtype=torch.long).view(nq, nk))
        # Filled by prepare_for_export; non-persistent, so never part of the state dict.
        self.register_buffer("_baked_bias", None, persistent=False)

    def attention_bias(self, nq: int, nk: int) -> torch.Tensor:
        """The bias added to the (B, heads, nq, nk) attention logits, shape (1, heads, nq, nk)."""
        baked = self._baked_bias
        if baked is not None and not self.training and tuple(baked.shape[-2:]) == (nq, nk):
            return baked
        table = self.attention_biases_seg
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return _resize_bias(table[:, self.attention_bias_idxs_seg], nq, nk)
        # Eager inference: reuse the last resized table while the parameter is unchanged (any in-place
        # update, load_state_dict included, bumps its version counter).
        key = (nq, nk, table._version, table.data_ptr(), table.device, table.dtype)
        cached = self.__dict__.get("_bias_cache")
        if cached is None or cached[0] != key:
            cached = (key, _resize_bias(table[:, self.attention_bias_idxs_seg], nq, nk))
            self.__dict__["_bias_cache"] = cached
        return cached[1]

    def _token_counts(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        raise NotImplementedError

    def prepare_for_export(self, input_hw: tuple[int, int]) -> None:
        """Bake the resized bias table for a static input (H, W) as a plain, non-persistent buffer."""
        nq, nk = self._token_counts(input_hw)
        with torch.no_grad():
            table = _resize_bias(self.attention_biases_seg[:, self.attention_bias_idxs_seg], nq, nk)
        # A fresh tensor, detached from the parameter; not saved in the state dict.
        self._baked_bias = table.detach().clone()

    def _load_from_state_dict(self, *args, **kwargs):
        # Loading new weights invalidates any baked or cached table.
        self._baked_bias = None
        self.__dict__.pop("_bias_cache", None)
        super()._load_from_state_dict(*args, **kwargs)


class Attention4D(_BiasTableMixin, nn.Module):
    """Multi-head self-attention on a 4-D map with talking heads, local value conv and biases.

    With `stride=2` (stage 3) the map is first reduced by a depthwise stride conv and the output is
    upsampled bilinearly back. `feat_stride` is the stride of this module's input w.r.t. the image
    (used only by `prepare_for_export`).
    """

    def __init__(self, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4,
                 resolution: int = 7, act_layer=nn.GELU, stride: int | None = None, feat_stride: int = 16):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim ** -0.5
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.feat_stride = feat_stride
        self.attn_stride = stride or 1
        if stride is not None:
            self.resolution = math.ceil(resolution / stride)
            self.stride_conv = _conv_bn(dim, dim, 3, stride=stride, groups=dim)
        else:
            self.resolution = resolution
            self.stride_conv = None
        qk = key_dim * num_heads
        self.q = _conv_bn(dim, qk)
        self.k = _conv_bn(dim, qk)
        self.v = _conv_bn(dim, self.dh)
        self.v_local = _conv_bn(self.dh, self.dh, 3, groups=self.dh)
        self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1)
        self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1)
        self.proj = nn.Sequential(act_layer(), nn.Conv2d(self.dh, dim, 1), nn.BatchNorm2d(dim))

        # Relative offsets (|dy|, |dx|) between every pair of tokens of the res x res grid, numbered in
        # order of first appearance (the official numbering: checkpoints index into it).
        grid = list(itertools.product(range(self.resolution), repeat=2))
        offsets: dict = {}
        idxs = []
        for qy, qx in grid:
            for ky, kx in grid:
                idxs.append(offsets.setdefault((abs(qy - ky), abs(qx - kx)), len(offsets)))
        n = len(grid)
        self._init_bias_tables(num_heads, offsets, idxs, n, n, (num_heads, 49), (49, 49))

    def _token_counts(self, input_hw):
        h = math.ceil(input_hw[0] / self.feat_stride / self.attn_stride)
        w = math.ceil(input_hw[1] / self.feat_stride / self.attn_stride)
        return h * w, h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        b, _, h, w = x.shape
        n = h * w
        heads = self.num_heads
        # heads folded into the batch: 3-D bmm (what a 4-D matmul computes, without the expand ops it adds to
        # exported graphs, which XNNPACK does not delegate)
        q = self.q(x).reshape(b * heads, self.key_dim, n).transpose(1, 2)  # B*h, N, kd
        k = self.k(x).reshape(b * heads, self.key_dim, n)  # B*h, kd, N
        v_map = self.v(x)
        v_loc = self.v_local(v_map)
        v = v_map.reshape(b * heads, self.d, n).transpose(1, 2)  # B*h, N, d

        attn = torch.bmm(q, k).reshape(b, heads, n, n) * self.scale + self.attention_bias(n, n)
        attn = self.talking_head1(attn)
        attn = attn.softmax(dim=-1)
        attn = self.talking_head2(attn)

        out = torch.bmm(attn.reshape(b * heads, n, n), v)  # B*h, N, d
        out = out.reshape(b, heads, n, self.d).transpose(2, 3).reshape(b, self.dh, h, w) + v_loc
        if self.stride_conv is not None:
            out = F.interpolate(out, scale_factor=float(self.attn_stride), mode="bilinear", align_corners=False)
        return self.proj(out)


class LGQuery(nn.Module):
    """Local-global query for attention downsampling: strided depthwise conv + strided sampling, then 1x1."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.pool = nn.AvgPool2d(1, 2, 0)  # kernel 1, stride 2: takes every other pixel
        self.local = nn.Sequential(nn.Conv2d(in_dim, in_dim, 3, stride=2, padding=1, groups=in_dim))
        self.proj = _conv_bn(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.local(x) + self.pool(x))


class Attention4DDownsample(_BiasTableMixin, nn.Module):
    """Attention that halves the resolution: queries at stride 2 attend to all input tokens."""

    def __init__(self, dim: int, key_dim: int = 16, num_heads: int = 8, attn_ratio: float = 4,
                 resolution: int = 7, out_dim: int | None = None, act_layer=nn.GELU, feat_stride: int = 16):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim ** -0.5
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.out_dim = out_dim if out_dim is not None else dim
        self.feat_stride = feat_stride
        self.resolution = resolution
        self.resolution2 = math.ceil(resolution / 2)
        qk = key_dim * num_heads
        self.q = LGQuery(dim, qk)
        self.k = _conv_bn(dim, qk)
        self.v = _conv_bn(dim, self.dh)
        self.v_local = _conv_bn(self.dh, self.dh, 3, stride=2, groups=self.dh)
        self.proj = nn.Sequential(act_layer(), nn.Conv2d(self.dh, self.out_dim, 1), nn.BatchNorm2d(self.out_dim))

        step = math.ceil(self.resolution / self.resolution2)
        full = list(itertools.product(range(self.resolution), repeat=2))
        half = list(itertools.product(range(self.resolution2), repeat=2))
        offsets: dict = {}
        idxs = []
        for qy, qx in half:
            for ky, kx in full:
                # floats as in the official table (its keys are (float, float))
                key = (abs(qy * step - ky + 0.0), abs(qx * step - kx + 0.0))
                idxs.append(offsets.setdefault(key, len(offsets)))
        self._init_bias_tables(num_heads, offsets, idxs, len(half), len(full), (num_heads, 196), (49, 196))

    def _token_counts(self, input_hw):
        h = math.ceil(input_hw[0] / self.feat_stride)
        w = math.ceil(input_hw[1] / self.feat_stride)
        return math.ceil(h / 2) * math.ceil(w / 2), h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        heads = self.num_heads
        q_map = self.q(x)
        h2, w2 = q_map.shape[-2:]
        n2 = h2 * w2
        q = q_map.reshape(b * heads, self.key_dim, n2).transpose(1, 2)  # B*h, N2, kd
        k = self.k(x).reshape(b * heads, self.key_dim, n)
        v_map = self.v(x)
        v_loc = self.v_local(v_map)
        v = v_map.reshape(b * heads, self.d, n).transpose(1, 2)  # B*h, N, d

        attn = torch.bmm(q, k).reshape(b, heads, n2, n) * self.scale + self.attention_bias(n2, n)
        attn = attn.softmax(dim=-1)
        out = torch.bmm(attn.reshape(b * heads, n2, n), v)  # B*h, N2, d
        out = out.reshape(b, heads, n2, self.d).transpose(2, 3).reshape(b, self.dh, h2, w2) + v_loc
        return self.proj(out)


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
