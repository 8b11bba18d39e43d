"""The evaluation protocol, shared by `edgeseg eval`, training's validation, `validate` and the demo.

For every image/label pair of the dataset, in order:
1. `preprocess`: OpenCV bilinear resize of the RGB image to `input_hw` (H, W), `(x - mean) / std` with
   mean/std on the 0..255 scale, float32 (3, H, W); `batch_size` of those are stacked to (N, 3, H, W).
2. `predict_logits(x) -> (N, K, h, w)` (any stride; numpy or torch).
3. Per image, the logits are upsampled to the *label's* size with bilinear interpolation
   (`F.interpolate(..., mode="bilinear", align_corners=False)`, float32) and argmax'ed over K. When the upsampled
   logits would exceed TILE_ABOVE_BYTES (a 10000x10000 label: 4.4 GB at 11 classes), the same bilinear
   upsample and argmax run on row tiles of about TILE_BYTES each (`argmax_tiles`), so memory per image stays
   bounded; images below that size take the untiled path unchanged.
4. The class map and the label (never resized) are accumulated in a `SegMetrics` confusion matrix; pixels with
   the ignore index are not counted.
Returns `SegMetrics.compute()` plus `num_images` (pairs evaluated) and `skipped` (bad pairs left out with
`skip_bad`).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgeseg.data.transforms import preprocess
from edgeseg.errors import DataError
from edgeseg.eval.metrics import SegMetrics

log = logging.getLogger(__name__)

PredictFn = Callable[[np.ndarray], Any]
TILE_ABOVE_BYTES = 256 << 20  # float32 logits at the label's size above this: upsample + argmax in row tiles
TILE_BYTES = 32 << 20  # upsampled float32 logits per row tile


def _to_tensor(logits) -> torch.Tensor:
    t = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
    return t.detach().float().cpu()


def _tiled(k: int, out_hw) -> bool:
    return 4 * k * int(out_hw[0]) * int(out_hw[1]) > TILE_ABOVE_BYTES


def upsample_argmax(logits, out_hw: tuple[int, int]) -> np.ndarray:
    """(K, h, w) or (1, K, h, w) logits -> (H, W) class map: bilinear upsample to out_hw (`F.interpolate`,
    align_corners=False, float32), then argmax over K (first maximum on ties). int64, or for a size above
    TILE_ABOVE_BYTES uint8/uint16 assembled from `argmax_tiles` (same classes, bounded memory)."""
    t = _to_tensor(logits)
    if t.dim() == 3:
        t = t[None]
    if _tiled(t.shape[1], out_hw):
        out = np.empty(tuple(int(v) for v in out_hw), np.uint8 if t.shape[1] <= 256 else np.uint16)
        for y0, rows in argmax_tiles(t, out_hw):
            out[y0:y0 + len(rows)] = rows
        return out
    if tuple(t.shape[-2:]) != tuple(out_hw):
        t = F.interpolate(t, size=tuple(int(v) for v in out_hw), mode="bilinear", align_corners=False)
    return t[0].numpy().argmax(0)  # numpy's argmax over the leading axis is ~4x faster than torch's on CPU


def argmax_tiles(logits, out_hw: tuple[int, int], tile_bytes: int = TILE_BYTES):
    """Yield (y0, class map rows y0:y0+n) of `upsample_argmax(logits, out_hw)`, n rows at a time such that their
    upsampled logits take about `tile_bytes` (`upsampled_rows`)."""
    for y0, rows in upsampled_rows(logits, out_hw, tile_bytes):
        yield y0, rows.numpy().argmax(0)


def upsampled_rows(logits, out_hw: tuple[int, int], tile_bytes: int = TILE_BYTES):
    """Yield (y0, (K, n, W) float32 tensor): rows y0:y0+n of the logits bilinearly upsampled to out_hw, n rows at
    a time such that they take about `tile_bytes`. Bilinear with align_corners=False is separable: each output row
    blends two source rows (PyTorch's source index and weights, in float32), and those rows are first upsampled
    along the width by `F.interpolate` itself."""
    t = _to_tensor(logits)
    if t.dim() == 3:
        t = t[None]
    k, h, w = t.shape[1:]
    big_h, big_w = (int(v) for v in out_hw)
    step = max(1, tile_bytes // (4 * k * big_w))
    src = np.maximum(np.float32(h) / np.float32(big_h) * (np.arange(big_h, dtype=np.float32) + np.float32(0.5))
                     - np.float32(0.5), np.float32(0))
    lo = np.minimum(src.astype(np.int64), h - 1)
    hi = np.minimum(lo + 1, h - 1)
    lam = torch.from_numpy(src - lo.astype(np.float32))
    for y0 in range(0, big_h, step):
        y1 = min(big_h, y0 + step)
        r0, r1 = int(lo[y0]), int(hi[y1 - 1]) + 1
        rows = t[:, :, r0:r1]
        if w != big_w:
            rows = F.interpolate(rows, size=(r1 - r0, big_w), mode="bilinear", align_corners=False)
        a, b = rows[0][:, lo[y0:y1] - r0], rows[0][:, hi[y0:y1] - r0]  # (K, n, W) each
        frac = lam[y0:y1].view(1, -1, 1)
        yield y0, (1 - frac) * a + frac * b


def upsample_argmax_confidence(logits, out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`upsample_argmax`'s class map (uint8 when K <= 256, else uint16) and each pixel's confidence: the softmax
    probability of its class, i.e. max over K of softmax(upsampled logits), float32 in (0, 1]. Sizes above
    TILE_ABOVE_BYTES are computed in row tiles (`upsampled_rows`), as `upsample_argmax` does."""
    t = _to_tensor(logits)
    if t.dim() == 3:
        t = t[None]
    hw = tuple(int(v) for v in out_hw)
    cls = np.empty(hw, np.uint8 if t.shape[1] <= 256 else np.uint16)
    conf = np.empty(hw, np.float32)
    if _tiled(t.shape[1], hw):
        chunks = upsampled_rows(t, hw)
    else:
        up = t if tuple(t.shape[-2:]) == hw else F.interpolate(t, size=hw, mode="bilinear", align_corners=False)
        chunks = [(0, up[0])]
    for y0, rows in chunks:
        n = rows.shape[1]
        cls[y0:y0 + n] = rows.numpy().argmax(0)
        top = rows.amax(0, keepdim=True)
        conf[y0:y0 + n] = (1.0 / torch.exp(rows - top).sum(0)).numpy()  # softmax at the argmax: 1 / sum exp(l - max)
    return cls, conf


def predict_label_map(predict_logits: PredictFn, image: np.ndarray, input_hw, mean: Sequence[float],
                      std: Sequence[float]) -> np.ndarray:
    """The protocol for one RGB uint8 image: returns its (H, W) class map at the image's own size
    (uint8 when K <= 256, else uint16)."""
    x = preprocess(image, input_hw, mean, std)[None]
    logits = _to_tensor(predict_logits(x))
    pred = upsample_argmax(logits, image.shape[:2])
    return pred.astype(np.uint8 if logits.shape[1] <= 256 else np.uint16)


def torch_predictor(model: torch.nn.Module, device: str | torch.device | None = None) -> PredictFn:
    """Wrap an nn.Module as `predict_logits`: numpy float32 (N,3,H,W) -> numpy float32 logits (N,K,h,w),
    in eval mode under no_grad, on `device` (default: the model's parameters' device)."""
    model.eval()
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    else:
        device = torch.device(device)
        model.to(device)

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.as_tensor(np.asarray(x, np.float32), device=device))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().cpu().numpy()

    return predict


def _loader(dataset, input_hw, mean, std, workers: int = 2):
    """Yield (index, preprocessed image, label) in order, decoding ahead on a couple of threads (OpenCV
    releases the GIL). Bad pairs (dataset.get -> None with skip_bad) are left out."""
    get = getattr(dataset, "get", None) or dataset.__getitem__

    def work(i):
        item = get(i)
        if item is None:
            return None
        img, lab = item
        return i, preprocess(img, input_hw, mean, std), np.asarray(lab)

    n = len(dataset)
    if workers <= 1 or n <= 1:
        for i in range(n):
            r = work(i)
            if r is not None:
                yield r
        return
    with ThreadPoolExecutor(workers) as ex:
        ahead = 2 * workers
        futs = [ex.submit(work, i) for i in range(min(ahead, n))]
        nxt = len(futs)
        while futs:
            r = futs.pop(0).result()
            if nxt < n:
                futs.append(ex.submit(work, nxt))
                nxt += 1
            if r is not None:
                yield r


def evaluate(predict_logits: PredictFn, dataset, input_hw, mean: Sequence[float], std: Sequence[float],
             batch_size: int = 1, progress: bool = True, num_classes: int | None = None,
             ignore_index: int | None = None) -> dict[str, Any]:
    """Run the protocol (module docstring) over `dataset` and return the metrics dict + `num_images`, `skipped`.

    num_classes/ignore_index default to `dataset.info`; a model whose logits have a different number of
    classes is a DataError naming the dataset.
    """
    from tqdm import tqdm

    info = getattr(dataset, "info", None)
    k = int(num_classes if num_classes is not None else info.num_classes)
    ignore = int(ignore_index if ignore_index is not None else info.ignore_index)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    metrics = SegMetrics(k, ignore)
    n_img = 0
    bar = tqdm(total=len(dataset), desc="eval", unit="img", disable=not progress, leave=False)
    batch: list[tuple[int, np.ndarray, np.ndarray]] = []

    def flush():
        nonlocal n_img
        x = np.stack([b[1] for b in batch])
        logits = _to_tensor(predict_logits(x))
        if logits.dim() != 4 or logits.shape[0] != len(batch):
            raise ValueError(f"predict_logits returned shape {tuple(logits.shape)} for input {x.shape}; "
                             "expected (N, K, h, w)")
        if logits.shape[1] != k:
            raise DataError(f"{getattr(dataset, 'root', 'dataset')}: the model predicts {logits.shape[1]} classes "
                            f"but the dataset has {k}")
        for (_, _, lab), lg in zip(batch, logits):
            if _tiled(k, lab.shape[:2]):  # a huge image: class map and confusion counts a row tile at a time
                for y0, rows in argmax_tiles(lg, lab.shape[:2]):
                    metrics.update(rows, lab[y0:y0 + len(rows)])
            else:
                metrics.update(upsample_argmax(lg, lab.shape[:2]), lab)
        n_img += len(batch)
        bar.update(len(batch))
        batch.clear()

    try:
        for item in _loader(dataset, input_hw, mean, std):
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        bar.close()
    skipped = int(getattr(dataset, "skipped", 0))
    if n_img == 0:
        raise DataError(f"{getattr(dataset, 'root', 'dataset')}: no image could be evaluated"
                        + (f" ({skipped} bad pairs skipped)" if skipped else ""))
    out = metrics.compute()
    out["num_images"] = n_img
    out["skipped"] = skipped
    return out
