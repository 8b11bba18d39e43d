"""Dataset readers: CamVid (SegNet layout), a generic images/masks folder pair, Pascal VOC, Cityscapes, ADE20K.

`open_dataset(root, split, fmt=None, skip_bad=False)` detects the layout (or takes `fmt`) and returns a
`SegDataset`: `ds[i] -> (image uint8 (H,W,3) RGB, label int64 (H,W))` with labels already mapped to
0..K-1 plus the dataset's ignore index; `ds.info` (class names, palette, ignore index) travels into every
checkpoint and artifact.

Layouts (`root` is the folder given to `--data`):

- `camvid`: `{train,val,test}/*.jpg|png` with labels of the same stem in `{split}annot/*.png`; 11 classes,
  ignore index 11 (Unlabelled). Held-out sequence (`HOLDOUT_RULES`): split `holdout` is the whole sequence
  0006R0 (the file-name prefix; 101 pairs in the SegNet train/ folder), read from `train/`; split `train` then
  EXCLUDES it (266 of the 367 pairs; logged as "train: 266 pairs, sequence 0006R0 held out as 'holdout'"
  and shown in the dataset's repr), so nothing that trains or calibrates on `train` sees holdout images.
  Split `train-all` reads every pair of `train/` (holdout included: the SegNet train split). val (all
  0016E5, a sequence that also supplies 204 train pairs) overstates accuracy on unseen streets; holdout
  does not. A `train/` folder without 0006R0 files is read whole as `train`, and has no `holdout`.
- `folder`: `images/` and `masks/` (or `labels/`, `annotations/`), either flat (the same pairs for every
  split) or with one subfolder per split (`images/val/`, `masks/val/`). Masks are single-channel class-index
  PNGs, 255 = ignore. Class names come from `root/classes.txt` (one class per line, optionally followed by
  `R G B` for its colour; `#` starts a comment); without it the classes are `class0..classN` where N is the
  largest label value (other than 255) found in every mask under the mask folder (all splits, read once at
  open, so train and val agree).
- `voc`: `JPEGImages/`, `SegmentationClass/` (or `SegmentationClassAug/`), `ImageSets/Segmentation/{split}.txt`;
  21 classes, 255 = ignore (the object boundaries). Palette PNGs are read as their indices.
- `cityscapes`: `leftImg8bit/{split}/{city}/*_leftImg8bit.png` and `gtFine/{split}/{city}/*_gtFine_labelIds.png`;
  the 34 label ids map to the 19 train ids, every other id to 255.
- `ade20k`: `images/{training,validation}/*.jpg`, `annotations/{training,validation}/*.png` (`split` "train" or
  "val" map to those names); `reduce_zero_label`: 0 ("other") -> 255, k -> k-1; 150 classes.

Bad input raises `DataError` with one line naming the file and the problem: an unreadable or truncated image,
a mask whose size differs from its image, label values outside the classes other than the ignore value, an
RGB colour mask where an index mask is expected, an image without a label, an empty split, a missing
annotation folder. With `skip_bad=True` a bad pair is logged as a warning and counted in `ds.skipped`
instead. Items are validated lazily when read; `ds.check()` scans every pair up front.
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from edgeseg.errors import DataError
from edgeseg.types import DatasetInfo

log = logging.getLogger(__name__)

FORMATS = ("camvid", "folder", "voc", "cityscapes", "ade20k")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXTS = (".png", ".bmp", ".tif", ".tiff")

# --------------------------------------------------------------------------------------------- class tables

CAMVID_INFO = DatasetInfo(
    name="camvid",
    class_names=("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                 "Pedestrian", "Bicyclist"),
    palette=((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
             (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)),
    ignore_index=11,
)


def voc_palette(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The Pascal VOC colour map (bit-interleaved), also used for generic folders without colours."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return tuple(out)


VOC_INFO = DatasetInfo(
    name="voc",
    class_names=("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                 "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                 "train", "tvmonitor"),
    palette=voc_palette(21),
    ignore_index=255,
)

CITYSCAPES_INFO = DatasetInfo(
    name="cityscapes",
    class_names=("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                 "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                 "bicycle"),
    palette=((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
             (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
             (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)),
    ignore_index=255,
)
# Cityscapes label id -> train id (cityscapesScripts' labels.py); every other id in 0..33 -> 255.
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

ADE20K_INFO = DatasetInfo(
    name="ade20k",
    class_names=(
        "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
        "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
        "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
        "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
        "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
        "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
        "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
        "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
        "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
        "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
        "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
        "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
        "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
        "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
        "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
        "glass", "clock", "flag"),
    palette=(
        (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
        (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61),
        (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
        (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230),
        (220, 220, 220), (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71),
        (255, 41, 10), (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8),
        (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
        (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
        (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0),
        (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0),
        (194, 255, 0), (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255),
        (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0),
        (255, 0, 20), (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
        (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163),
        (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0),
        (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255),
        (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255),
        (153, 0, 255), (71, 255, 0), (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0),
        (255, 0, 235), (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255),
        (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
        (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
        (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255)),
    ignore_index=255,
)

FOLDER_IGNORE = 255


@dataclass(frozen=True)
class HoldoutRule:
    """A split carved out of another split's folder: every file of one recorded sequence (the file-name
    prefix before the first `_`). Split `source` then excludes it; split `all_split` reads the folder whole."""

    split: str       # name of the held-out split
    source: str      # split folder it is taken from (and which no longer contains it)
    sequence: str    # file-name prefix: CamVid names are <sequence>_<frame>
    all_split: str   # name for the whole source folder, held-out sequence included

    def member(self, p: Path) -> bool:
        return p.name.startswith(self.sequence + "_")


# dataset format -> its held-out splits. The only place that decides what is held out.
HOLDOUT_RULES: dict[str, tuple[HoldoutRule, ...]] = {
    "camvid": (HoldoutRule(split="holdout", source="train", sequence="0006R0", all_split="train-all"),),
}


def holdout_splits(fmt: str) -> tuple[str, ...]:
    """Names of the held-out splits of a layout (() when it has none)."""
    return tuple(r.split for r in HOLDOUT_RULES.get(fmt, ()))


def reads_holdout(fmt: str, split: str) -> bool:
    """Whether split `split` of layout `fmt` contains held-out images (the holdout itself or the `-all` split)."""
    return any(split in (r.split, r.all_split) for r in HOLDOUT_RULES.get(fmt, ()))


def _apply_holdout(fmt: str, split: str, folder: Path, images: list[Path]) -> tuple[list[Path], str]:
    """`images` of split folder `folder` narrowed by the layout's HOLDOUT_RULES for `split`, and a note
    ("" when nothing is held out). DataError for a held-out split with no image of its sequence."""
    for r in HOLDOUT_RULES.get(fmt, ()):
        if split == r.split:
            kept = [p for p in images if r.member(p)]
            if not kept:
                raise DataError(f"{folder}: split {split!r} not found (no image of sequence {r.sequence} "
                                f"({r.sequence}_*) in {r.source}/)")
            return kept, f"sequence {r.sequence} of {r.source}/"
        if split == r.source:
            kept = [p for p in images if not r.member(p)]
            if len(kept) < len(images):
                note = f"sequence {r.sequence} held out as {r.split!r}"
                log.info("%s: %d pairs, %s (%d pairs; split %r reads all %d)", split, len(kept), note,
                         len(images) - len(kept), r.all_split, len(images))
                return kept, note
    return images, ""
_SPLIT_ALIASES = {"val": ("val", "validation", "valid"), "train": ("train", "training"),
                  "test": ("test", "testing")}


# ------------------------------------------------------------------------------------------------ decoding

def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise DataError(f"{path}: empty file (0 bytes)")
    return data


def _truncation(data: bytes) -> str | None:
    """A reason if a JPEG/PNG byte string is cut short (OpenCV decodes a truncated JPEG without failing)."""
    if data[:3] == b"\xff\xd8\xff":  # JPEG: the last scan must be followed by the end-of-image marker
        sos, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
        if sos < 0 or eoi < sos:
            return "truncated JPEG (no end-of-image marker after the last scan)"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if data.rfind(b"IEND") < max(data.rfind(b"IDAT"), 8):
            return "truncated PNG (no IEND chunk after the image data)"
    return None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3) with OpenCV; DataError naming the file if it is not one."""
    path = Path(path)
    data = _read_bytes(path)
    why = _truncation(data)
    if why:
        raise DataError(f"{path}: {why}")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except (cv2.error, ValueError, OverflowError, MemoryError) as e:
        raise DataError(f"{path}: unreadable image ({str(e).strip().splitlines()[-1] if str(e).strip() else e})") \
            from None
    if img is None or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise DataError(f"{path}: unreadable image (not a valid or supported image file)")
    if img.dtype != np.uint8:  # IMREAD_COLOR gives 8-bit, but be explicit
        img = cv2.convertScaleAbs(img)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _is_palette_png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[12:16] == b"IHDR" and data[25] == 3


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a class-index mask (H, W) uint8/uint16 as stored (no mapping). OpenCV IMREAD_UNCHANGED; palette
    PNGs (VOC) are read as their palette indices (Pillow), since OpenCV would expand them to colours.

    DataError for an unreadable/truncated file or an RGB colour mask (a 3-channel mask whose channels differ).
    """
    path = Path(path)
    data = _read_bytes(path)
    why = _truncation(data)
    if why:
        raise DataError(f"{path}: {why}")
    if _is_palette_png(data):
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                im.load()
                lab = np.array(im)
        except Exception as e:  # Pillow raises many types for corrupt data
            raise DataError(f"{path}: unreadable label PNG ({type(e).__name__}: {str(e)[:80]})") from None
        if lab.ndim != 2:
            raise DataError(f"{path}: unreadable label PNG (unexpected palette image shape {lab.shape})")
    else:
        try:
            lab = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        except (cv2.error, ValueError, OverflowError, MemoryError) as e:
            raise DataError(f"{path}: unreadable label image ({str(e).strip()[:80]})") from None
        if lab is None or lab.size == 0:
            raise DataError(f"{path}: unreadable label image (not a valid or supported image file)")
    if lab.ndim == 3:
        ch = lab.shape[2]
        first = lab[..., 0]
        colour = lab[..., :3] if ch >= 3 else lab[..., :1]
        if ch >= 3 and not (np.array_equal(first, colour[..., 1]) and np.array_equal(first, colour[..., 2])):
            raise DataError(f"{path}: RGB colour mask ({lab.shape[1]}x{lab.shape[0]}x{ch}); expected a "
                            "single-channel class-index mask (one class id per pixel)")
        lab = np.ascontiguousarray(first)
    if lab.ndim != 2:
        raise DataError(f"{path}: unreadable label image (unexpected shape {lab.shape})")
    if lab.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: label image has pixel type {lab.dtype}; expected 8- or 16-bit class indices")
    return lab


# ------------------------------------------------------------------------------------------------- dataset

class SegDataset:
    """Image/label pairs of one split, read lazily and validated on read.

    `ds[i] -> (image uint8 (H,W,3) RGB, label int64 (H,W))`. Attributes: `info` (DatasetInfo), `fmt`, `root`,
    `split`, `image_paths`, `label_paths`, `skip_bad`, `skipped` (bad pairs met so far, including images
    without a label found at open), `problems` (their one-line messages).

    Reading a bad pair raises DataError. With `skip_bad=True`:
    - `ds.get(i)` logs a warning, counts the pair in `skipped` and returns None (evaluation uses this, so a
      bad pair is left out of the metrics, never replaced);
    - `ds[i]` returns the next good pair instead (for training loaders that need an item per index);
    - `ds.check()` drops every bad pair, so `len(ds)` then counts only good ones.
    Counts made inside DataLoader worker processes stay in those processes.
    """

    def __init__(self, root: Path, split: str, fmt: str, info: DatasetInfo, image_paths: Sequence[Path],
                 label_paths: Sequence[Path], lut: np.ndarray, skip_bad: bool = False,
                 problems: Sequence[str] = (), raw_valid: str = "", note: str = ""):
        self.root = Path(root)
        self.split = split
        self.note = note  # e.g. which sequence this split holds out (HOLDOUT_RULES); "" when none
        self.fmt = fmt
        self.info = info
        self.image_paths = list(image_paths)
        self.label_paths = list(label_paths)
        self.skip_bad = skip_bad
        self.problems: list[str] = list(problems)
        self.skipped = len(self.problems)
        self._n_open_problems = len(self.problems)  # images without a label, found at open
        self._lut = lut  # raw label value -> class index / ignore, -1 = invalid
        self._raw_valid = raw_valid
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return (f"SegDataset({self.fmt}, {str(self.root)!r}, split={self.split!r}, {len(self)} pairs, "
                f"{self.info.num_classes} classes, ignore {self.info.ignore_index}"
                + (f"; {self.note}" if self.note else "") + ")")

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def map_label(self, raw: np.ndarray, path: Path | str = "label") -> np.ndarray:
        """Raw stored label values -> int64 class indices / ignore; DataError naming the bad values."""
        lut = self._lut
        if raw.max(initial=0) >= len(lut):
            bad = np.unique(raw[raw >= len(lut)])
        else:
            lab = lut[raw]
            if lab.min(initial=0) >= 0:
                return lab
            bad = np.unique(raw[lab < 0])
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise DataError(f"{path}: label values {shown} outside the {self.info.num_classes} classes of "
                        f"{self.fmt} ({self._raw_valid})")

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Read and validate pair `i`; DataError if it is bad (whatever skip_bad says)."""
        ipath, lpath = self.image_paths[i], self.label_paths[i]
        img = read_image(ipath)
        raw = read_label(lpath)
        if raw.shape != img.shape[:2]:
            raise DataError(f"{lpath}: mask size {raw.shape[1]}x{raw.shape[0]} differs from its image "
                            f"{ipath.name} ({img.shape[1]}x{img.shape[0]})")
        return img, self.map_label(raw, lpath)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Pair `i`, or None for a bad pair when skip_bad is set (warned once and counted in `skipped`)."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i in self._bad:
            return None
        try:
            return self.load(i)
        except DataError as e:
            if not self.skip_bad:
                raise
            self._mark_bad(i, str(e))
            return None

    def _mark_bad(self, i: int, msg: str) -> None:
        if i not in self._bad:
            self._bad.add(i)
            self.skipped += 1
            self.problems.append(msg)
            log.warning("skipping bad pair: %s", msg)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        for k in range(n):
            item = self.get((i + k) % n)
            if item is not None:
                return item
        raise DataError(f"{self.root}: every pair of split {self.split!r} is bad ({self.skipped} skipped)")

    def __iter__(self):
        for i in range(len(self)):
            item = self.get(i)
            if item is not None:
                yield item

    def check(self, progress: bool = True) -> int:
        """Read every pair now and return the number of bad pairs (images without a label found at open
        included). Each problem is logged as a warning and kept in `problems`; it never raises for a bad
        pair. With skip_bad, bad pairs are dropped from the dataset afterwards and the count is every pair
        skipped so far (`skipped`)."""
        from tqdm import tqdm

        n_bad = self._n_open_problems
        self.problems = self.problems[: self._n_open_problems] + [
            p for p in self.problems[self._n_open_problems:] if self.skip_bad]  # keep skipped ones, re-scan the rest
        for i in tqdm(range(len(self)), desc=f"checking {self.fmt}/{self.split}", unit="img",
                      disable=not progress, leave=False):
            if i in self._bad:
                n_bad += 1
                continue
            try:
                self.load(i)
            except DataError as e:
                n_bad += 1
                if self.skip_bad:
                    self._mark_bad(i, str(e))
                else:
                    self.problems.append(str(e))
                    log.warning("%s", e)
        if self.skip_bad and self._bad:
            keep = [i for i in range(len(self)) if i not in self._bad]
            self.image_paths = [self.image_paths[i] for i in keep]
            self.label_paths = [self.label_paths[i] for i in keep]
            self._bad = set()
            if not self.image_paths:
                raise DataError(f"{self.root}: every pair of split {self.split!r} is bad ({self.skipped} skipped)")
        return self.skipped if self.skip_bad else n_bad


# ------------------------------------------------------------------------------------------------- helpers

def _files(folder: Path, exts: tuple[str, ...], recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.suffix.lower() in exts and p.is_file() and not p.name.startswith("."))


def _identity_lut(num_classes: int, ignore: int, size: int = 65536) -> np.ndarray:
    lut = np.full(size, -1, np.int64)
    lut[:num_classes] = np.arange(num_classes)
    if 0 <= ignore < size:
        lut[ignore] = ignore
    return lut


def _pair(images: list[Path], label_for: Callable[[Path], list[Path]], skip_bad: bool, where: str
          ) -> tuple[list[Path], list[Path], list[str]]:
    """Match each image with its label; an image without one is an error (or a skipped, logged problem)."""
    out_i, out_l, problems = [], [], []
    for img in images:
        cands = label_for(img)
        lab = next((c for c in cands if c.is_file()), None)
        if lab is None:
            msg = f"{img}: image without a label (expected {cands[0]})"
            if not skip_bad:
                raise DataError(msg)
            log.warning("skipping: %s", msg)
            problems.append(msg)
            continue
        out_i.append(img)
        out_l.append(lab)
    if not out_i:
        raise DataError(f"{where}: no image/label pairs"
                        + (f" ({len(problems)} images without a label skipped)" if problems else ""))
    return out_i, out_l, problems


def _split_dir(base: Path, split: str) -> Path | None:
    for name in _SPLIT_ALIASES.get(split, (split,)):
        if (base / name).is_dir():
            return base / name
    return None


def _require_dir(p: Path, what: str) -> None:
    if not p.is_dir():
        raise DataError(f"{p}: missing {what} folder")


def _nonempty(images: list[Path], folder: Path, split: str) -> None:
    if not images:
        raise DataError(f"{folder}: empty split {split!r} (no images with extension "
                        f"{'/'.join(IMAGE_EXTS)})")


# ------------------------------------------------------------------------------------------------- readers

def _open_camvid(root: Path, split: str, skip_bad: bool) -> SegDataset:
    rule = next((r for r in HOLDOUT_RULES["camvid"] if split in (r.split, r.source, r.all_split)), None)
    folder = rule.source if rule else split
    img_dir, ann_dir = root / folder, root / f"{folder}annot"
    if not img_dir.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and (root / f"{p.name}annot").is_dir())
        have += [n for r in HOLDOUT_RULES["camvid"] if r.source in have for n in (r.all_split, r.split)]
        raise DataError(f"{img_dir}: split {split!r} not found (CamVid layout; splits here: "
                        f"{', '.join(have) or 'none'})")
    if not ann_dir.is_dir():
        raise DataError(f"{ann_dir}: missing annotation folder for split {split!r} (CamVid layout: "
                        f"{folder}/ images, {folder}annot/ labels)")
    images = _files(img_dir, IMAGE_EXTS)
    _nonempty(images, img_dir, split)
    images, note = _apply_holdout("camvid", split, img_dir, images)
    _nonempty(images, img_dir, split)
    ims, labs, probs = _pair(images, lambda p: [ann_dir / (p.stem + e) for e in LABEL_EXTS], skip_bad, img_dir)
    return SegDataset(root, split, "camvid", CAMVID_INFO, ims, labs, _identity_lut(11, 11), skip_bad, probs,
                      "valid: 0..10, 11 = Unlabelled/ignore", note)


def _mask_dir(root: Path) -> Path | None:
    for name in ("masks", "labels", "annotations"):
        if (root / name).is_dir():
            return root / name
    return None


def _read_classes_txt(path: Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...] | None]:
    names, colours = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) >= 4 and all(p.isascii() and p.isdigit() for p in parts[-3:]):  # not "²" (int() fails)
            rgb = tuple(int(p) for p in parts[-3:])
            if any(v > 255 for v in rgb):
                raise DataError(f"{path}:{n}: colour {rgb} outside 0..255")
            names.append(" ".join(parts[:-3]))
            colours.append(rgb)
        else:
            names.append(line)
            colours.append(None)
    if not names:
        raise DataError(f"{path}: no class names (one class per line, optionally followed by R G B)")
    pal = tuple(c if c is not None else voc_palette(len(names))[i] for i, c in enumerate(colours))
    return tuple(names), pal


def _open_folder(root: Path, split: str, skip_bad: bool) -> SegDataset:
    img_base = root / "images"
    _require_dir(img_base, "images")
    mask_base = _mask_dir(root)
    if mask_base is None:
        raise DataError(f"{root / 'masks'}: missing annotation folder (folder layout: images/ and masks/)")
    sub = _split_dir(img_base, split)
    has_subdirs = any(p.is_dir() for p in img_base.iterdir())
    if sub is not None:
        img_dir = sub
        mask_dir = mask_base / sub.name
        if not mask_dir.is_dir():
            raise DataError(f"{mask_dir}: missing annotation folder for split {split!r}")
    elif has_subdirs:
        have = sorted(p.name for p in img_base.iterdir() if p.is_dir())
        raise DataError(f"{img_base / split}: split {split!r} not found (splits here: {', '.join(have)})")
    else:
        img_dir, mask_dir = img_base, mask_base
        log.debug("%s: flat images/ folder: the same pairs serve every split", img_base)
    images = _files(img_dir, IMAGE_EXTS)
    _nonempty(images, img_dir, split)
    ims, labs, probs = _pair(images, lambda p: [mask_dir / (p.stem + e) for e in LABEL_EXTS], skip_bad, img_dir)

    classes_txt = root / "classes.txt"
    if classes_txt.is_file():
        names, palette = _read_classes_txt(classes_txt)
    else:
        top = -1
        for m in _files(mask_base, LABEL_EXTS, recursive=True):
            try:
                lab = read_label(m)
            except DataError as e:
                if not skip_bad:
                    raise
                log.warning("skipping while counting classes: %s", e)
                continue
            vals = np.unique(lab)
            vals = vals[vals != FOLDER_IGNORE]
            if len(vals):
                top = max(top, int(vals.max()))
        if top < 0:
            raise DataError(f"{mask_base}: no class found in any mask (all ignore); add a classes.txt")
        names = tuple(f"class{i}" for i in range(top + 1))
        palette = voc_palette(len(names))
        log.info("%s: no classes.txt; %d classes (0..%d) from the largest mask value", root, len(names), top)
    info = DatasetInfo(root.name or "folder", names, palette, FOLDER_IGNORE)
    return SegDataset(root, split, "folder", info, ims, labs, _identity_lut(len(names), FOLDER_IGNORE), skip_bad,
                      probs, f"valid: 0..{len(names) - 1}, 255 = ignore")


def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    return root


def _open_voc(root: Path, split: str, skip_bad: bool) -> SegDataset:
    root = _voc_root(root)
    img_dir = root / "JPEGImages"
    _require_dir(img_dir, "JPEGImages")
    seg_dir = root / "SegmentationClass"
    if not seg_dir.is_dir() and (root / "SegmentationClassAug").is_dir():
        seg_dir = root / "SegmentationClassAug"
    if not seg_dir.is_dir():
        raise DataError(f"{seg_dir}: missing annotation folder (VOC layout)")
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"{list_file}: split list not found (VOC layout: ImageSets/Segmentation/{split}.txt)")
    stems = [s.split()[0] for s in list_file.read_text(errors="replace").splitlines() if s.strip()]
    if not stems:
        raise DataError(f"{list_file}: empty split {split!r}")
    images = []
    for s in stems:
        img = next((img_dir / (s + e) for e in (".jpg", ".jpeg", ".png") if (img_dir / (s + e)).is_file()), None)
        if img is None:
            msg = f"{img_dir / (s + '.jpg')}: listed in {list_file.name} but not found"
            if not skip_bad:
                raise DataError(msg)
            log.warning("skipping: %s", msg)
            continue
        images.append(img)
    ims, labs, probs = _pair(images, lambda p: [seg_dir / (p.stem + ".png")], skip_bad, list_file)
    return SegDataset(root, split, "voc", VOC_INFO, ims, labs, _identity_lut(21, 255), skip_bad, probs,
                      "valid: 0..20, 255 = ignore")


def _open_cityscapes(root: Path, split: str, skip_bad: bool) -> SegDataset:
    img_base, gt_base = root / "leftImg8bit" / split, root / "gtFine" / split
    if not img_base.is_dir():
        raise DataError(f"{img_base}: split {split!r} not found (Cityscapes layout: leftImg8bit/{split}/<city>/)")
    if not gt_base.is_dir():
        raise DataError(f"{gt_base}: missing annotation folder for split {split!r} (Cityscapes gtFine)")
    images = [p for p in _files(img_base, (".png", ".jpg"), recursive=True) if p.stem.endswith("_leftImg8bit")]
    _nonempty(images, img_base, split)

    def label_for(p: Path) -> list[Path]:
        stem = p.stem[: -len("_leftImg8bit")]
        return [gt_base / p.parent.relative_to(img_base) / f"{stem}_gtFine_labelIds.png"]

    ims, labs, probs = _pair(images, label_for, skip_bad, img_base)
    lut = np.full(65536, -1, np.int64)
    lut[:34] = 255
    for k, v in CITYSCAPES_ID_TO_TRAINID.items():
        lut[k] = v
    lut[255] = 255
    return SegDataset(root, split, "cityscapes", CITYSCAPES_INFO, ims, labs, lut, skip_bad, probs,
                      "valid label ids: 0..33, 255")


def _ade_root(root: Path) -> Path:
    if (root / "ADEChallengeData2016" / "images").is_dir():
        return root / "ADEChallengeData2016"
    return root


def _open_ade20k(root: Path, split: str, skip_bad: bool) -> SegDataset:
    root = _ade_root(root)
    img_dir = _split_dir(root / "images", split)
    if img_dir is None:
        raise DataError(f"{root / 'images' / 'validation'}: split {split!r} not found (ADE20K layout: "
                        "images/training, images/validation)")
    ann_dir = root / "annotations" / img_dir.name
    if not ann_dir.is_dir():
        raise DataError(f"{ann_dir}: missing annotation folder for split {split!r}")
    images = _files(img_dir, IMAGE_EXTS)
    _nonempty(images, img_dir, split)
    ims, labs, probs = _pair(images, lambda p: [ann_dir / (p.stem + ".png")], skip_bad, img_dir)
    lut = np.full(65536, -1, np.int64)
    lut[0] = 255  # reduce_zero_label: 0 ("other objects") is ignored, k -> k-1
    lut[1:151] = np.arange(150)
    return SegDataset(root, split, "ade20k", ADE20K_INFO, ims, labs, lut, skip_bad, probs,
                      "valid: 0..150 before reduce_zero_label")


_OPENERS = {"camvid": _open_camvid, "folder": _open_folder, "voc": _open_voc, "cityscapes": _open_cityscapes,
            "ade20k": _open_ade20k}


def detect_format(root: str | os.PathLike) -> str:
    """The layout of `root` (one of FORMATS); DataError if none matches."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found" if not root.exists() else f"{root}: not a folder")
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    ade = _ade_root(root)
    if (ade / "images").is_dir() and any((ade / "images" / s).is_dir() for s in ("training", "validation")):
        return "ade20k"
    if (_voc_root(root) / "JPEGImages").is_dir():
        return "voc"
    if any((root / s).is_dir() or (root / f"{s}annot").is_dir() for s in ("train", "val", "test")):
        return "camvid"
    if (root / "images").is_dir():
        return "folder"
    raise DataError(f"{root}: unrecognised dataset layout; expected one of: camvid (val/ + valannot/), folder "
                    "(images/ + masks/), voc (JPEGImages/ + SegmentationClass/), cityscapes (leftImg8bit/ + "
                    "gtFine/), ade20k (images/validation + annotations/validation); or pass --format")


def open_dataset(root: str | os.PathLike, split: str = "val", fmt: str | None = None,
                 skip_bad: bool = False) -> SegDataset:
    """Open split `split` of the dataset at `root`, detecting the layout unless `fmt` forces it.

    Lists and pairs the files now (an image without a label, an empty split or a missing annotation folder
    raise DataError here); images and labels are read and validated when an item is read.
    """
    root = Path(root).expanduser()
    if fmt is not None and fmt not in FORMATS:
        from edgeseg.errors import UsageError

        raise UsageError(f"--format: unknown dataset format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found" if not root.exists() else f"{root}: not a folder")
    fmt = fmt or detect_format(root)
    try:
        return _OPENERS[fmt](root, split, skip_bad)
    except PermissionError as e:
        raise DataError(f"{e.filename or root}: permission denied") from None
