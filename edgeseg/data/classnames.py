"""Class-name lists of the usual benchmark datasets (for `edgeseg import --classes NAME`) and a default palette.

Names and order follow mmsegmentation's dataset definitions, so an official checkpoint's class indices map
onto them. Cityscapes and ADE20K use their reader's colours (official / mmseg); the others use `default_palette` (PASCAL VOC's bit-spread
colour map), which is deterministic for any number of classes.
"""
from __future__ import annotations

from pathlib import Path

from edgeseg.data.datasets import ADE20K_INFO, CITYSCAPES_INFO
from edgeseg.errors import UsageError

# ADE20K and Cityscapes come with their dataset readers (names, palettes); one copy of each table.
ADE20K = ADE20K_INFO.class_names
CITYSCAPES = CITYSCAPES_INFO.class_names
CITYSCAPES_PALETTE = CITYSCAPES_INFO.palette

COCO_STUFF = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge",
    "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile",
    "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff",
    "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road",
    "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other",
    "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)

PASCAL_CONTEXT_59 = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor",
    "wall", "water", "window", "wood",
)

# name -> (class names, ignore index used by that benchmark)
CLASS_LISTS: dict[str, tuple[tuple[str, ...], int]] = {
    "ade20k": (ADE20K, 255),
    "cityscapes": (CITYSCAPES, 255),
    "coco-stuff": (COCO_STUFF, 255),
    "pascal-context": (PASCAL_CONTEXT_59, 255),
}


def default_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """PASCAL VOC's colour map, skipping black (index 0 there is background): n distinct RGB colours."""
    out = []
    i = 1
    while len(out) < n:
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
        i += 1
    return tuple(out)


def palette_for(names: str) -> tuple[tuple[int, int, int], ...]:
    if names == "cityscapes":
        return CITYSCAPES_PALETTE
    if names == "ade20k":
        return ADE20K_INFO.palette
    return default_palette(len(CLASS_LISTS[names][0]))


def resolve_classes(spec: str, num_classes: int | None = None
                    ) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...], int]:
    """`spec` is a known list name or a text file (one class name per line; blank lines and `#` comments
    skipped). Returns (names, palette, ignore_index). Checks the count against `num_classes` when given."""
    if spec in CLASS_LISTS:
        names, ignore = CLASS_LISTS[spec]
        palette = palette_for(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--classes {spec}: neither a known list ({', '.join(CLASS_LISTS)}) nor a file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--classes {spec}: cannot read ({e})") from None
        names = tuple(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))
        if not names:
            raise UsageError(f"--classes {spec}: no class names in the file")
        palette, ignore = default_palette(len(names)), 255
    if num_classes is not None and len(names) != num_classes:
        raise UsageError(f"--classes {spec}: has {len(names)} names but the checkpoint has {num_classes} classes")
    return tuple(names), palette, ignore
