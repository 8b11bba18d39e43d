"""MPLSeg's Adaptive Frequency Module (AFM) with two interchangeable spectral back-ends, and the
phase-sensitive loss (PSL).

AFM (per fusion stage; official code: github.com/qyan0131/MPLSeg, mmseg/models/backbones/mplseg.py):
  F = rfft2(x, norm="ortho");  |F|, phase = angle(F + eps)           (eps = 1e-3 added to the real part)
  |F| <- |F| * (1 - mp(sigmoid(ln(|F| + eps))))     magnitude perceptron: 1x1 -> 3x3 -> 1x1, C -> C/4 -> C,
                                                     InstanceNorm + sigmoid after each conv
  phase <- phase + pa(phase)                         phase amender: same bottleneck with tanh
  y = irfft2(|F| e^{i phase}, s=out_hw, norm="ortho");  y = ReLU(y);  out = pw(y)  (1x1 conv + BN + ReLU)
Module names (`mp.0/3/6`, `pa.0/3/6`, `pw.conv`, `pw.bn`) follow the official AFM.

Spectral zero-padding (scale alignment): when `out_hw` is larger than the input, the modulated spectrum is
zero-padded to the output size before the inverse transform (Fourier interpolation: even-size Nyquist bins
are split in half between +N/2 and -N/2, amplitudes rescaled by sqrt(H'W'/HW) so a constant stays constant).
The official code instead resizes AFM outputs bilinearly; the padding is the scale alignment MPLSeg's paper
describes and what the issue asks for.

Back-ends (same math, equal within float error; tested forward and backward):
- "fft": torch.fft.rfft2 / irfft2 (training reference).
- "dft": real matmuls with constant cos/sin DFT matrices built for the static size (export form: no complex
  tensors, no FFT ops). The inverse matrices fold in the spectral padding.
Both compute the magnitude as sqrt(re^2 + im^2) and the phase with `atan2` below (atan + where, exports to
every target). Bins that are real for real input (DC / Nyquist rows and columns) get an exact zero imaginary
part in both, so the branch cut of the phase is resolved identically (+pi).

`prepare_for_export(input_hw)` switches to "dft" and builds the matrices for the static feature size
(input size / `stride`, output size / `out_stride`).

PSL (official: mmseg/models/losses/psl_loss.py): mean |phase(rfft2(onehot)) - phase(rfft2(softmax(logits)))|
over the frequencies where the label spectrum's magnitude exceeds 1. Carriers cache their decoder logits and
expose `aux_loss(labels, ignore_index)`.

Must not import export/ or runtime/.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

AFM_EPS = 1e-3
BACKENDS = ("fft", "dft")


# ---------------------------------------------------------------------------------------------------------
# portable atan2
# ---------------------------------------------------------------------------------------------------------
def atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """atan2(y, x) from atan, division and where (ONNX / OpenVINO / ExecuTorch / Core ML all have these).

    Equals torch.atan2 except that y = -0.0 is treated as +0.0 (so the branch cut gives +pi for x < 0).
    The argument of atan lies in [0, 1] (well conditioned); gradients equal torch.atan2's, also at y = 0.
    """
    ax = torch.where(x < 0, -x, x)
    ay = torch.where(y < 0, -y, y)
    swap = ay > ax
    num = torch.where(swap, ax, ay)
    den = torch.where(swap, ay, ax)
    den = torch.where(den == 0, torch.ones_like(den), den)
    a = torch.atan(num / den)
    a = torch.where(swap, (math.pi / 2) - a, a)
    a = torch.where(x < 0, math.pi - a, a)
    return torch.where(y < 0, -a, a)


def _magnitude(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.clamp(re * re + im * im, min=1e-30))


# ---------------------------------------------------------------------------------------------------------
# spectral helpers
# ---------------------------------------------------------------------------------------------------------
def _real_bins_mask(h: int, w: int, device=None) -> torch.Tensor:
    """(h, w//2+1) bool: bins whose DFT is real for a real input (rows 0 and h/2, columns 0 and w/2)."""
    rows = torch.zeros(h, dtype=torch.bool, device=device)
    cols = torch.zeros(w // 2 + 1, dtype=torch.bool, device=device)
    rows[0] = True
    cols[0] = True
    if h % 2 == 0:
        rows[h // 2] = True
    if w % 2 == 0:
        cols[w // 2] = True
    return rows[:, None] & cols[None, :]


def _check_sizes(in_hw, out_hw):
    if out_hw[0] < in_hw[0] or out_hw[1] < in_hw[1]:
        raise ValueError(f"AFM spectral padding only enlarges: {tuple(in_hw)} -> {tuple(out_hw)}")


def pad_spectrum(z: torch.Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """Zero-pad an rfft2 half-spectrum (..., H, W//2+1) of an (H, W) signal to that of an (H', W') signal
    (Fourier interpolation; Nyquist bins split; no amplitude rescaling here)."""
    (h, w), (h2, w2) = in_hw, out_hw
    _check_sizes(in_hw, out_hw)
    if h2 > h:
        lead = z.shape[:-2]
        if h % 2 == 0:
            half = h // 2
            nyq = z[..., half:half + 1, :] * 0.5
            zeros = z.new_zeros(lead + (h2 - h - 1, z.shape[-1]))
            z = torch.cat([z[..., :half, :], nyq, zeros, nyq, z[..., half + 1:, :]], dim=-2)
        else:
            hp = (h + 1) // 2
            zeros = z.new_zeros(lead + (h2 - h, z.shape[-1]))
            z = torch.cat([z[..., :hp, :], zeros, z[..., hp:, :]], dim=-2)
    if w2 > w:
        wr2 = w2 // 2 + 1
        if w % 2 == 0:
            z = torch.cat([z[..., :-1], z[..., -1:] * 0.5], dim=-1)
        z = torch.cat([z, z.new_zeros(z.shape[:-1] + (wr2 - z.shape[-1],))], dim=-1)
    return z


def _cs(k: np.ndarray, n: np.ndarray, N: int):
    """cos/sin(2 pi k n / N) in float64 with the phase reduced exactly (integers) and exact zeros."""
    m = np.outer(k, n) % N
    ang = 2.0 * np.pi * m / N
    c, s = np.cos(ang), np.sin(ang)
    c[np.abs(c) < 1e-12] = 0.0
    s[np.abs(s) < 1e-12] = 0.0
    return c, s


def dft_matrices(in_hw: tuple[int, int], out_hw: tuple[int, int] | None = None,
                 dtype=torch.float32, device=None) -> dict[str, torch.Tensor]:
    """Constant real matrices for the matmul back-end (see `DFT2d`):
    fw_w (W, 2Wr) = [cos | -sin]/sqrt(W)  (rfft along W);
    fw_h (2H, 2H) complex DFT along H acting on [re | im] rows-concatenated (transposed layout);
    inv_h (2H, 2H') inverse DFT along H with the row padding folded in;
    inv_w (2Wr, W') c2r inverse along W with the column padding folded in.
    """
    h, w = in_hw
    h2, w2 = out_hw if out_hw is not None else in_hw
    _check_sizes((h, w), (h2, w2))
    wr = w // 2 + 1
    # forward along W: Y = x @ [C | S]
    c, s = _cs(np.arange(w), np.arange(wr), w)
    fw_w = np.concatenate([c, -s], axis=1) / math.sqrt(w)
    # forward along H (symmetric F = C - iS): X = F Y; transposed layout [Yre^T | Yim^T] @ M
    c, s = _cs(np.arange(h), np.arange(h), h)
    fc, fs = c / math.sqrt(h), -s / math.sqrt(h)
    fw_h = np.block([[fc.T, fs.T], [-fs.T, fc.T]])
    # inverse along H with padding: G[n', k] = exp(+i 2 pi f_k n' / H') / sqrt(H) (scale sqrt(H'/H)/sqrt(H'))
    freqs = np.array([k if k < (h + 1) // 2 else k - h for k in range(h)])
    n2 = np.arange(h2)
    m = np.outer(n2, np.mod(freqs, h2)) % h2
    ang = 2.0 * np.pi * m / h2
    g_re, g_im = np.cos(ang), np.sin(ang)
    if h % 2 == 0:
        # Nyquist: as stored (exp(-i pi n')) when h2 == h, else split half to +h/2 and half to -h/2 -> cos
        ang_n = 2.0 * np.pi * ((n2 * (h // 2)) % h2) / h2
        g_re[:, h // 2] = np.cos(ang_n)
        g_im[:, h // 2] = 0.0
    g_re[np.abs(g_re) < 1e-12] = 0.0
    g_im[np.abs(g_im) < 1e-12] = 0.0
    g_re, g_im = g_re / math.sqrt(h), g_im / math.sqrt(h)
    # transposed layout: [Xre^T | Xim^T] (Wr, 2H) @ inv_h -> [Ure^T | Uim^T] (Wr, 2H')
    inv_h = np.block([[g_re.T, g_im.T], [-g_im.T, g_re.T]])
    # inverse c2r along W with padding: x[n'] = sum_l w_l (Re U_l cos - Im U_l sin)(2 pi l n'/W') / sqrt(W)
    c, s = _cs(np.arange(wr), np.arange(w2), w2)
    wl = np.full(wr, 2.0)
    wl[0] = 1.0
    if w % 2 == 0:
        wl[w // 2] = 1.0  # the Nyquist bin: weight 1 (irfft's convention; the split when padding)
    if w2 == w and w % 2 == 0:
        s[w // 2, :] = 0.0  # irfft ignores the imaginary part of the Nyquist bin
    s[0, :] = 0.0  # ... and of DC
    inv_w = np.concatenate([wl[:, None] * c, -wl[:, None] * s], axis=0) / math.sqrt(w)
    out = dict(fw_w=fw_w, fw_h=fw_h, inv_h=inv_h, inv_w=inv_w)
    return {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in out.items()}


def _fft_dtype(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def fft_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.fft back-end: (re, im) of rfft2(x, norm='ortho'), exact zeros on the real bins' imaginary part."""
    z = torch.fft.rfft2(_fft_dtype(x), norm="ortho")
    mask = _real_bins_mask(x.shape[-2], x.shape[-1], device=x.device)
    im = torch.where(mask, torch.zeros_like(z.imag), z.imag)
    return z.real.to(x.dtype), im.to(x.dtype)


def fft_inverse(re: torch.Tensor, im: torch.Tensor, in_hw, out_hw) -> torch.Tensor:
    """torch.fft back-end: irfft2 with spectral zero-padding to out_hw, amplitude-preserving."""
    z = torch.complex(_fft_dtype(re), _fft_dtype(im))
    (h, w), (h2, w2) = tuple(in_hw), tuple(out_hw)
    if (h2, w2) != (h, w):
        z = pad_spectrum(z, (h, w), (h2, w2)) * math.sqrt((h2 * w2) / (h * w))
    return torch.fft.irfft2(z, s=(h2, w2), norm="ortho").to(re.dtype)


def dft_forward(x: torch.Tensor, mats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Matmul back-end forward: (re, im) (..., H, Wr) from real matmuls only."""
    h = x.shape[-2]
    wr = mats["fw_w"].shape[1] // 2
    y = torch.matmul(x, mats["fw_w"])  # (..., H, 2Wr) = [Yre | Yim]
    yt = y.transpose(-1, -2)  # (..., 2Wr, H)
    z = torch.cat([yt[..., :wr, :], yt[..., wr:, :]], dim=-1)  # (..., Wr, 2H) = [Yre^T | Yim^T]
    xt = torch.matmul(z, mats["fw_h"])  # (..., Wr, 2H) = [Xre^T | Xim^T]
    return xt[..., :h].transpose(-1, -2), xt[..., h:].transpose(-1, -2)


def dft_inverse(re: torch.Tensor, im: torch.Tensor, mats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Matmul back-end inverse (with the spectral padding folded into the matrices)."""
    h2 = mats["inv_h"].shape[1] // 2
    z = torch.cat([re.transpose(-1, -2), im.transpose(-1, -2)], dim=-1)  # (..., Wr, 2H)
    ut = torch.matmul(z, mats["inv_h"])  # (..., Wr, 2H') = [Ure^T | Uim^T]
    u = torch.cat([ut[..., :h2].transpose(-1, -2), ut[..., h2:].transpose(-1, -2)], dim=-1)  # (..., H', 2Wr)
    return torch.matmul(u, mats["inv_w"])  # (..., H', W')


# ---------------------------------------------------------------------------------------------------------
# AFM
# ---------------------------------------------------------------------------------------------------------
class ConvBNReLU(nn.Module):
    """mmcv ConvModule(1x1, norm=BN, act=ReLU): names conv, bn."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def _bottleneck(c: int, act: type[nn.Module]) -> nn.Sequential:
    mid = max(1, c // 4)
    return nn.Sequential(
        nn.Conv2d(c, mid, 1, bias=False), nn.InstanceNorm2d(mid), act(),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.InstanceNorm2d(mid), act(),
        nn.Conv2d(mid, c, 1, bias=False), nn.InstanceNorm2d(c), act(),
    )


class AFM(nn.Module):
    """Adaptive Frequency Module: (N, C, H, W) -> (N, out_channels, H', W'), (H', W') = out_hw or (H, W).

    `stride` / `out_stride`: the feature's stride relative to the model input (used by
    `prepare_for_export(input_hw)` to size the DFT matrices); `backend`: "fft" or "dft".
    """

    def __init__(self, channels: int, out_channels: int, stride: int = 1, out_stride: int | None = None,
                 backend: str = "fft", eps: float = AFM_EPS):
        super().__init__()
        self.mp = _bottleneck(channels, nn.Sigmoid)
        self.pa = _bottleneck(channels, nn.Tanh)
        self.pw = ConvBNReLU(channels, out_channels)
        self.eps = eps
        self.stride = int(stride)
        self.out_stride = int(out_stride or stride)
        self.backend = backend
        self._mats: dict[tuple, dict[str, torch.Tensor]] = {}
        for m in (*self.mp, *self.pa):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"AFM backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    # -- constants for the matmul back-end -----------------------------------------------------------------
    def _matrices(self, in_hw, out_hw, like: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (tuple(in_hw), tuple(out_hw))
        names = {k: f"dft_{k}" for k in ("fw_w", "fw_h", "inv_h", "inv_w")}
        if getattr(self, "_baked_key", None) == key:
            return {k: getattr(self, n) for k, n in names.items()}
        mats = self._mats.get(key)
        if mats is None or mats["fw_w"].device != like.device or mats["fw_w"].dtype != like.dtype:
            mats = dft_matrices(key[0], key[1], dtype=like.dtype, device=like.device)
            self._mats[key] = mats
        return mats

    def prepare_for_export(self, input_hw) -> None:
        h, w = int(input_hw[0]), int(input_hw[1])
        in_hw = (h // self.stride, w // self.stride)
        out_hw = (h // self.out_stride, w // self.out_stride)
        p = next(self.parameters())
        mats = dft_matrices(in_hw, out_hw, dtype=p.dtype, device=p.device)
        for k, v in mats.items():
            name = f"dft_{k}"
            # executorch 1.5.1's convert_constant_dim_order_pass fails ("Missing input spec for lifted tensor")
            # on a non-contiguous non-persistent buffer; numpy's block/transpose can hand us one.
            v = v.contiguous()
            if name in self._buffers:
                self._buffers[name] = v
            else:
                self.register_buffer(name, v, persistent=False)
        self._baked_key = (in_hw, out_hw)
        self.backend = "dft"

    # -- spectra -------------------------------------------------------------------------------------------
    def spectrum(self, x: torch.Tensor, out_hw=None) -> tuple[torch.Tensor, torch.Tensor]:
        in_hw = tuple(x.shape[-2:])
        if self.backend == "fft":
            return fft_forward(x)
        return dft_forward(x, self._matrices(in_hw, out_hw or in_hw, x))

    def inverse(self, re: torch.Tensor, im: torch.Tensor, in_hw, out_hw) -> torch.Tensor:
        if self.backend == "fft":
            return fft_inverse(re, im, in_hw, out_hw)
        return dft_inverse(re, im, self._matrices(in_hw, out_hw, re))

    def modulate(self, re: torch.Tensor, im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mag = _magnitude(re, im)
        pha = atan2(im, re + self.eps)
        mag = mag * (1 - self.mp(torch.sigmoid(torch.log(mag + self.eps))))
        pha = pha + self.pa(pha)
        return mag * torch.cos(pha), mag * torch.sin(pha)

    def forward(self, x: torch.Tensor, out_hw: tuple[int, int] | None = None) -> torch.Tensor:
        in_hw = (int(x.shape[-2]), int(x.shape[-1]))
        out_hw = in_hw if out_hw is None else (int(out_hw[0]), int(out_hw[1]))
        re, im = self.spectrum(x, out_hw)
        re, im = self.modulate(re, im)
        y = self.inverse(re, im, in_hw, out_hw)
        return self.pw(F.relu(y))


# ---------------------------------------------------------------------------------------------------------
# PSL
# ---------------------------------------------------------------------------------------------------------
def psl_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, eps: float = 1e-5,
             resize: bool = True) -> torch.Tensor:
    """Phase-sensitive loss (MPLSeg): logits (N, K, h, w), labels (N, H, W) long.

    The logits are resized bilinearly to the label size (as mmseg does for decoder losses) unless
    `resize=False`, in which case the labels are resized (nearest) to the logits. Ignored pixels get an
    all-zero one-hot vector. Computed in float32 with torch.fft (training only)."""
    k = logits.shape[1]
    labels = labels.long()
    if labels.shape[-2:] != logits.shape[-2:]:
        if resize:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        else:
            labels = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
    valid = labels != ignore_index
    onehot = F.one_hot(torch.where(valid, labels, torch.zeros_like(labels)).clamp(0, k - 1), k)
    onehot = (onehot * valid[..., None]).permute(0, 3, 1, 2).float()
    prob = logits.float().softmax(1)
    sl = torch.fft.rfft2(onehot, norm="ortho")
    sp = torch.fft.rfft2(prob, norm="ortho")
    pha_l = atan2(sl.imag, sl.real + eps)
    pha_p = atan2(sp.imag, sp.real + eps)
    mask = (sl.abs() > 1).float()
    delta = ((pha_l - pha_p).abs() * mask).sum()
    return delta / (mask.sum() + eps)


class PSLMixin:
    """For carriers (MPLSeg's recipe): decoder stages get auxiliary classifiers whose logits are cached in
    train mode (`_psl_cache(logits, psl_weight, ce_weight)`); `aux_loss(labels, ignore_index)` returns
    sum(ce_weight * CE + psl_weight * PSL) over the cached stages and clears the cache."""

    def _psl_reset(self) -> None:
        self._psl_logits: list[tuple[float, float, torch.Tensor]] = []

    def _psl_cache(self, logits: torch.Tensor, psl_weight: float, ce_weight: float = 0.0) -> None:
        if not hasattr(self, "_psl_logits"):
            self._psl_reset()
        self._psl_logits.append((psl_weight, ce_weight, logits))

    def aux_loss(self, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        cached = getattr(self, "_psl_logits", [])
        if not cached:
            raise RuntimeError("aux_loss() needs a forward in train mode first")
        total = labels.new_zeros((), dtype=torch.float32)
        for psl_w, ce_w, lg in cached:
            if psl_w:
                total = total + psl_w * psl_loss(lg, labels, ignore_index)
            if ce_w:
                up = F.interpolate(lg.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
                total = total + ce_w * F.cross_entropy(up, labels.long(), ignore_index=ignore_index)
        self._psl_reset()
        return total
