"""Calibration sets: the images an int8 export or a QAT run calibrates on, with the class coverage that goes into
the export manifest. Three ways in, by what they start from:

  build_calibration_set     a recipe (edgeseg.quant.recipes), or a dataset split with explicit count/selection
  calibration_for_export    an export's --calib: a recipe, a dataset root or image folder, or nothing (the
                            embedded CamVid mini set, else random images), in the export wrapper's input contract
  calibration_for_training  QAT on a dataset: a recipe, else its train split, kept apart from its val split

Must not import export runtimes; numpy/cv2/torch only.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from edgeseg.errors import DataError, UsageError
from edgeseg.quant.recipes import (
    MIN_COUNT,
    SELECTIONS,
    Recipe,
    check_overlap,
    class_counts,
    coverage,
    load_recipe,
    pixel_counts,
    recipe_name,
    resolve_source,
    select_indices,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class CalibrationData:
    """Calibration inputs for an int8 export.

    Attributes:
        inputs: list of torch tensors, each (1, ...) in the ExportWrapper's input contract.
        info: what goes into the manifest's `calibration` entry (source, count, class coverage, ...).
    """

    inputs: list[torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    def numpy(self) -> list[np.ndarray]:
        return [t.detach().cpu().numpy() for t in self.inputs]


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
        """`CalibrationData` for an exporter: float32 NCHW tensors, or, given an
        ExportWrapper, inputs in that wrapper's contract (uint8 / NHWC)."""
        import torch

        if wrapper is None:
            inputs = [torch.from_numpy(a) for a in self.arrays]
        else:
            inputs = [wrapper.make_input(im) for im in self.images]
        return CalibrationData(inputs=inputs, info=self.info())


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
    from edgeseg.data.formats import open_dataset
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
    root = resolve_source(recipe, data_root)
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
        counts.append(pixel_counts([lab], k)[0])
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


def calibration_for_training(calib: str | None, data: str | Path, input_hw: Sequence[int], mean, std,
                             progress: bool = False) -> CalibrationSet:
    """The images QAT's `init_observers` uses: recipe `calib` (drawn with `data` as its "data" source), or by
    default up to 64 images of `data`'s train split (stratified by class presence, seed 0). Either is refused if
    it overlaps `data`'s val split, which QAT validates on."""
    from edgeseg.data.formats import open_dataset
    from edgeseg.errors import EdgesegError

    try:
        eval_split = open_dataset(data, split="val").image_paths
    except EdgesegError:  # no val split: nothing to keep apart
        eval_split = None
    if calib:
        return build_calibration_set(calib, input_hw, mean, std, data_root=data, eval_split=eval_split,
                                     progress=progress)
    return build_calibration_set(None, input_hw, mean, std, data_root=data, split="train", count=64,
                                 selection="stratified", seed=0, min_count=1, eval_split=eval_split,
                                 progress=progress)


# ----------------------------------------------------------------------------------------------------------------
# images for an export: calibration and proof
# ----------------------------------------------------------------------------------------------------------------
def read_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3); DataError when unreadable."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: unreadable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize_image(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """`img` at (H, W) `hw` (bilinear; unchanged when it already is)."""
    import cv2

    if img.shape[:2] == tuple(hw):
        return img
    return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def _folder_images(root: Path, count: int) -> tuple[list[np.ndarray], list[np.ndarray | None], str]:
    """Up to `count` (image, label or None) from a dataset root (edgeseg.data.formats when available) or a plain
    folder of images. Deterministic order (sorted, evenly spaced)."""
    try:
        from edgeseg.data.formats import open_dataset
    except ImportError:
        open_dataset = None
    if open_dataset is not None:
        for split in ("train", "val"):
            try:
                ds = open_dataset(root, split=split)
            except Exception:  # noqa: BLE001 - not a dataset layout: try the plain-folder reading below
                continue
            n = len(ds)
            idx = np.linspace(0, n - 1, min(count, n)).round().astype(int) if n else []
            imgs, labels = [], []
            for i in dict.fromkeys(int(i) for i in idx):
                img, lab = ds[i]
                imgs.append(np.asarray(img))
                labels.append(np.asarray(lab))
            if imgs:
                return imgs, labels, f"{root} (split {split})"
    from edgeseg.data.decoding import IMAGE_EXTS

    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTS
                   and "annot" not in str(p.parent.name).lower() and "label" not in str(p.parent.name).lower())
    if not files:
        raise DataError(f"{root}: no images found (expected a dataset root or a folder of .png/.jpg)")
    idx = np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)
    files = [files[i] for i in dict.fromkeys(int(i) for i in idx)]
    return [read_rgb(p) for p in files], [None] * len(files), str(root)


def default_images(count: int) -> tuple[list[np.ndarray], list[np.ndarray | None], str]:
    """The embedded CamVid mini set when installed, else deterministic random RGB images."""
    try:
        from edgeseg.data.decoding import IMAGE_EXTS
        from edgeseg.data.embedded import default_data_dir

        root = default_data_dir()
        files = sorted(p for p in (root / "val").iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if files:
            idx = np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)
            files = [files[i] for i in dict.fromkeys(int(i) for i in idx)]
            return [read_rgb(p) for p in files], [None] * len(files), f"embedded {root.name} val"
    except Exception as e:  # noqa: BLE001 - the embedded data is optional
        log.debug("embedded data unavailable: %s", e)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(count)]
    return imgs, [None] * count, "random uint8 images (seed 0)"


def calibration_for_export(wrapper, calib: str | Path | None, count: int, spec,
                           data_root: str | Path | None = None) -> CalibrationData:
    """CalibrationData for an int8 export: images from `calib` (or the default images) resized to the export
    size, in the wrapper's input contract, with the manifest's `calibration` info (source, count, class coverage
    when labels are available)."""
    if count < 1:
        raise UsageError("options.calib_count: must be at least 1 for an int8 export")
    recipe = recipe_name(calib)
    if recipe is not None:  # a calibration/*.toml recipe (edgeseg.quant.recipes): its own selection rules
        cset = build_calibration_set(recipe, wrapper.input_hw, spec.mean, spec.std, data_root=data_root)
        return cset.to_calibration_data(wrapper)
    if calib is not None:
        if not Path(calib).exists():
            raise UsageError(f"--calib: {calib} does not exist")
        imgs, labels, source = _folder_images(Path(calib), count)
    else:
        imgs, labels, source = default_images(count)
    inputs = [wrapper.make_input(resize_image(im, wrapper.input_hw)) for im in imgs]
    info: dict[str, Any] = {"source": source, "count": len(inputs), "input_hw": list(wrapper.input_hw)}
    labelled = [lab for lab in labels if lab is not None]
    if labelled:
        k = spec.num_classes
        hist = np.zeros(k, dtype=np.int64)
        for lab in labelled:
            lab = lab.astype(np.int64).ravel()
            lab = lab[(lab >= 0) & (lab < k)]
            hist += np.bincount(lab, minlength=k)[:k]
        total = max(int(hist.sum()), 1)
        info["class_pixel_share"] = {spec.class_names[i]: round(float(hist[i]) / total, 5) for i in range(k)}
        info["classes_missing"] = [spec.class_names[i] for i in range(k) if hist[i] == 0]
    if count > len(inputs):
        log.warning("calibration: asked for %d images, %s has %d", count, source, len(inputs))
    return CalibrationData(inputs=inputs, info=info)


__all__ = ["CalibrationData", "CalibrationSet", "build_calibration_set", "calibration_for_training",
           "calibration_for_export", "default_images", "read_rgb", "resize_image"]
