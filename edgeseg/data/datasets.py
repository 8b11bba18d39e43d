"""Public entry to the dataset readers: `open_dataset(root, split, fmt=None, skip_bad=False) -> SegDataset`.

The code lives by job in `formats` (layouts, held-out splits, detection), `decoding` (reading one image or
mask, extensions, pairing), `segdataset` (SegDataset) and `classes` (class names and palettes); this module
re-exports their public names so `from edgeseg.data.datasets import ...` keeps working.
"""
from __future__ import annotations

from edgeseg.data.classes import (
    ADE20K_INFO,
    CAMVID_INFO,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_INFO,
    VOC_INFO,
    voc_palette,
)
from edgeseg.data.decoding import IMAGE_EXTS, LABEL_EXTS, read_image, read_label
from edgeseg.data.formats import (
    FOLDER_IGNORE,
    FORMATS,
    HOLDOUT_RULES,
    HoldoutRule,
    detect_format,
    holdout_splits,
    open_dataset,
    reads_holdout,
)
from edgeseg.data.segdataset import SegDataset

__all__ = [
    "ADE20K_INFO", "CAMVID_INFO", "CITYSCAPES_ID_TO_TRAINID", "CITYSCAPES_INFO", "FOLDER_IGNORE", "FORMATS",
    "HOLDOUT_RULES", "IMAGE_EXTS", "LABEL_EXTS", "VOC_INFO", "HoldoutRule", "SegDataset", "detect_format",
    "holdout_splits", "open_dataset", "read_image", "read_label", "reads_holdout", "voc_palette",
]
