"""Image/label transforms for training and evaluation. Labels are only ever resized with nearest neighbour.

- `preprocess(image, input_hw, mean, std)`: the evaluation/deployment input: bilinear resize to `input_hw`,
  then `(x - mean) / std` on the 0..255 scale, float32 (3, H, W).
- `TrainTransform`: CPU (numpy/OpenCV) training augmentation for one pair, usable in DataLoader workers:
  random scale, random crop with padding (image 0, label ignore), horizontal flip, photometric jitter
  (brightness/contrast/saturation/hue), normalise -> (float32 (3,h,w), int64 (h,w)).
- `gpu_augment(images, labels, ...)`: the same augmentation for a whole batch on its device in torch
  (one `grid_sample` per batch for scale+crop+flip, a few tensor ops for the jitter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

_NEAREST = getattr(cv2, "INTER_NEAREST_EXACT", cv2.INTER_NEAREST)  # pixel-centre aligned nearest


def _as_hw(hw) -> tuple[int, int]:
    h, w = (int(hw), int(hw)) if np.isscalar(hw) else (int(hw[0]), int(hw[1]))
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {hw}")
    return h, w


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8/float (H,W,3) RGB -> float32 (3,H,W), (x - mean) / std with mean/std on the 0..255 scale."""
    x = image.astype(np.float32)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def resize_label(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to (H, W); values are never mixed."""
    h, w = _as_hw(hw)
    if label.shape[:2] == (h, w):
        return label
    dtype = label.dtype
    work = label.astype(np.int32) if dtype not in (np.uint8, np.uint16, np.int16, np.int32) else label
    out = cv2.resize(work, (w, h), interpolation=_NEAREST)
    return out.astype(dtype, copy=False)


def preprocess(image_rgb_uint8: np.ndarray, input_hw, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The model input for one image: cv2 bilinear resize to `input_hw` (H, W) if needed, then normalise.

    Returns float32 (3, H, W)."""
    h, w = _as_hw(input_hw)
    img = image_rgb_uint8
    if img.shape[:2] != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    return normalize(img, mean, std)


# ----------------------------------------------------------------------------------------------- CPU train

def photometric_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float = 32,
                       contrast: tuple[float, float] = (0.5, 1.5), saturation: tuple[float, float] = (0.5, 1.5),
                       hue: float = 18, p: float = 0.5) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on uint8 RGB: each of brightness (+-`brightness`), contrast (x U(range)),
    saturation (x U(range)) and hue (+-`hue` in OpenCV's 0..180 units) is applied with probability `p`;
    contrast goes first or last at random. Returns uint8 RGB."""
    img = image.astype(np.float32)
    if rng.random() < p and brightness:
        img += rng.uniform(-brightness, brightness)
    contrast_first = rng.random() < 0.5

    def _contrast(x):
        if rng.random() < p and contrast != (1, 1):
            x = x * rng.uniform(*contrast)
        return x

    if contrast_first:
        img = _contrast(img)
    img = np.clip(img, 0, 255)
    do_sat = rng.random() < p and saturation != (1, 1)
    do_hue = rng.random() < p and hue
    if do_sat or do_hue:
        hsv = cv2.cvtColor(img.astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation), 0, 255)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue, hue)) % 180
        img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    if not contrast_first:
        img = _contrast(img)
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class TrainTransform:
    """Training augmentation for one (image uint8 (H,W,3) RGB, label (H,W)) pair.

    Steps: (1) rescale by s ~ U(scale_range) relative to the image (or, with `base_hw`, to the mmseg
    keep-ratio fit of the image into base_hw) — image bilinear, label nearest; (2) pad to at least
    `crop_hw` (image 0, label `ignore_index`) and take a random crop, retried up to 10 times so that no
    single class covers more than `cat_max_ratio` of the labelled pixels; (3) horizontal flip with
    probability `flip_p`; (4) photometric jitter (`photometric_jitter`, `jitter=False` disables it);
    (5) normalise. Returns (float32 (3,h,w), int64 (h,w)). Call as `t(image, label, rng)` with a
    `np.random.Generator` (a fresh default one when omitted).
    """

    crop_hw: tuple[int, int]
    mean: Sequence[float]
    std: Sequence[float]
    ignore_index: int = 255
    scale_range: tuple[float, float] = (0.5, 2.0)
    base_hw: tuple[int, int] | None = None
    flip_p: float = 0.5
    jitter: bool = True
    cat_max_ratio: float = 0.75

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        rng = rng if rng is not None else np.random.default_rng()
        ch, cw = _as_hw(self.crop_hw)
        h, w = image.shape[:2]
        label = label.astype(np.int32, copy=False) if label.dtype == np.int64 else label
        base = 1.0
        if self.base_hw is not None:
            bh, bw = _as_hw(self.base_hw)
            base = min(max(bh, bw) / max(h, w), min(bh, bw) / min(h, w))
        s = base * rng.uniform(*self.scale_range)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        if (nh, nw) != (h, w):
            image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
            label = resize_label(label, (nh, nw))
        # pad (bottom/right) to at least the crop size
        ph, pw = max(ch - nh, 0), max(cw - nw, 0)
        if ph or pw:
            image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=self.ignore_index)
        H, W = label.shape
        for _ in range(10):
            y0, x0 = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
            crop_l = label[y0:y0 + ch, x0:x0 + cw]
            if self.cat_max_ratio >= 1:
                break
            vals, cnt = np.unique(crop_l[crop_l != self.ignore_index], return_counts=True)
            if len(cnt) > 1 and cnt.max() / cnt.sum() < self.cat_max_ratio:
                break
        image = image[y0:y0 + ch, x0:x0 + cw]
        label = crop_l
        if rng.random() < self.flip_p:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.jitter:
            image = photometric_jitter(np.ascontiguousarray(image), rng)
        return normalize(image, self.mean, self.std), np.ascontiguousarray(label, dtype=np.int64)


@dataclass
class EvalTransform:
    """Evaluation-time pair transform: `preprocess` the image to `input_hw` (or keep its size when None);
    the label is returned unchanged (metrics are computed at the label's size)."""

    mean: Sequence[float]
    std: Sequence[float]
    input_hw: tuple[int, int] | None = None

    def __call__(self, image: np.ndarray, label: np.ndarray, rng=None) -> tuple[np.ndarray, np.ndarray]:
        hw = self.input_hw or image.shape[:2]
        return preprocess(image, hw, self.mean, self.std), label.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------------------------- GPU batch

def _gpu_jitter(out, rand, n: int):
    """gpu_augment's photometric jitter of a (N, 3, h, w) batch on the 0..255 scale; each step per sample with
    probability 0.5, drawing from `rand` in a fixed order (reproducible with a generator)."""
    import torch

    dev = out.device

    def coin():
        return (rand(n) < 0.5).float()[:, None, None, None]

    out = out + coin() * (rand(n)[:, None, None, None] * 64 - 32)
    out = out.clamp(0, 255)
    out = out * (1 + coin() * (rand(n)[:, None, None, None] - 0.5))
    out = out.clamp(0, 255)
    luma = (0.299 * out[:, 0] + 0.587 * out[:, 1] + 0.114 * out[:, 2])[:, None]
    sat = 1 + coin() * (rand(n)[:, None, None, None] - 0.5)
    out = (luma + (out - luma) * sat).clamp(0, 255)
    theta = coin()[:, 0, 0, 0] * (rand(n) * 2 - 1) * (math.pi / 5)  # +-36 degrees
    c, si = torch.cos(theta), torch.sin(theta)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev)
    rgb = torch.linalg.inv(yiq)
    rot = torch.zeros(n, 3, 3, device=dev)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -si, si, c
    m = rgb[None] @ rot @ yiq[None]  # (N, 3, 3)
    out = torch.einsum("nij,njhw->nihw", m, out).clamp(0, 255)
    return out


def gpu_augment(images, labels, crop_hw, mean: Sequence[float], std: Sequence[float], ignore_index: int = 255,
                scale_range: tuple[float, float] = (0.5, 2.0), flip_p: float = 0.5, jitter: bool = True,
                generator=None):
    """Augment a whole batch on its device (for GPU training; no per-sample Python loops over pixels).

    Args:
      images: uint8 or float (N, 3, H, W) RGB on the 0..255 scale (torch tensor on any device), or a list
        of (3, H_i, W_i) tensors of different sizes (processed one by one).
      labels: integer (N, H, W) class indices (ignore = `ignore_index`), same device; or a list.
      crop_hw: output (h, w).
    Per sample: scale s ~ U(scale_range) of the input, a random crop of `crop_hw` from the scaled image (the
    part outside the image is padding: image 0, label `ignore_index`; a scaled image smaller than the crop
    sits at the top-left, as on the CPU path), horizontal flip with probability `flip_p`. All of it is one
    `F.grid_sample` per batch: bilinear for images (no antialiasing when shrinking), *nearest* for labels,
    so label values stay a subset of the input values plus `ignore_index`. Then photometric jitter per
    sample, each with probability 0.5: brightness +-32, contrast x U(0.5, 1.5), saturation x U(0.5, 1.5)
    (blend with the luma) and hue +-36 degrees (a rotation of the chroma plane in YIQ, an approximation of
    the CPU path's HSV shift); padding stays 0. Finally normalise with mean/std (0..255 scale).
    Returns (float32 (N, 3, h, w) normalised, int64 (N, h, w)) on the input device.
    `generator`: an optional torch.Generator on the same device, for reproducible draws.
    """
    import torch
    import torch.nn.functional as F

    if isinstance(images, (list, tuple)):
        outs = [gpu_augment(im[None], lb[None], crop_hw, mean, std, ignore_index, scale_range, flip_p, jitter,
                            generator) for im, lb in zip(images, labels)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    ch, cw = _as_hw(crop_hw)
    n, _, h, w = images.shape
    dev = images.device
    if labels.shape != (n, h, w):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match images {tuple(images.shape)}")

    def rand(*shape):
        return torch.rand(*shape, device=dev, generator=generator)

    x = images.float()
    s = scale_range[0] + (scale_range[1] - scale_range[0]) * rand(n)  # (N,)
    sh, sw = h * s, w * s  # scaled size
    y0 = torch.floor(rand(n) * torch.clamp(sh - ch, min=0).add(1).floor())
    x0 = torch.floor(rand(n) * torch.clamp(sw - cw, min=0).add(1).floor())
    flip = rand(n) < flip_p
    ii = torch.arange(ch, device=dev, dtype=torch.float32)
    jj = torch.arange(cw, device=dev, dtype=torch.float32)
    jj_n = torch.where(flip[:, None], (cw - 1 - jj)[None, :], jj[None, :])  # (N, cw)
    # output pixel centre -> scaled-image coordinate -> input coordinate -> [-1, 1] (align_corners=False)
    ys = (y0[:, None] + ii[None, :] + 0.5) / s[:, None]  # (N, ch)
    xs = (x0[:, None] + jj_n + 0.5) / s[:, None]  # (N, cw)
    gy = (2 * ys / h - 1)[:, :, None].expand(n, ch, cw)
    gx = (2 * xs / w - 1)[:, None, :].expand(n, ch, cw)
    grid = torch.stack([gx, gy], dim=-1)
    inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]  # (N, ch, cw)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out * inside[:, None]
    lab = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="border",
                        align_corners=False)[:, 0].round().long()
    lab = torch.where(inside, lab, torch.full_like(lab, ignore_index))

    if jitter:
        out = _gpu_jitter(out, rand, n) * inside[:, None]
    m_t = torch.tensor(list(mean), device=dev, dtype=torch.float32)[None, :, None, None]
    s_t = torch.tensor(list(std), device=dev, dtype=torch.float32)[None, :, None, None]
    return (out - m_t) / s_t, lab
