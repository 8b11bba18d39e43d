"""Pack dataset splits into one `.npz` file small enough to carry to a GPU machine (≤ 64 MiB by default).

Layout (plain uint8/int64 arrays, no pickles; `np.load(allow_pickle=False)` reads it):
- `meta`: UTF-8 JSON bytes: format version, dataset name, class names, palette, ignore index, splits, and per
  split the item names, the stored size and the image codec;
- `<split>.images` / `<split>.image_offsets`: the images one after another as encoded bytes (the original
  JPEG/PNG file bytes when no resize was asked and the source is already JPEG/PNG, else JPEG at `quality`);
- `<split>.labels` / `<split>.label_offsets`: the labels as lossless PNG bytes (class indices, resized with
  nearest neighbour only).

`edgeseg train --data FILE.npz` trains from such a file; `open_pack(path, split)` gives a dataset with the
SegDataset interface. Command line: `python -m edgeseg.train.pack DATA OUT.npz [--size HxW] [--splits train,val]`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np

from edgeseg.cli_args import parse_hw
from edgeseg.errors import ArtifactError, DataError, UsageError
from edgeseg.fileio import atomic_file
from edgeseg.types import DatasetInfo

log = logging.getLogger(__name__)

PACK_VERSION = 1


def is_pack(path) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix == ".npz"


def _encode(arr: np.ndarray, ext: str, params=()) -> np.ndarray:
    ok, buf = cv2.imencode(ext, arr, list(params))
    if not ok:
        raise DataError(f"could not encode an array of shape {arr.shape} as {ext}")
    return buf.reshape(-1)


def pack_dataset(root, out, splits=("train", "val"), size: tuple[int, int] | None = None, fmt: str | None = None,
                 quality: int = 95, force: bool = False, max_mib: float | None = 64.0, progress: bool = True,
                 skip_bad: bool = False) -> dict:
    """Pack `splits` of the dataset at `root` into `out` (.npz). `size` = (H, W) resizes every pair (image
    bilinear, label nearest); None keeps the stored size. Raises DataError if the result would exceed `max_mib`.
    Returns a summary dict (bytes per split, total MiB, items)."""
    from tqdm import tqdm

    from edgeseg.data.formats import open_dataset

    out = Path(out)
    if out.suffix != ".npz":
        raise UsageError(f"{out}: the pack file name must end in .npz")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {"format": "edgeseg-pack", "version": PACK_VERSION, "splits": {}}
    info: DatasetInfo | None = None
    total = 0
    for split in splits:
        ds = open_dataset(root, split=split, fmt=fmt, skip_bad=skip_bad)
        info = info or ds.info
        imgs, labs, names, shapes = [], [], [], []
        for i in tqdm(range(len(ds)), desc=f"packing {split}", unit="img", disable=not progress, file=sys.stderr):
            item = ds.get(i) if hasattr(ds, "get") else ds[i]
            if item is None:
                continue
            img, lab = item
            src = Path(ds.image_paths[i]) if hasattr(ds, "image_paths") else None
            lab = np.asarray(lab)
            if lab.max(initial=0) > 255 or lab.min(initial=0) < 0:
                raise DataError(f"{src}: label values outside 0..255 cannot be packed")
            lab = lab.astype(np.uint8)
            if size is not None and tuple(img.shape[:2]) != tuple(size):
                img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
                lab = cv2.resize(lab, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
                enc = _encode(img[:, :, ::-1], ".jpg", (cv2.IMWRITE_JPEG_QUALITY, int(quality)))
            elif src is not None and src.suffix.lower() in (".jpg", ".jpeg", ".png"):
                enc = np.frombuffer(src.read_bytes(), np.uint8)  # the original bytes: no re-encoding loss
            else:
                enc = _encode(img[:, :, ::-1], ".jpg", (cv2.IMWRITE_JPEG_QUALITY, int(quality)))
            imgs.append(enc)
            labs.append(_encode(lab, ".png", (cv2.IMWRITE_PNG_COMPRESSION, 9)))
            names.append(src.stem if src is not None else f"{split}_{i:05d}")
            shapes.append(list(img.shape[:2]))
        if not imgs:
            raise DataError(f"{root}: split {split!r} has no readable pairs to pack")
        for key, items in (("images", imgs), ("labels", labs)):
            offsets = np.zeros(len(items) + 1, np.int64)
            offsets[1:] = np.cumsum([len(b) for b in items])
            arrays[f"{split}.{key}"] = np.concatenate(items)
            arrays[f"{split}.{key[:-1]}_offsets"] = offsets
        nbytes = int(arrays[f"{split}.images"].nbytes + arrays[f"{split}.labels"].nbytes)
        total += nbytes
        meta["splits"][split] = {"names": names, "shapes": shapes, "bytes": nbytes}
    assert info is not None
    meta.update(name=info.name, class_names=list(info.class_names), palette=[list(c) for c in info.palette],
                ignore_index=int(info.ignore_index), size=list(size) if size else None, source=str(root))
    mib = total / 2**20
    if max_mib is not None and mib > max_mib:
        raise DataError(f"{out}: packed data would be {mib:.1f} MiB > {max_mib:g} MiB; pass a smaller --size "
                        f"or a lower --quality")
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
    with atomic_file(out, "wb") as f:
        np.savez(f, **arrays)  # the payload is already compressed (JPEG/PNG)
    summary = {"out": str(out), "mib": round(out.stat().st_size / 2**20, 2),
               "items": {s: len(meta["splits"][s]["names"]) for s in splits}}
    log.info("packed %s: %s", out, summary)
    return summary


class PackedDataset:
    """One split of a pack, with the SegDataset interface: `ds[i] -> (RGB uint8 (H,W,3), label int64 (H,W))`."""

    def __init__(self, path, split: str):
        self.path = Path(path)
        self.split = split
        try:
            with np.load(self.path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode("utf-8"))
                if meta.get("format") != "edgeseg-pack":
                    raise ArtifactError(f"{self.path}: not an edgeseg pack (no edgeseg-pack meta)")
                if split not in meta["splits"]:
                    raise DataError(f"{self.path}: no split {split!r} in the pack (has {', '.join(meta['splits'])})")
                self._images = z[f"{split}.images"]
                self._ioff = z[f"{split}.image_offsets"]
                self._labels = z[f"{split}.labels"]
                self._loff = z[f"{split}.label_offsets"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{self.path}: unreadable or truncated pack ({e})") from None
        self.meta = meta
        self.info = DatasetInfo(meta["name"], tuple(meta["class_names"]),
                                tuple(tuple(c) for c in meta["palette"]), int(meta["ignore_index"]))
        names = meta["splits"][split]["names"]
        self.image_paths = [Path(f"{self.path}::{split}/{n}") for n in names]
        self.label_paths = list(self.image_paths)
        self.fmt = "pack"
        self.root = self.path
        self.skip_bad = False
        self.skipped = 0
        self.problems: list[str] = []

    def __len__(self) -> int:
        return len(self._ioff) - 1

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def __getitem__(self, i: int):
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        img = cv2.imdecode(self._images[self._ioff[i]:self._ioff[i + 1]], cv2.IMREAD_COLOR)
        lab = cv2.imdecode(self._labels[self._loff[i]:self._loff[i + 1]], cv2.IMREAD_UNCHANGED)
        if img is None or lab is None:
            raise DataError(f"{self.image_paths[i]}: corrupted entry in the pack")
        return np.ascontiguousarray(img[:, :, ::-1]), lab.astype(np.int64)

    def get(self, i: int):
        return self[i]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def open_pack(path, split: str = "train") -> PackedDataset:
    return PackedDataset(path, split)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeseg.train.pack", description=__doc__.splitlines()[0])
    ap.add_argument("data", help="dataset folder (any layout edgeseg reads)")
    ap.add_argument("out", help="output .npz")
    ap.add_argument("--format", dest="fmt", default=None)
    ap.add_argument("--splits", default="train,val")
    ap.add_argument("--size", metavar="HxW", default=None, help="resize every pair to HxW (default: keep)")
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--max-mib", type=float, default=64.0)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        size = parse_hw(a.size, "--size", multiple_of=1)
        s = pack_dataset(a.data, a.out, tuple(a.splits.split(",")), size, a.fmt, a.quality, a.force, a.max_mib)
    except (UsageError, DataError, ArtifactError) as e:
        print(f"edgeseg: error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
