"""Dataset layouts: CamVid (SegNet layout), a generic images/masks folder pair, Pascal VOC, Cityscapes, ADE20K.

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

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseg.data.classes import (
    ADE20K_INFO,
    CAMVID_INFO,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_INFO,
    VOC_INFO,
    voc_palette,
)
from edgeseg.data.decoding import IMAGE_EXTS, LABEL_EXTS, identity_lut, list_files, pair_files, read_label
from edgeseg.data.segdataset import SegDataset
from edgeseg.errors import DataError
from edgeseg.types import DatasetInfo

log = logging.getLogger(__name__)

FORMATS = ("camvid", "folder", "voc", "cityscapes", "ade20k")
FOLDER_IGNORE = 255

# ------------------------------------------------------------------------------------------- held-out splits

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


# --------------------------------------------------------------------------------------------- split folders

_SPLIT_ALIASES = {"val": ("val", "validation", "valid"), "train": ("train", "training"),
                  "test": ("test", "testing")}


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
    images = list_files(img_dir, IMAGE_EXTS)
    _nonempty(images, img_dir, split)
    images, note = _apply_holdout("camvid", split, img_dir, images)
    _nonempty(images, img_dir, split)
    ims, labs, probs = pair_files(images, lambda p: [ann_dir / (p.stem + e) for e in LABEL_EXTS], skip_bad, img_dir)
    return SegDataset(root, split, "camvid", CAMVID_INFO, ims, labs, identity_lut(11, 11), skip_bad, probs,
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
    images = list_files(img_dir, IMAGE_EXTS)
    _nonempty(images, img_dir, split)
    ims, labs, probs = pair_files(images, lambda p: [mask_dir / (p.stem + e) for e in LABEL_EXTS], skip_bad, img_dir)

    classes_txt = root / "classes.txt"
    if classes_txt.is_file():
        names, palette = _read_classes_txt(classes_txt)
    else:
        top = -1
        for m in list_files(mask_base, LABEL_EXTS, recursive=True):
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
    return SegDataset(root, split, "folder", info, ims, labs, identity_lut(len(names), FOLDER_IGNORE), skip_bad,
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
    ims, labs, probs = pair_files(images, lambda p: [seg_dir / (p.stem + ".png")], skip_bad, list_file)
    return SegDataset(root, split, "voc", VOC_INFO, ims, labs, identity_lut(21, 255), skip_bad, probs,
                      "valid: 0..20, 255 = ignore")


def _open_cityscapes(root: Path, split: str, skip_bad: bool) -> SegDataset:
    img_base, gt_base = root / "leftImg8bit" / split, root / "gtFine" / split
    if not img_base.is_dir():
        raise DataError(f"{img_base}: split {split!r} not found (Cityscapes layout: leftImg8bit/{split}/<city>/)")
    if not gt_base.is_dir():
        raise DataError(f"{gt_base}: missing annotation folder for split {split!r} (Cityscapes gtFine)")
    images = [p for p in list_files(img_base, (".png", ".jpg"), recursive=True) if p.stem.endswith("_leftImg8bit")]
    _nonempty(images, img_base, split)

    def label_for(p: Path) -> list[Path]:
        stem = p.stem[: -len("_leftImg8bit")]
        return [gt_base / p.parent.relative_to(img_base) / f"{stem}_gtFine_labelIds.png"]

    ims, labs, probs = pair_files(images, label_for, skip_bad, img_base)
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
    images = list_files(img_dir, IMAGE_EXTS)
    _nonempty(images, img_dir, split)
    ims, labs, probs = pair_files(images, lambda p: [ann_dir / (p.stem + ".png")], skip_bad, img_dir)
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
