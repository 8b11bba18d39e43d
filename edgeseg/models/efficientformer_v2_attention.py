"""EfficientFormerV2's attention modules (edgeseg.models.efficientformer_v2 builds the network from them):
`Attention4D` (stages 3 and 4), `Attention4DDownsample` (the stage-4 embedding) and their relative-position bias
tables. Parameter and buffer names follow the official OffSeg code, so official checkpoints load strictly.

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


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups), nn.BatchNorm2d(cout))


def _resize_bias(table: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """(heads, Nq0, Nk0) -> (1, heads, nq, nk), bicubic on the matrix as an image (align_corners=False)."""
    table = table.unsqueeze(0)
    if table.shape[-2:] == (nq, nk):  # bicubic at scale 1 is the identity
        return table
    return F.interpolate(table, size=(nq, nk), mode="bicubic", align_corners=False)


class _BiasTableMixin:
    """What both attentions share: head sizes, and the relative-position bias table (expand, resize, bake for
    export)."""

    def _init_heads(self, key_dim: int, num_heads: int, attn_ratio: float, feat_stride: int) -> None:
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim ** -0.5
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.feat_stride = feat_stride

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
        self._init_heads(key_dim, num_heads, attn_ratio, feat_stride)
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
        self._init_heads(key_dim, num_heads, attn_ratio, feat_stride)
        self.out_dim = out_dim if out_dim is not None else dim
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
