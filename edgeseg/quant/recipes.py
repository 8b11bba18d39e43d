"""Calibration recipes (`calibration/*.toml`, installed as `edgeseg.calibration`) and their rules: the schema, the
selection of images out of a dataset split, and the refusal of a set that shares an image with the evaluation
split. `edgeseg.quant.calibration` draws the sets.

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

numpy only (the label reading imports edgeseg.data when called).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tomllib

from edgeseg.errors import DataError, UsageError

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




def recipe_name(calib: str | Path | None) -> str | None:
    """`calib` (a --calib value) when it names a calibration recipe (a name in calibration/ or a .toml file), else
    None (a folder of images, or nothing)."""
    if calib is None:
        return None
    text = str(calib)
    if text.endswith(".toml") and Path(text).is_file():
        return text
    if Path(text).exists():
        return None
    return text if text in list_recipes() else None


# ----------------------------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------------------------
def pixel_counts(labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(n, K) pixel counts per image and class (ignore and out-of-range values dropped)."""
    counts = np.zeros((len(labels), num_classes), dtype=np.int64)
    for i, lab in enumerate(labels):
        v = np.asarray(lab).astype(np.int64).ravel()
        v = v[(v >= 0) & (v < num_classes)]
        counts[i] = np.bincount(v, minlength=num_classes)[:num_classes]
    return counts


def class_counts(ds) -> np.ndarray:
    """(len(ds), K) pixel counts per image and class of a SegDataset (reads only the labels)."""
    from edgeseg.data.decoding import read_label

    return pixel_counts([ds.map_label(read_label(p), p) for p in ds.label_paths], ds.info.num_classes)


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
# source and overlap
# ----------------------------------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_source(recipe: Recipe, data_root: str | Path | None) -> Path:
    """The dataset folder a recipe draws from (`data_root` for source "data")."""
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


__all__ = ["Recipe", "MIN_COUNT", "SELECTIONS", "SCHEMA", "list_recipes", "load_recipe", "parse_recipe",
           "recipe_name", "pixel_counts", "class_counts", "select_indices", "coverage", "resolve_source",
           "check_overlap"]
