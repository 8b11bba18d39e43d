"""FreqFusion (TPAMI 2024) as OffSeg uses it, in plain PyTorch (no mmcv).

Settings fixed to OffSeg's: scale 2 fusion via CARAFE, adaptive low-pass (5x5) and high-pass (3x3) kernels
with the "semi-conv" + "compressed feature upsample" path, `hr_residual=True`, `feature_resample=True`
(the local-similarity guided sampler, `direction_feat='sim'`, 4 groups), `hamming_window=False` (the
`hamming_*` buffers still exist, holding 1.0, because official checkpoints carry them).
Parameter names match the official module, so `decode_head.freqfusions.*` keys load strictly.

CARAFE and the local similarity, in their training and export forms, are in `edgeseg.models.carafe`. Export form
(`FreqFusion.prepare_for_export`): `carafe_export` / `local_cosine_similarity_export` for traced graphs, and the
sampler's pixel-centre grid as a constant buffer for the static size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeseg.models.carafe import (CARAFE_FORMS, carafe, carafe_export,  # noqa: F401  (re-exported)
                                   carafe_export_channels_last, carafe_export_gather, gather_index, carafe_reference, group_norm_export, local_cosine_similarity, local_cosine_similarity_export,
                                   neighbour_kernel, tracing, unfold_kernel)

SAMPLER_FORMS = ("grid_sample", "gather")  # export forms of the dysampler's resampling; a target's profile picks one


def grid_sample_gather(src: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """`F.grid_sample(src, grid, "bilinear", "border", align_corners=False)` as row gathers (export form).

    src: (N, C, H, W); grid: (N, Ho, Wo, 2) normalised (x, y). Every output pixel reads its four neighbours as
    rows of a channels-last (N*H*W, C) table (`embedding`: one row copy each) and blends them with PyTorch's
    weights in PyTorch's order, so it equals grid_sample to float rounding. For runtimes without a fast grid
    sample: ExecuTorch runs grid_sample on a one-thread portable kernel (XNNPACK has none), while the row copy,
    the transposes and the blend are cheap (the blend and transposes run on XNNPACK).
    """
    n, c, h, w = src.shape
    ho, wo = grid.shape[1], grid.shape[2]
    # unnormalise (align_corners=False), then border padding clamps the source coordinate into the image
    ix = (((grid[..., 0] + 1) * w - 1) / 2).clamp(0, w - 1)
    iy = (((grid[..., 1] + 1) * h - 1) / 2).clamp(0, h - 1)
    x0, y0 = ix.floor(), iy.floor()
    x1, y1 = x0 + 1, y0 + 1
    # weights as PyTorch's kernel computes them (north-west = (x1 - ix) * (y1 - iy), ...)
    weights = ((x1 - ix) * (y1 - iy), (ix - x0) * (y1 - iy), (x1 - ix) * (iy - y0), (ix - x0) * (iy - y0))
    # a neighbour past the last row/column has weight 0 (ix == w - 1 exactly): read the last one instead
    x1, y1 = x1.clamp(max=w - 1), y1.clamp(max=h - 1)
    # integer index arithmetic on int64 tensors, not Python ints: PT2E's prepare turns scalar operands into float
    # constants, which would make the index arithmetic float and quantizable
    base = torch.arange(0, n * h * w, h * w, device=src.device).view(n, 1, 1)
    width = torch.tensor(w, dtype=torch.int64, device=src.device)
    table = src.permute(0, 2, 3, 1).reshape(n * h * w, c)
    x0i, y0i, x1i, y1i = (t.to(torch.int64) for t in (x0, y0, x1, y1))
    out = None
    for (yy, xx), wt in zip(((y0i, x0i), (y0i, x1i), (y1i, x0i), (y1i, x1i)), weights):
        rows = F.embedding((base + yy * width + xx).reshape(-1), table)  # (N*Ho*Wo, C)
        term = rows * wt.reshape(-1, 1)
        out = term if out is None else out + term
    return out.view(n, ho, wo, c).permute(0, 3, 1, 2)


class BilinearGather(nn.Module):
    """`grid_sample_gather` as a (parameterless) module, so that int8 exports can keep it float by class
    (edgeseg.quant.policy): quantizing its coordinate and weight arithmetic moves the sampling positions."""

    def forward(self, src: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return grid_sample_gather(src, grid)


class LocalSimGuidedSampler(nn.Module):
    """FreqFusion's offset generator ('lp' style, scale 2, `direction_feat='sim'`, direct scale on).

    Predicts, for every output pixel of the x2 map, a sampling offset per channel group from local cosine
    similarities of the compressed high-res and low-res features, then resamples the already upsampled
    low-res features with `grid_sample` (bilinear, border padding, align_corners=False).
    """

    def __init__(self, in_channels: int, scale: int = 2, groups: int = 4, kernel_size: int = 3,
                 local_window: int = 3, norm: bool = True):
        super().__init__()
        if scale != 2:
            raise ValueError("LocalSimGuidedSampler: only scale 2 is supported")
        if in_channels % groups:
            raise ValueError(f"LocalSimGuidedSampler: {in_channels} channels not divisible by {groups} groups")
        self.scale = scale
        self.groups = groups
        self.local_window = local_window
        sim_ch = local_window ** 2 - 1
        pad = kernel_size // 2
        lr_out = 2 * groups * scale ** 2
        hr_out = 2 * groups
        self.offset = nn.Conv2d(sim_ch, lr_out, kernel_size, padding=pad)
        self.direct_scale = nn.Conv2d(in_channels, lr_out, kernel_size, padding=pad)
        self.hr_offset = nn.Conv2d(sim_ch, hr_out, kernel_size, padding=pad)
        self.hr_direct_scale = nn.Conv2d(in_channels, hr_out, kernel_size, padding=pad)
        for conv in (self.offset, self.hr_offset):
            nn.init.normal_(conv.weight, 0.0, 0.001)
            nn.init.zeros_(conv.bias)
        for conv in (self.direct_scale, self.hr_direct_scale):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        if norm:
            self.norm_hr = nn.GroupNorm(in_channels // 8, in_channels)
            self.norm_lr = nn.GroupNorm(in_channels // 8, in_channels)
        else:
            self.norm_hr = nn.Identity()
            self.norm_lr = nn.Identity()
        self.register_buffer("init_pos", self._initial_positions())
        self._centre_grids: dict[tuple[int, int], str] = {}  # (h, w) -> buffer name, set by bake_centre_grids
        self.sampler_form = "grid_sample"  # export form of the resampling (SAMPLER_FORMS), set_sampler_form

    def set_sampler_form(self, form: str) -> None:
        """Export form of the resampling (SAMPLER_FORMS); "gather" adds a `BilinearGather` child (no state)."""
        if form not in SAMPLER_FORMS:
            raise ValueError(f"sampler form {form!r} is not one of {', '.join(SAMPLER_FORMS)}")
        self.sampler_form = form
        if form == "gather":
            self.bilinear_gather = BilinearGather()
        elif hasattr(self, "bilinear_gather"):
            del self.bilinear_gather

    def bake_centre_grids(self, sizes) -> None:
        """Bake the normalised pixel-centre grid of each low-res size in `sizes` ((h, w) pairs) as a constant
        (non-persistent) buffer, so the exported graph holds no arange/broadcast chain for it. Called by
        `FreqFusion.prepare_for_export` (not named prepare_for_export: it takes the low-res sizes)."""
        dev = self.init_pos.device
        self.register_buffer("neighbour_kernel", neighbour_kernel(self.local_window).to(dev), persistent=False)
        channels = self.direct_scale.in_channels
        self.register_buffer("channel_ones", torch.ones(1, channels, 1, 1, device=dev), persistent=False)
        for h, w in sizes:
            name = f"centre_grid_{h}x{w}"
            dev = self.init_pos.device
            self.register_buffer(name, self._centre_grid(h, w, dev), persistent=False)
            self.register_buffer(name + "_unit", torch.tensor([2.0 / w, 2.0 / h], device=dev).view(1, 2, 1, 1, 1),
                                 persistent=False)
            self._centre_grids[(h, w)] = name

    @staticmethod
    def _centre_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
        # (1, 2, 1, h, w): 2 * (centre) / size - 1 for x (row 0) and y (row 1)
        cx = (torch.arange(w, dtype=dtype, device=device) + 0.5).view(1, w).expand(h, w)
        cy = (torch.arange(h, dtype=dtype, device=device) + 0.5).view(h, 1).expand(h, w)
        return torch.stack([2 * cx / w - 1, 2 * cy / h - 1]).reshape(1, 2, 1, h, w)

    def _initial_positions(self) -> torch.Tensor:
        # Sub-pixel centres of the s x s children of a low-res pixel, in low-res pixel units:
        # channel layout (coord: x then y) * 4G + g * s*s + (i*s + j); x depends on j, y on i.
        s = self.scale
        centres = (torch.arange(s, dtype=torch.float32) - (s - 1) / 2) / s
        xs = centres.view(1, s).expand(s, s).reshape(-1)  # over (i, j): centres[j]
        ys = centres.view(s, 1).expand(s, s).reshape(-1)  # centres[i]
        pos = torch.stack([xs.repeat(self.groups), ys.repeat(self.groups)])
        return pos.reshape(1, -1, 1, 1)

    def forward(self, hr_x: torch.Tensor, lr_x: torch.Tensor, feat2sample: torch.Tensor) -> torch.Tensor:
        if self._centre_grids and tracing():  # export form: GroupNorm from 4-D means XNNPACK delegates
            hr_x = group_norm_export(hr_x, self.norm_hr)
            lr_x = group_norm_export(lr_x, self.norm_lr)
        else:
            hr_x = self.norm_hr(hr_x)
            lr_x = self.norm_lr(lr_x)
        if self._centre_grids and tracing():  # export form (FreqFusion.prepare_for_export)
            hr_sim = local_cosine_similarity_export(hr_x, self.local_window, 2, self.neighbour_kernel, self.channel_ones)
            lr_sim = local_cosine_similarity_export(lr_x, self.local_window, 2, self.neighbour_kernel, self.channel_ones)
        else:
            hr_sim = local_cosine_similarity(hr_x, self.local_window, dilation=2)
            lr_sim = local_cosine_similarity(lr_x, self.local_window, dilation=2)
        s = self.scale
        offset = self.offset(lr_sim) + F.pixel_unshuffle(self.hr_offset(hr_sim), s)
        gate = self.direct_scale(lr_x) + F.pixel_unshuffle(self.hr_direct_scale(hr_x), s)
        offset = offset * gate.sigmoid() + self.init_pos
        return self.sample(feat2sample, offset)

    def sample(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Resample x (N, C, sH, sW) at low-res pixel centres + offset (N, 2*G*s*s, H, W)."""
        n, _, h, w = offset.shape
        s, g = self.scale, self.groups
        off = offset.view(n, 2, g * s * s, h, w)
        name = self._centre_grids.get((int(h), int(w))) if tracing() else None
        if name is not None:  # export form: constant grid, 2 * (centre + off) / size - 1 as one multiply-add
            grid, unit = getattr(self, name), getattr(self, name + "_unit")
            coords = (off * unit + grid).view(n, 2 * g * s * s, h, w)
        else:
            # Pixel centres of the low-res grid (x, y), then normalise to [-1, 1] by the low-res size.
            cx = (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5).view(1, 1, 1, 1, w)
            cy = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5).view(1, 1, 1, h, 1)
            gx = 2 * (cx + off[:, 0:1]) / w - 1
            gy = 2 * (cy + off[:, 1:2]) / h - 1
            coords = torch.cat([gx, gy], dim=1).view(n, 2 * g * s * s, h, w)
        # Sub-pixel channels -> spatial positions of the x s map: (N, 2*G, sH, sW).
        coords = F.pixel_shuffle(coords, s).view(n, 2, g, s * h, s * w)
        grid = coords.permute(0, 2, 3, 4, 1).reshape(n * g, s * h, s * w, 2)
        src = x.reshape(n * g, -1, x.shape[-2], x.shape[-1])
        if name is not None and self.sampler_form == "gather":
            out = self.bilinear_gather(src, grid)
        else:
            out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.reshape(n, -1, s * h, s * w)


class FreqFusion(nn.Module):
    """Frequency-aware fusion of a high-res feature (hr, stride s) with a low-res one (lr, stride 2s).

    forward(hr_feat, lr_feat) -> (mask_lr, hr_out, lr_out): hr_out keeps hr's channels (high-pass residual
    enhanced), lr_out has lr's channels at hr's resolution (adaptive low-pass CARAFE x2 then offset
    resampling). mask_lr is the raw low-pass kernel logits (N, 25, sH, sW), as the official returns it.
    """

    def __init__(self, hr_channels: int, lr_channels: int, compressed_channels: int = 64,
                 lowpass_kernel: int = 5, highpass_kernel: int = 3, encoder_kernel: int = 3,
                 feature_resample_group: int = 4, feature_resample_norm: bool = True):
        super().__init__()
        self.lowpass_kernel = lowpass_kernel
        self.highpass_kernel = highpass_kernel
        self.compressed_channels = compressed_channels
        pad = encoder_kernel // 2
        self.hr_channel_compressor = nn.Conv2d(hr_channels, compressed_channels, 1)
        self.lr_channel_compressor = nn.Conv2d(lr_channels, compressed_channels, 1)
        self.content_encoder = nn.Conv2d(compressed_channels, lowpass_kernel ** 2, encoder_kernel, padding=pad)
        self.dysampler = LocalSimGuidedSampler(compressed_channels, scale=2, groups=feature_resample_group,
                                               kernel_size=encoder_kernel, norm=feature_resample_norm)
        self.content_encoder2 = nn.Conv2d(compressed_channels, highpass_kernel ** 2, encoder_kernel, padding=pad)
        # hamming_window=False: unit windows (kept for checkpoint compatibility).
        self.register_buffer("hamming_lowpass", torch.ones(1))
        self.register_buffer("hamming_highpass", torch.ones(1))
        self.export_form = False  # set by prepare_for_export: few-node CARAFE (carafe_export)
        self.carafe_form = "conv_bmm"  # which export form of CARAFE (prepare_for_export's `carafe`)
        self.unit_windows = False  # set by prepare_for_export: both hamming windows hold only 1.0
        for m in (self.hr_channel_compressor, self.lr_channel_compressor):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        for m in (self.content_encoder, self.content_encoder2):
            nn.init.normal_(m.weight, 0.0, 0.001)
            nn.init.zeros_(m.bias)

    def prepare_for_export(self, input_hw, carafe: str = "conv_bmm", sampler: str = "grid_sample") -> None:
        """Switch to the export form for traced graphs (torch.export / dynamo / jit trace): CARAFE as
        conv-im2col + matmul (`carafe_export`, ~10 nodes a call instead of ~100) with constant one-hot unfold
        kernels, the local similarity the same way, and the sampler's centre grid as a constant for every low-res
        size this stage can see at `input_hw` (strides 2..64). Eager calls keep the training form, so eager
        outputs are bit-identical after this call; the traced forms agree to float rounding (tested). `carafe`
        picks CARAFE's export form (CARAFE_FORMS: "conv_bmm", or "channels_last", which is faster on OpenVINO);
        `sampler` the dysampler's (SAMPLER_FORMS: "grid_sample", or "gather", which is faster on ExecuTorch)."""
        if carafe not in CARAFE_FORMS:
            raise ValueError(f"carafe form {carafe!r} is not one of {', '.join(CARAFE_FORMS)}")
        self.dysampler.set_sampler_form(sampler)
        self.carafe_form = carafe
        h, w = int(input_hw[0]), int(input_hw[1])
        dev = self.hamming_lowpass.device
        for k in {self.lowpass_kernel, self.highpass_kernel}:
            self.register_buffer(f"unfold_kernel_{k}", unfold_kernel(k).to(dev), persistent=False)
        sizes = [(h >> i, w >> i) for i in range(1, 7) if h % (1 << i) == 0 and w % (1 << i) == 0]
        self.dysampler.bake_centre_grids(sizes)
        if carafe == "gather":  # the im2col row indices of every size this stage can see, as constants
            for sh, sw in sizes:
                for k in {self.lowpass_kernel, self.highpass_kernel}:
                    self.register_buffer(f"gather_index_{sh}x{sw}_{k}", gather_index(sh, sw, k).to(dev),
                                         persistent=False)
        self.unit_windows = bool((self.hamming_lowpass == 1).all() and (self.hamming_highpass == 1).all())
        self.export_form = True

    def _normalize(self, logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        if self.export_form and self.unit_windows and tracing():
            # softmax over the taps as a last-axis softmax (XNNPACK's softmax reduces the innermost axis only);
            # unit windows: the multiply + renormalise of `normalize_kernel` is the identity (up to rounding)
            return logits.permute(0, 2, 3, 1).softmax(dim=-1).permute(0, 3, 1, 2)
        return self.normalize_kernel(logits, window)

    def _carafe(self, x: torch.Tensor, mask: torch.Tensor, kernel: int, scale: int = 1) -> torch.Tensor:
        if self.export_form and tracing():
            if self.carafe_form == "channels_last":
                return carafe_export_channels_last(x, mask, kernel, scale)
            if self.carafe_form == "gather":
                index = getattr(self, f"gather_index_{x.shape[-2]}x{x.shape[-1]}_{kernel}", None)
                return carafe_export_gather(x, mask, kernel, scale, index)
            return carafe_export(x, mask, kernel, scale, getattr(self, f"unfold_kernel_{kernel}"))
        return carafe(x, mask, kernel, scale)

    @staticmethod
    def normalize_kernel(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Softmax over the k*k taps (channel axis), times the window, renormalised to sum 1."""
        kk = logits.shape[1]
        weights = logits.softmax(dim=1)
        if window.numel() == kk:
            weights = weights * window.reshape(1, kk, 1, 1)
        else:
            weights = weights * window.reshape(1, 1, 1, 1)
        return weights / weights.sum(dim=1, keepdim=True)

    def forward(self, hr_feat: torch.Tensor, lr_feat: torch.Tensor):
        hp, lp = self.highpass_kernel, self.lowpass_kernel
        comp_hr = self.hr_channel_compressor(hr_feat)
        comp_lr = self.lr_channel_compressor(lr_feat)

        # High-pass enhance the compressed hr feature with its own AHPF kernels.
        mask_hr_hr = self.content_encoder2(comp_hr)
        kern = self._normalize(mask_hr_hr, self.hamming_highpass)
        comp_hr = comp_hr + comp_hr - self._carafe(comp_hr, kern, hp, 1)

        # Low-pass kernel logits: hr part + lr part upsampled by CARAFE with the hr-guided kernels.
        mask_lr_hr = self.content_encoder(comp_hr)
        kern = self._normalize(mask_lr_hr, self.hamming_lowpass)
        mask_lr = mask_lr_hr + self._fit(self._carafe(self.content_encoder(comp_lr), kern, lp, 2), comp_hr)
        lowpass = self._normalize(mask_lr, self.hamming_lowpass)

        # High-pass kernel logits: hr part + lr part upsampled with the final low-pass kernels.
        mask_hr = mask_hr_hr + self._fit(self._carafe(self.content_encoder2(comp_lr), lowpass, lp, 2), comp_hr)
        highpass = self._normalize(mask_hr, self.hamming_highpass)

        lr_up = self._carafe(lr_feat, lowpass, lp, 2)
        hr_out = hr_feat - self._carafe(hr_feat, highpass, hp, 1) + hr_feat
        lr_out = self.dysampler(hr_x=comp_hr, lr_x=comp_lr, feat2sample=lr_up)
        return mask_lr, hr_out, lr_out

    @staticmethod
    def _fit(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # Nearest resize to `like`'s size; a no-op (and absent from the graph) when sizes already agree.
        if x.shape[-2:] == like.shape[-2:]:
            return x
        return F.interpolate(x, size=like.shape[-2:], mode="nearest")
