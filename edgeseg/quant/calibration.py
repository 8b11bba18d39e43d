"""Calibration sets: recipes (`calibration/*.toml`, installed as `edgeseg.calibration`) turned into the images an
int8 export or a QAT run calibrates on, with the class coverage that goes into the export manifest.

A recipe names a source dataset, a split, a count, a selection rule and a seed:

    name = "camvid-train-64"   # (str) recipe name; equals the file stem
    description = "..."        # (str) one line for listings
    source = "data"            # (str) "data": the dataset folder given at run time (--data/--calib);
                               #       "embedded": the shipped CamVid mini set; anything else: a dataset path
    format = ""                # (str) dataset layout for open_dataset ("" = auto-detect)
    split = "train"            # (str) split to draw from; default recipes draw from the training split
    count = 64                 # (int) number of images to draw
    selection = "stratified"   # (str) "random" | "stratified" (greedy cover of the classes present, rare first)
    seed = 0                   # (int) seed of the draw
    min_count = 8              # (int) refuse a set smaller than this

Rules (each a one-line `DataError`/`UsageError`): a set that shares an image with the evaluation split (same
path or same bytes) is refused; a set smaller than `min_count` is refused.

Must not import export runtimes; numpy/cv2/torch only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeseg.errors import DataError, UsageError

log = logging.getLogger(__name__)

PACKAGE = "edgeseg.calibration"
MIN_COUNT = 8
SELECTIONS = ("random", "stratified")
# key -> (type, required)
SCHEMA: dict[str, tuple[type, bool]] = {
    "name": (str, True), "description": (str, False), "source": (str, True), "format": (str, False),
    "split": (str, True), "count": (int, True), "selection": (str, True), "seed": (int, True),
    "min_count": (int, False),
}


@dataclass(frozen=True)
class Recipe:
    """A parsed calibration recipe (see the module docstring)."""

    name: str
    source: str
    split: str
    count: int
    selection: str = "stratified"
    seed: int = 0
    min_count: int = MIN_COUNT
    format: str = ""
    description: str = ""
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CalibrationSet:
    """The drawn calibration images.

    Attributes:
        arrays: preprocessed float32 arrays, each (1, 3, H, W) NCHW, normalised with the spec's mean/std.
        images: the same images as RGB uint8 (H, W, 3) at input_hw (for wrappers with in-graph normalisation).
        files: image paths, in draw order.
        class_names: the dataset's class names.
        class_pixel_share: class name -> share of labelled (non-ignore) pixels of the set, 0..1.
        classes_present / classes_missing: class names with at least one / no pixel in the set.
        recipe: the recipe (as a dict) or the explicit arguments used.
    """

    arrays: list[np.ndarray]
    images: list[np.ndarray]
    files: list[str]
    class_names: list[str]
    class_pixel_share: dict[str, float]
    classes_present: list[str]
    classes_missing: list[str]
    recipe: dict[str, Any] = field(default_factory=dict)
    input_hw: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return len(self.arrays)

    def info(self) -> dict[str, Any]:
        """The manifest's `calibration` entry."""
        return {"source": self.recipe.get("source_resolved", self.recipe.get("source")),
                "recipe": self.recipe.get("name"), "split": self.recipe.get("split"),
                "selection": self.recipe.get("selection"), "seed": self.recipe.get("seed"),
                "count": len(self), "input_hw": list(self.input_hw),
                "files": [Path(f).name for f in self.files],
                "class_pixel_share": {k: round(v, 5) for k, v in self.class_pixel_share.items()},
                "classes_present": list(self.classes_present), "classes_missing": list(self.classes_missing)}

    def to_calibration_data(self, wrapper=None):
        """`edgeseg.export.base.CalibrationData` for an exporter: float32 NCHW tensors, or, given an
        ExportWrapper, inputs in that wrapper's contract (uint8 / NHWC)."""
        import torch

        from edgeseg.export.base import CalibrationData

        if wrapper is None:
            inputs = [torch.from_numpy(a) for a in self.arrays]
        else:
            inputs = [wrapper.make_input(im) for im in self.images]
        return CalibrationData(inputs=inputs, info=self.info())


# ----------------------------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------------------------
def _recipe_files() -> dict[str, Any]:
    root = importlib.resources.files(PACKAGE)
    return {p.name[:-5]: p for p in root.iterdir() if p.name.endswith(".toml")}


def list_recipes() -> list[str]:
    """Names of every recipe shipped in calibration/ (sorted)."""
    return sorted(_recipe_files())


def parse_recipe(data: dict[str, Any], stem: str | None, where: str) -> Recipe:
    """Check a recipe dict against SCHEMA; UsageError naming the key otherwise."""
    for k in data:
        if k not in SCHEMA:
            raise UsageError(f"{where}: {k}: unknown key; known: {', '.join(SCHEMA)}")
    for k, (typ, required) in SCHEMA.items():
        if k not in data:
            if required:
                raise UsageError(f"{where}: missing key {k!r}")
            continue
        v = data[k]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise UsageError(f"{where}: {k}: expected {typ.__name__}, got {v!r}")
    if stem is not None and data["name"] != stem:
        raise UsageError(f"{where}: name: {data['name']!r} must equal the file stem {stem!r}")
    if data["selection"] not in SELECTIONS:
        raise UsageError(f"{where}: selection: {data['selection']!r} is not one of {', '.join(SELECTIONS)}")
    for k in ("count", "min_count"):
        if k in data and data[k] < 1:
            raise UsageError(f"{where}: {k}: must be at least 1, got {data[k]}")
    if data["count"] < data.get("min_count", MIN_COUNT):
        raise UsageError(f"{where}: count: {data['count']} is below min_count {data.get('min_count', MIN_COUNT)}")
    return Recipe(**{k: data[k] for k in data}, path=where)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (`camvid-train-64`) or a `.toml` file path.

    Raises:
        UsageError: unknown recipe, invalid TOML, or a recipe that does not match the schema.
    """
    p = Path(str(name_or_path))
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise UsageError(f"--calib-recipe: {p} does not exist")
        text, stem, where = p.read_text(), p.stem, str(p)
    else:
        files = _recipe_files()
        if str(name_or_path) not in files:
            raise UsageError(f"--calib-recipe: unknown recipe {name_or_path!r}; known: {', '.join(sorted(files))}")
        text, stem, where = files[str(name_or_path)].read_text(), str(name_or_path), f"calibration/{name_or_path}.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{where}: not valid TOML ({e})") from None
    return parse_recipe(data, stem, where)


# ----------------------------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------------------------
def _presence(labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(n, K) pixel counts per image and class (ignore and out-of-range values dropped)."""
    counts = np.zeros((len(labels), num_classes), dtype=np.int64)
    for i, lab in enumerate(labels):
        v = np.asarray(lab).astype(np.int64).ravel()
        v = v[(v >= 0) & (v < num_classes)]
        counts[i] = np.bincount(v, minlength=num_classes)[:num_classes]
    return counts


def class_counts(ds) -> np.ndarray:
    """(len(ds), K) pixel counts per image and class of a SegDataset (reads only the labels)."""
    from edgeseg.data.datasets import read_label

    return _presence([ds.map_label(read_label(p), p) for p in ds.label_paths], ds.info.num_classes)


def select_indices(counts: np.ndarray, count: int, selection: str, seed: int) -> list[int]:
    """Indices of `count` images out of `counts` (n, K) pixel counts.

    "random": a seeded permutation. "stratified": greedy set cover of class presence, rare classes first: each
    pick maximises sum over the classes it contains of rarity / (1 + times already covered), where rarity =
    1 / (number of images of the split holding the class); ties go to the seeded permutation's order.
    """
    n = counts.shape[0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    count = min(count, n)
    if selection == "random":
        return [int(i) for i in order[:count]]
    if selection != "stratified":
        raise UsageError(f"selection: {selection!r} is not one of {', '.join(SELECTIONS)}")
    present = counts > 0
    rarity = 1.0 / np.maximum(present.sum(0), 1)
    covered = np.zeros(counts.shape[1])
    chosen: list[int] = []
    available = np.ones(n, dtype=bool)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    for _ in range(count):
        gain = (present * (rarity / (1.0 + covered))).sum(1)
        gain[~available] = -np.inf
        best = np.flatnonzero(gain == gain.max())
        pick = int(best[np.argmin(rank[best])])
        chosen.append(pick)
        available[pick] = False
        covered += present[pick]
    return chosen


def coverage(counts: np.ndarray, class_names: Sequence[str]) -> tuple[dict[str, float], list[str], list[str]]:
    """(class -> pixel share, present classes, missing classes) of the summed (n, K) pixel counts."""
    hist = counts.sum(0)
    total = max(int(hist.sum()), 1)
    share = {class_names[k]: float(hist[k]) / total for k in range(len(class_names))}
    present = [class_names[k] for k in range(len(class_names)) if hist[k] > 0]
    missing = [class_names[k] for k in range(len(class_names)) if hist[k] == 0]
    return share, present, missing


# ----------------------------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _resolve_source(recipe: Recipe, data_root: str | Path | None) -> Path:
    if recipe.source == "embedded":
        from edgeseg.data.embedded import default_data_dir

        return default_data_dir()
    if recipe.source == "data":
        if data_root is None:
            raise UsageError(f"{recipe.path or recipe.name}: source \"data\" needs a dataset folder (--data/--calib)")
        return Path(data_root)
    return Path(recipe.source)


def check_overlap(files: Sequence[str | Path], eval_files: Sequence[str | Path], where: str) -> None:
    """DataError if a calibration image is also an evaluation image (same resolved path or same bytes)."""
    cal = {str(Path(f).resolve()): Path(f) for f in files}
    ev = {str(Path(f).resolve()) for f in eval_files}
    same = sorted(set(cal) & ev)
    if not same:
        by_size: dict[int, list[Path]] = {}
        for f in eval_files:
            by_size.setdefault(Path(f).stat().st_size, []).append(Path(f))
        for key, f in cal.items():
            cands = by_size.get(f.stat().st_size, [])
            if cands and any(_digest(c) == _digest(f) for c in cands):
                same.append(key)
    if same:
        raise DataError(f"{where}: {len(same)} calibration image(s) are in the evaluation split "
                        f"(e.g. {Path(same[0]).name}); draw calibration from another split")


def build_calibration_set(recipe: Recipe | str | Path | None = None, input_hw: Sequence[int] = (512, 512),
                          mean: Sequence[float] = (123.675, 116.28, 103.53),
                          std: Sequence[float] = (58.395, 57.12, 57.375), *, data_root: str | Path | None = None,
                          split: str | None = None, count: int | None = None, selection: str | None = None,
                          seed: int | None = None, min_count: int | None = None, fmt: str | None = None,
                          eval_split: tuple[str | Path, str] | Sequence[str | Path] | None = None,
                          progress: bool = False) -> CalibrationSet:
    """Draw a calibration set.

    Args:
        recipe: a Recipe, a recipe name/path, or None to use the explicit arguments (then data_root, split and
            count are required). Explicit arguments override the recipe's fields.
        input_hw: (H, W) the images are resized to (bilinear).
        mean, std: RGB normalisation on the 0..255 scale.
        data_root: the dataset folder for recipes with source "data" (or the source with recipe=None).
        eval_split: the evaluation split to keep apart, as (dataset root, split) or a list of image paths.
    Returns:
        CalibrationSet with `arrays` float32 (1, 3, H, W) each.
    Raises:
        DataError: the set overlaps `eval_split`, or has fewer than `min_count` images.
        UsageError: bad recipe/arguments.
    """
    from edgeseg.data.datasets import open_dataset
    from edgeseg.data.transforms import preprocess

    if recipe is None:
        if data_root is None or split is None or count is None:
            raise UsageError("build_calibration_set: give a recipe, or data_root, split and count")
        recipe = Recipe(name="custom", source=str(data_root), split=split, count=count,
                        selection=selection or "stratified", seed=seed or 0,
                        min_count=MIN_COUNT if min_count is None else min_count, format=fmt or "")
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    over = {k: v for k, v in dict(split=split, count=count, selection=selection, seed=seed, min_count=min_count,
                                  format=fmt).items() if v is not None}
    recipe = dataclasses.replace(recipe, **over)
    if recipe.selection not in SELECTIONS:
        raise UsageError(f"selection: {recipe.selection!r} is not one of {', '.join(SELECTIONS)}")
    where = f"calibration recipe {recipe.name!r}"
    root = _resolve_source(recipe, data_root)
    ds = open_dataset(root, split=recipe.split, fmt=recipe.format or None)
    k = ds.info.num_classes
    if recipe.selection == "stratified":
        counts_all = class_counts(ds)
    else:
        counts_all = np.zeros((len(ds), k), dtype=np.int64)
    idx = select_indices(counts_all, recipe.count, recipe.selection, recipe.seed)
    if len(idx) < recipe.min_count:
        raise DataError(f"{where}: {len(idx)} image(s) in {root} split {recipe.split!r}; a calibration set needs "
                        f"at least {recipe.min_count}")
    files = [str(ds.image_paths[i]) for i in idx]
    if eval_split is not None:
        if isinstance(eval_split, tuple) and len(eval_split) == 2 and isinstance(eval_split[1], str) \
                and Path(eval_split[0]).is_dir():
            eval_files = open_dataset(eval_split[0], split=eval_split[1], fmt=recipe.format or None).image_paths
        else:
            eval_files = list(eval_split)
        check_overlap(files, eval_files, where)
    from tqdm import tqdm

    arrays, images, counts = [], [], []
    import cv2

    h, w = int(input_hw[0]), int(input_hw[1])
    for i in tqdm(idx, desc="calibration images", disable=not progress):
        img, lab = ds.load(i)
        counts.append(_presence([lab], k)[0])
        small = img if img.shape[:2] == (h, w) else cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        images.append(np.ascontiguousarray(small))
        arrays.append(preprocess(small, (h, w), mean, std)[None].astype(np.float32))
    share, present, missing = coverage(np.stack(counts), ds.info.class_names)
    if missing:
        log.info("calibration %s: classes absent from the set: %s", recipe.name, ", ".join(missing))
    rec = recipe.to_json()
    rec["source_resolved"] = f"{root} (split {recipe.split})"
    return CalibrationSet(arrays=arrays, images=images, files=files, class_names=list(ds.info.class_names),
                          class_pixel_share=share, classes_present=present, classes_missing=missing, recipe=rec,
                          input_hw=(h, w))


__all__ = ["Recipe", "CalibrationSet", "MIN_COUNT", "SELECTIONS", "SCHEMA", "list_recipes", "load_recipe",
           "parse_recipe", "class_counts", "select_indices", "coverage", "check_overlap", "build_calibration_set"]
