"""Training data: open a split (dataset folder, `.npz` pack or dataset object) and decode it once into uint8
tensors that the training loop indexes and augments as batches on the device."""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from edgeseg.data.transforms import resize_label
from edgeseg.errors import DataError


def open_split(data, split: str, fmt: str | None = None, skip_bad: bool = False):
    """A dataset folder (any layout open_dataset reads) or a `.npz` pack; a dataset object passes through."""
    if not isinstance(data, (str, os.PathLike)):
        return data
    from edgeseg.train.pack import is_pack, open_pack

    if is_pack(data):
        return open_pack(data, split)
    from edgeseg.data.formats import open_dataset

    return open_dataset(data, split=split, fmt=fmt, skip_bad=skip_bad)


def preload(ds, num_workers: int = 0, data_hw: tuple[int, int] | None = None, progress: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole split into `images` uint8 (N,H,W,3) and `labels` (N,H,W) (uint8, or int16 when the
    class indices need it). Pairs of different sizes are resized to `data_hw` (image bilinear, label nearest);
    without `data_hw` they must all have one size."""
    import cv2
    from tqdm import tqdm

    n = len(ds)
    if n == 0:
        raise DataError(f"{getattr(ds, 'root', 'dataset')}: the training split is empty")
    getter = ds.get if hasattr(ds, "get") else ds.__getitem__

    def load(i):
        item = getter(i)
        if item is None:
            return None
        img, lab = item
        if data_hw is not None and tuple(img.shape[:2]) != tuple(data_hw):
            img = cv2.resize(img, (data_hw[1], data_hw[0]), interpolation=cv2.INTER_LINEAR)
            lab = resize_label(np.asarray(lab), tuple(data_hw))
        return img, np.asarray(lab)

    bar = tqdm(total=n, desc="loading train split", unit="img", disable=not progress, file=sys.stderr)
    items = []
    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as ex:  # OpenCV decodes without the GIL
            for it in ex.map(load, range(n)):
                items.append(it)
                bar.update()
    else:
        for i in range(n):
            items.append(load(i))
            bar.update()
    bar.close()
    items = [it for it in items if it is not None]
    if not items:
        raise DataError(f"{getattr(ds, 'root', 'dataset')}: no readable training pairs")
    shapes = {it[0].shape[:2] for it in items}
    if len(shapes) > 1:
        raise DataError(f"{getattr(ds, 'root', 'dataset')}: training images have {len(shapes)} different sizes "
                        f"(e.g. {sorted(shapes)[:3]}); pass data_hw / --data-size HxW to resize them on load")
    images = torch.from_numpy(np.stack([it[0] for it in items]))
    labels = np.stack([it[1] for it in items])
    dtype = np.uint8 if labels.max(initial=0) <= 255 and labels.min(initial=0) >= 0 else np.int16
    return images, torch.from_numpy(labels.astype(dtype))
