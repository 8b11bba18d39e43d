"""The sampling operators of FreqFusion, in plain PyTorch (no mmcv): CARAFE (content-aware reassembly) and the
local cosine similarity of the offset sampler, each in a training form and an export form with few nodes.

CARAFE (`carafe`) follows mmcv's semantics: output pixel (oy, ox) at scale s reads the k x k neighbourhood of
source pixel (oy // s, ox // s), taps outside the image contribute nothing (zero padding), and the mask's
k*k channels are ordered (ky, kx). It is built from ops every export target has: nearest upsampling, zero
padding, slicing, multiply and add.

Export form: the k*k-tap loop becomes ~25 slice/mul/add nodes per call once traced (about 1,600 of test_offseg's
1,900 graph nodes, 34 XNNPACK partitions). `carafe_export` computes the same sum with a handful of nodes: im2col as
a convolution with a constant one-hot kernel, then one batched matmul per pixel against the pixel-unshuffled mask,
then pixel_shuffle.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def tracing() -> bool:
    """True while torch.export / torch.compile / torch.jit.trace records a graph."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def carafe(x: torch.Tensor, mask: torch.Tensor, kernel: int, scale: int = 1) -> torch.Tensor:
    """Content-aware reassembly (CARAFE, one group).

    x: (N, C, H, W); mask: (N, kernel*kernel, s*H, s*W), normalised reassembly weights, channel ky*kernel+kx.
    Returns (N, C, s*H, s*W): out[n, c, oy, ox] = sum_{ky,kx} mask[n, ky*k+kx, oy, ox] *
    x[n, c, oy//s + ky - k//2, ox//s + kx - k//2] (zero outside the image).

    Formulation (no (C*k*k)-fold unfolded tensor is ever built):
    - for scale s, x[oy//s + d] == up(x)[oy + s*d] with up = nearest upsampling by s (the zero border too),
      so CARAFE xs is a dilation-s CARAFE x1 on the (zero-padded, then) upsampled map;
    - the padded map is flattened per channel with row pitch P = sW + 2*s*(k//2); the tap (ky, kx) is then
      the contiguous 1-D slice starting at s*(ky*P + kx), and the output is computed on the P-wide grid and
      cropped (the extra columns are never read back). One zero row more at the bottom keeps the last
      slices in range.
    - k*k multiply-adds; in eager they accumulate in place (in inference also channel-chunked to stay in
      cache); while tracing/exporting they are plain mul + add nodes (same summation order, same values).
    """
    n, c, h, w = x.shape
    half = kernel // 2
    xp = F.pad(x, (half, half, half, half + 1))
    if scale != 1:
        xp = F.interpolate(xp, scale_factor=float(scale), mode="nearest")
    out_h, out_w = h * scale, w * scale
    pitch = out_w + 2 * half * scale
    length = out_h * pitch
    flat_x = xp.reshape(n, c, -1)
    flat_m = F.pad(mask, (0, pitch - out_w)).reshape(n, kernel * kernel, length)
    offsets = [scale * (ky * pitch + kx) for ky in range(kernel) for kx in range(kernel)]

    if torch.compiler.is_compiling():  # export/compile: plain mul + add nodes
        acc = flat_x[:, :, offsets[0]:offsets[0] + length] * flat_m[:, 0:1]
        for tap in range(1, kernel * kernel):
            o = offsets[tap]
            acc = acc + flat_x[:, :, o:o + length] * flat_m[:, tap:tap + 1]
    elif torch.is_grad_enabled() and (x.requires_grad or mask.requires_grad):
        # training: in-place accumulation is differentiable and avoids k*k temporaries
        acc = flat_x[:, :, offsets[0]:offsets[0] + length] * flat_m[:, 0:1]
        for tap in range(1, kernel * kernel):
            o = offsets[tap]
            acc = acc.addcmul_(flat_x[:, :, o:o + length], flat_m[:, tap:tap + 1])
    else:
        acc = x.new_empty(n, c, length)
        step = max(8, (1 << 18) // max(length, 1))  # ~1 MiB of output per chunk
        for c0 in range(0, c, step):
            src = flat_x[:, c0:c0 + step]
            dst = acc[:, c0:c0 + step]
            torch.mul(src[:, :, offsets[0]:offsets[0] + length], flat_m[:, 0:1], out=dst)
            for tap in range(1, kernel * kernel):
                o = offsets[tap]
                dst.addcmul_(src[:, :, o:o + length], flat_m[:, tap:tap + 1])
    return acc.view(n, c, out_h, pitch)[:, :, :, :out_w]


def carafe_reference(x: torch.Tensor, mask: torch.Tensor, kernel: int, scale: int = 1) -> torch.Tensor:
    """Slow, direct loop over output pixels (mmcv's definition); for tests only."""
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, h * scale, w * scale)
    half = kernel // 2
    for oy in range(h * scale):
        for ox in range(w * scale):
            sy, sx = oy // scale, ox // scale
            for ky in range(kernel):
                for kx in range(kernel):
                    iy, ix = sy + ky - half, sx + kx - half
                    if 0 <= iy < h and 0 <= ix < w:
                        out[:, :, oy, ox] += mask[:, ky * kernel + kx, oy, ox, None] * x[:, :, iy, ix]
    return out


def unfold_kernel(kernel: int, dtype=torch.float32) -> torch.Tensor:
    """One-hot convolution weight (k*k, 1, k, k): output channel ky*k+kx copies input tap (ky, kx), i.e.
    `conv2d(x.reshape(N*C, 1, H, W), w, padding=k//2)` is `F.unfold(x, k, padding=k//2)` (im2col, zero padding)."""
    return torch.eye(kernel * kernel, dtype=dtype).reshape(kernel * kernel, 1, kernel, kernel)


def carafe_export(x: torch.Tensor, mask: torch.Tensor, kernel: int, scale: int = 1,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """CARAFE with few, export-friendly nodes (same definition as `carafe`; see its docstring).

    - im2col of x as a convolution with the one-hot weight `unfold_kernel(kernel)` over x viewed as N*C
      one-channel images: (N*C, k*k, H, W), zero padding, taps in (ky, kx) order;
    - for scale s, output pixel (s*y + i, s*x + j) reads the neighbourhood of source pixel (y, x): the mask is
      pixel-unshuffled to (N, k*k, s*s, H*W), so each source pixel needs one (C, k*k) @ (k*k, s*s) product;
    - the (N*H*W, C, s*s) result is pixel-shuffled back to (N, C, sH, sW).
    Every op is 4-D or less (Core ML's rank limit is 5), and conv / permute / matmul delegate to XNNPACK.
    """
    n, c, h, w = x.shape
    kk = kernel * kernel
    ss = scale * scale
    if weight is None:
        weight = unfold_kernel(kernel, x.dtype).to(x.device)
    cols = F.conv2d(x.reshape(n * c, 1, h, w), weight, padding=kernel // 2)  # (N*C, kk, H, W)
    cols = cols.reshape(n, c, kk, h * w).permute(0, 3, 1, 2).reshape(n * h * w, c, kk)
    if scale != 1:
        mask = F.pixel_unshuffle(mask, scale)  # (N, kk*ss, H, W), channel t*ss + i*s + j
    m = mask.reshape(n, kk, ss, h * w).permute(0, 3, 1, 2).reshape(n * h * w, kk, ss)
    out = torch.bmm(cols, m)  # (N*HW, C, ss); 3-D bmm: a 4-D matmul adds expand ops XNNPACK does not take
    out = out.reshape(n, h * w, c * ss).permute(0, 2, 1).reshape(n, c * ss, h, w)
    if scale != 1:
        out = F.pixel_shuffle(out, scale)
    return out


def carafe_export_channels_last(x: torch.Tensor, mask: torch.Tensor, kernel: int, scale: int = 1) -> torch.Tensor:
    """`carafe_export` with the im2col built channels-last: the k*k shifted slices of the zero-padded (N, H, W, C)
    map stacked to (N*H*W, k*k, C) (no transpose of that large tensor), one (s*s, k*k) @ (k*k, C) product per
    source pixel, and the (N*H*W, s*s, C) result back to (N, C, sH, sW). Same values. Measured on OpenVINO
    2026.4.1 (CPU, 2 threads, f32) for offseg_t's largest call (224 channels, 48x60 -> 96x120): 29.1 ms against
    42.6 ms for `carafe_export`, whose conv-im2col output OpenVINO reorders and transposes; on ONNX Runtime the
    conv form stays faster for that call (48.4 vs 59.3 ms), so each target's profile picks its form."""
    n, c, h, w = x.shape
    kk, ss, half = kernel * kernel, scale * scale, kernel // 2
    xp = F.pad(x, (half, half, half, half)).permute(0, 2, 3, 1)  # (N, H+2h, W+2h, C)
    taps = [xp[:, dy:dy + h, dx:dx + w, :] for dy in range(kernel) for dx in range(kernel)]
    cols = torch.stack(taps, 3).reshape(n * h * w, kk, c)
    if scale != 1:
        mask = F.pixel_unshuffle(mask, scale)  # (N, kk*ss, H, W), channel t*ss + i*s + j
    m = mask.reshape(n, kk, ss, h * w).permute(0, 3, 2, 1).reshape(n * h * w, ss, kk)
    out = torch.bmm(m, cols).reshape(n, h * w, ss * c).permute(0, 2, 1)  # (N, ss*C, HW): channel sub*C + c
    out = out.reshape(n, ss, c, h, w).permute(0, 2, 1, 3, 4).reshape(n, c * ss, h, w)
    return F.pixel_shuffle(out, scale) if scale != 1 else out


def gather_index(h: int, w: int, kernel: int) -> torch.Tensor:
    """Row indices (h*w, k*k) into the zero-padded channels-last map flattened to ((h+2r)*(w+2r), C), r = k//2:
    entry [y*w + x, ky*k + kx] is the row of padded pixel (y + ky, x + kx), i.e. tap (ky, kx) of source pixel
    (y, x). `carafe_export_gather` reads the im2col with one Gather (an embedding lookup) of these rows; 2-D, so
    the lookup yields the (h*w, k*k, C) im2col with no reshape at run time."""
    wp = w + 2 * (kernel // 2)
    y = torch.arange(h).view(h, 1, 1, 1)
    x = torch.arange(w).view(1, w, 1, 1)
    ky = torch.arange(kernel).view(1, 1, kernel, 1)
    kx = torch.arange(kernel).view(1, 1, 1, kernel)
    return ((y + ky) * wp + (x + kx)).reshape(h * w, kernel * kernel)


def carafe_export_gather(x: torch.Tensor, mask: torch.Tensor, kernel: int, scale: int = 1,
                         index: torch.Tensor | None = None) -> torch.Tensor:
    """`carafe_export` with the im2col as one row Gather: the zero-padded map channels-last, flattened to
    (pixels, C), and its rows `gather_index(H, W, k)` read straight into the (H*W, k*k, C) layout the per-pixel
    product needs (no one-hot convolution over C one-channel images, no transpose of the k*k-fold tensor); then one
    (s*s, k*k) @ (k*k, C) product per source pixel, a 2-D transpose to (s*s*C, H*W), a row gather into
    pixel_shuffle's channel order and pixel_shuffle. Same values. The form for runtimes whose Gather copies rows
    fast and whose layout transposes are slow. `bench/carafe_forms.py` (offseg_t's largest call: 224 channels,
    48x60 -> 96x120, k=5; 1 thread, Intel Xeon with AMX, interleaved): ONNX Runtime 30.7 ms against 80.4 ms for
    `carafe_export` and 58.5 ms for `carafe_export_channels_last`; OpenVINO f32 37.7 against 74.7 / 49.8 ms, but
    OpenVINO 2026.4's CPU plugin refuses to compile the NNCF int8 IR of offseg_t in this form with bf16 compute
    (its default on bf16 CPUs; "No suitable implementations"; f32 compiles), so OpenVINO's profile keeps
    channels_last. ExecuTorch: the lookup runs on a portable kernel and the rest on XNNPACK; whole offseg_t at
    384x480, 2 threads, fp32 209.1 -> 179.2 ms and int8 173.1 -> 151.3 ms against `carafe_export`. The lookup is an
    embedding with 2-D indices, which yields the im2col in its 3-D shape (an index_select + reshape was 35.3 vs
    28.3 ms per call on ExecuTorch, 36.2 vs 31.8 on ONNX Runtime: XNNPACK copies on that reshape)."""
    n, c, h, w = x.shape
    kk, ss, half = kernel * kernel, scale * scale, kernel // 2
    if index is None:
        index = gather_index(h, w, kernel).to(x.device)
    hp, wp = h + 2 * half, w + 2 * half
    table = F.pad(x, (half, half, half, half)).permute(0, 2, 3, 1).reshape(n * hp * wp, c)
    rows = index
    if n > 1:  # image i's rows are offset by i padded maps (n is static in an export)
        rows = (rows.reshape(1, h * w, kk) + torch.arange(n, device=x.device).reshape(n, 1, 1) * (hp * wp)
                ).reshape(n * h * w, kk)
    # an embedding lookup with 2-D row indices yields the (N*H*W, k*k, C) im2col directly: no reshape after the
    # gather, which XNNPACK would run as a copy of the k*k-fold tensor
    cols = F.embedding(rows, table)
    if scale != 1:
        mask = F.pixel_unshuffle(mask, scale)  # (N, kk*ss, H, W), channel t*ss + i*s + j
    m = mask.reshape(n, kk, ss, h * w).permute(0, 3, 2, 1).reshape(n * h * w, ss, kk)
    out = torch.bmm(m, cols).reshape(n, h * w, ss * c).transpose(1, 2)  # (N, ss*C, H*W): channel t*C + c
    if scale == 1:
        return out.reshape(n, c, h, w)
    # to pixel_shuffle's channel order c*ss + t with one row gather (a 6-D permute was 50 ms of 86 on ORT)
    perm = torch.tensor([t * c + ch for ch in range(c) for t in range(ss)], device=x.device)
    return F.pixel_shuffle(out.index_select(1, perm).reshape(n, c * ss, h, w), scale)


CARAFE_FORMS = ("conv_bmm", "channels_last", "gather")  # export forms of CARAFE; a target's profile picks one


def local_cosine_similarity(x: torch.Tensor, window: int = 3, dilation: int = 2) -> torch.Tensor:
    """Cosine similarity of every pixel with its window x window neighbours (dilated, zero-padded; the
    centre is left out): (N, C, H, W) -> (N, window*window - 1, H, W), neighbours in (dy, dx) order.

    Same values as the official unfold + `F.cosine_similarity` (a zero-padded neighbour gives 0), computed
    on L2-normalised features with shifted slices instead of a C*window^2-fold unfolded tensor.
    """
    h, w = x.shape[-2:]
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    r = (window // 2) * dilation
    padded = F.pad(unit, (r, r, r, r))
    sims = []
    centre = (window * window) // 2
    for idx in range(window * window):
        if idx == centre:
            continue
        dy, dx = divmod(idx, window)
        nb = padded[:, :, dy * dilation:dy * dilation + h, dx * dilation:dx * dilation + w]
        sims.append((unit * nb).sum(dim=1, keepdim=True))
    return torch.cat(sims, dim=1)


def local_cosine_similarity_export(x: torch.Tensor, window: int = 3, dilation: int = 2,
                                   weight: torch.Tensor | None = None, ones: torch.Tensor | None = None
                                   ) -> torch.Tensor:
    """`local_cosine_similarity` with few nodes: the window x window - 1 dilated neighbours of the normalised
    features by one convolution with a constant one-hot kernel (`neighbour_kernel`), then one multiply and one
    channel sum. Same values (zero padding gives 0)."""
    n, c, h, w = x.shape
    if ones is None:
        ones = x.new_ones(1, c, 1, 1)
    unit = x / F.conv2d(x * x, ones).sqrt().clamp_min(1e-8)  # channel sums as a 1x1 conv (XNNPACK has no sum)
    if weight is None:
        weight = neighbour_kernel(window, x.dtype).to(x.device)
    nbs = weight.shape[0]
    r = (window // 2) * dilation
    nb = F.conv2d(unit.reshape(n * c, 1, h, w), weight, padding=r, dilation=dilation)
    prod = (nb.reshape(n, c, nbs, h * w) * unit.reshape(n, c, 1, h * w)).reshape(n, c, nbs * h, w)
    return F.conv2d(prod, ones).reshape(n, nbs, h, w)


def neighbour_kernel(window: int = 3, dtype=torch.float32) -> torch.Tensor:
    """One-hot weight (window^2 - 1, 1, window, window) picking every tap but the centre, in (dy, dx) order."""
    eye = unfold_kernel(window, dtype)
    centre = (window * window) // 2
    return torch.cat([eye[:centre], eye[centre + 1:]])


def group_norm_export(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """`norm(x)` for a GroupNorm (or Identity) as 4-D means over the last two axes, sub, mul, sqrt and div:
    the ops XNNPACK delegates (its partitioner takes no group_norm, and `mean` only over the last 2 axes of 4-D)."""
    if not isinstance(norm, nn.GroupNorm):
        return norm(x)
    n, c, h, w = x.shape
    g = norm.num_groups
    xg = x.reshape(n, g, c // g, h * w)
    centred = xg - xg.mean(dim=(-2, -1), keepdim=True)
    var = (centred * centred).mean(dim=(-2, -1), keepdim=True)
    y = (centred / (var + norm.eps).sqrt()).reshape(n, c, h, w)
    if norm.affine:
        y = y * norm.weight.view(1, c, 1, 1) + norm.bias.view(1, c, 1, 1)
    return y
