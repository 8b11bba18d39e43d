"""Training data: open a split (dataset folder, `.npz` pack or dataset object; several joined with '+', e.g.
"train+val") and decode it once into uint8 tensors that the training loop indexes and augments as batches on the
device; refuse a training split that overlaps the splits it is scored on; the class frequencies of the training
labels and the class weights made from them (`--class-weights enet`, cached in the run folder)."""
from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from edgeseg.data.transforms import resize_label
from edgeseg.errors import DataError, UsageError

log = logging.getLogger(__name__)


def open_split(data, split: str, fmt: str | None = None, skip_bad: bool = False):
    """A dataset folder (any layout open_dataset reads) or a `.npz` pack; a dataset object passes through.
    `split` may join several with '+' ("train+val"): their pairs one after the other (`ConcatSplit`)."""
    if not isinstance(data, (str, os.PathLike)):
        return data
    names = split_names(split)
    if len(names) > 1:
        return ConcatSplit([open_split(data, s, fmt, skip_bad) for s in names], split)
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


# ------------------------------------------------------------------------------------------ several splits

def split_names(split: str | None) -> list[str]:
    """'train+val' -> ['train', 'val']; UsageError for an empty or repeated part."""
    if not split:
        return []
    names = [s.strip() for s in str(split).split("+")]
    if not all(names) or len(set(names)) != len(names):
        raise UsageError(f"--train-split {split}: expected split names joined by '+', each once (e.g. train+val)")
    return names


class ConcatSplit:
    """Several splits of one dataset read as one (`ds[i]`, `ds.get(i)`, `info`, `image_paths` of all parts)."""

    def __init__(self, parts: list, split: str):
        first = parts[0].info
        for ds in parts[1:]:
            i = ds.info
            if (i.num_classes, i.ignore_index, tuple(i.class_names)) != (first.num_classes, first.ignore_index,
                                                                         tuple(first.class_names)):
                raise DataError(f"--train-split {split}: split {getattr(ds, 'split', '?')!r} has other classes "
                                f"than {getattr(parts[0], 'split', '?')!r}")
        self.parts, self.split, self.info = parts, split, first
        self.root = getattr(parts[0], "root", None)
        self.image_paths = [p for ds in parts for p in getattr(ds, "image_paths", [])]
        self._starts = np.cumsum([0] + [len(ds) for ds in parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int):
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k], i - int(self._starts[k])

    def get(self, i: int):
        ds, j = self._locate(i)
        return ds.get(j) if hasattr(ds, "get") else ds[j]

    def __getitem__(self, i: int):
        ds, j = self._locate(i)
        return ds[j]


def _image_keys(ds) -> set[str]:
    """What identifies a pair across splits: the resolved image path; in a pack, the pack and the file name."""
    keys = set()
    for p in getattr(ds, "image_paths", None) or ():
        s = str(p)
        if "::" in s:
            pack, rest = s.split("::", 1)
            keys.add(pack + "::" + rest.split("/", 1)[-1])
        else:
            keys.add(str(Path(s).resolve()))
    return keys


def check_disjoint(train_split: str, train_ds, others: dict) -> None:
    """Refuse (one line) a training split that shares pairs with a split it is scored on. `others` = {role
    ('validation', 'holdout'): (split name, or None when read from another dataset; the dataset or None)}.
    A holdout never overlaps; a validation split not through a joined training split ('train+val' scored on
    'val'); a single training split that shares images with val (a flat folder layout reads the same pairs
    for every split) is only warned about, as before."""
    names = split_names(train_split)
    mine = _image_keys(train_ds)
    for role, (split, ds) in others.items():
        if ds is None:
            continue
        shared = len(mine & _image_keys(ds))
        if (split and split in names) or (shared and (role == "holdout" or len(names) > 1)):
            flag = "--val-split none" if role == "validation" else "another --train-split"
            raise UsageError(f"--train-split {train_split}: overlaps the {role} split "
                             f"{split or getattr(ds, 'split', '?')!r}"
                             + (f" ({shared} shared images)" if shared else "") + f"; pass {flag}")
        if shared:
            log.warning("train split %r shares %d images with the %s split %r: its scores overstate accuracy",
                        train_split, shared, role, split)


# ------------------------------------------------------------------------------------------- class weights

def class_counts(labels: torch.Tensor, num_classes: int, progress: bool = True, chunk: int = 16) -> list[int]:
    """Pixels of each class 0..K-1 in a (N, H, W) label tensor (other values, the ignore index, not counted)."""
    from tqdm import tqdm

    counts = torch.zeros(num_classes, dtype=torch.long)
    n = labels.shape[0]
    with tqdm(total=n, desc="class frequencies", unit="img", disable=not progress, file=sys.stderr) as bar:
        for i in range(0, n, chunk):
            v = labels[i:i + chunk].reshape(-1).long().cpu()
            v = v[(v >= 0) & (v < num_classes)]
            counts += torch.bincount(v, minlength=num_classes)[:num_classes]
            bar.update(min(chunk, n - i))
    return [int(c) for c in counts]


def class_weights(method: str, out: Path, labels: torch.Tensor, info, train_split: str, progress: bool = True,
                  write: bool = True) -> torch.Tensor | None:
    """The loss's class weights for `method` ('none' -> None, 'enet'), from the training labels' class
    frequencies, computed once and cached in `out/class_weights.json` (reused while it describes the same split)."""
    from edgeseg.train.losses import enet_weights

    if method in (None, "none"):
        return None
    if method != "enet":
        raise UsageError(f"--class-weights {method}: expected none or enet")
    from edgeseg.train.state import CLASS_WEIGHTS_FILE

    path = Path(out) / CLASS_WEIGHTS_FILE
    key = {"method": method, "train_split": train_split, "num_images": int(labels.shape[0]),
           "class_names": list(info.class_names)}
    cached = _read_cache(path)
    if cached is not None and all(cached.get(k) == v for k, v in key.items()):
        return torch.tensor(cached["weights"], dtype=torch.float32)
    counts = class_counts(labels, int(info.num_classes), progress)
    weights = enet_weights(counts)
    if write:
        from edgeseg.fileio import write_json

        total = max(1, sum(counts))
        write_json(path, {**key, "formula": "1 / ln(1.02 + p)", "counts": counts,
                          "frequency": [c / total for c in counts], "weights": weights})
    log.info("class weights (%s): %s", method, ", ".join(f"{n} {w:.2f}" for n, w in zip(info.class_names, weights)))
    return torch.tensor(weights, dtype=torch.float32)


def _read_cache(path: Path) -> dict | None:
    import json

    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) and isinstance(d.get("weights"), list) else None
    except (OSError, ValueError):
        return None
