"""The evaluation protocol, shared by `edgeseg eval`, training's validation, `validate` and the demo.

For every image/label pair of the dataset, in order:
1. `preprocess`: OpenCV bilinear resize of the RGB image to `input_hw` (H, W), `(x - mean) / std` with
   mean/std on the 0..255 scale, float32 (3, H, W); `batch_size` of those are stacked to (N, 3, H, W).
2. `predict_logits(x) -> (N, K, h, w)` (any stride; numpy or torch).
3. Per image, the logits are upsampled to the *label's* size with bilinear interpolation
   (`F.interpolate(..., mode="bilinear", align_corners=False)`, float32) and argmax'ed over K.
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


def _to_tensor(logits) -> torch.Tensor:
    t = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
    return t.detach().float().cpu()


def upsample_argmax(logits, out_hw: tuple[int, int]) -> np.ndarray:
    """(K, h, w) or (1, K, h, w) logits -> (H, W) int64 class map: bilinear upsample to out_hw
    (`F.interpolate`, align_corners=False, float32), then argmax over K (first maximum on ties)."""
    t = _to_tensor(logits)
    if t.dim() == 3:
        t = t[None]
    if tuple(t.shape[-2:]) != tuple(out_hw):
        t = F.interpolate(t, size=tuple(int(v) for v in out_hw), mode="bilinear", align_corners=False)
    return t[0].numpy().argmax(0)  # numpy's argmax over the leading axis is ~4x faster than torch's on CPU


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
