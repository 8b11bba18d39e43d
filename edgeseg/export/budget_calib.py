"""Calibration for the accuracy budget (edgeseg.export.budget): every image a round can calibrate on is checked
disjoint from the evaluated split before the first export; without --calib, `data`'s train split.

Must not import export runtimes at module level.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from edgeseg.errors import UsageError


def calibration_source(target: str, data: str | Path, split: str, calib, is_qat: bool,
                       options: dict[str, Any]) -> tuple[Any, int | None]:
    """(calib as the export takes it, the count to draw from `data`'s train split or None), checked disjoint from
    the evaluated split before the first export."""
    from edgeseg.data.formats import open_dataset

    eval_files = open_dataset(data, split=split).image_paths  # a bad --data fails before the first export
    if is_qat:
        return None, None  # a QAT checkpoint's int8 graph carries its learned scales: no calibration
    if calib is not None:
        check_calib_disjoint(calib, data, eval_files, split)
        return calib, None
    # never the export's default (the embedded val frames, or random images): --data's train split
    check_train_split(data, split, eval_files)
    return None, _calib_count(target, options)


def _calib_count(target: str, options: dict[str, Any]) -> int:
    """The target's calib_count (profile, overridden by the exporter options), as the export would use it."""
    from edgeseg.export import get_exporter
    from edgeseg.export.profiles import load_profile

    profile = load_profile(target)
    opts = get_exporter(target).Options.from_dict({**profile.io_options(), **profile.options, **options},
                                                  where="options")
    return int(opts.calib_count)


def check_train_split(data: str | Path, split: str, eval_files: Sequence[str | Path]) -> None:
    """`data`'s train split can calibrate for an evaluation on `eval_files`.

    Raises:
        UsageError (one line) when `data` has no train split to calibrate on; DataError when its train split
        shares an image with the evaluated `split` (the check `edgeseg qat` applies to its calibration set).
    """
    from edgeseg.data.formats import open_dataset
    from edgeseg.errors import EdgesegError
    from edgeseg.quant.recipes import check_overlap

    try:
        train = open_dataset(data, split="train").image_paths
    except EdgesegError as e:
        raise UsageError(f"--max-miou-drop: without --calib the calibration images come from {data}'s train "
                         f"split, which cannot be read ({e}); pass --calib with images outside its {split} "
                         "split") from None
    check_overlap(train, eval_files, f"--max-miou-drop: {data} split 'train' (calibration)")


def write_train_recipe(data: str | Path, count: int, work: Path) -> Path:
    """A calibration recipe (.toml in `work`) drawing `count` images of `data`'s train split, stratified, seed 0."""
    path = work / "budget-calibration.toml"
    path.write_text(f'name = "budget-calibration"\ndescription = "--max-miou-drop default: the train split"\n'
                    f"source = {json.dumps(str(Path(data).resolve()))}\nsplit = \"train\"\ncount = {int(count)}\n"
                    f'selection = "stratified"\nseed = 0\nmin_count = 1\n')
    return path


def check_calib_disjoint(calib: str | Path, data: str | Path, eval_files: Sequence[str | Path], split: str) -> None:
    """DataError (one line) when the calibration source `calib` (a recipe, a dataset root or an image folder)
    can hand the export an image of the evaluated split. Checked on every image the export could draw from:
    the recipe's split, else a dataset root's train split (or val split when it has no train split, as the
    export reads it), else every image under the folder."""
    from edgeseg.data.formats import open_dataset
    from edgeseg.errors import EdgesegError
    from edgeseg.quant.recipes import check_overlap, load_recipe, recipe_name, resolve_source

    text = str(calib)
    where = f"--max-miou-drop: --calib {calib}"
    if recipe_name(text) is not None:
        recipe = load_recipe(text)
        root = resolve_source(recipe, data)
        files = open_dataset(root, split=recipe.split, fmt=recipe.format or None).image_paths
        check_overlap(files, eval_files, where)
        return
    if not Path(text).exists():
        raise UsageError(f"--calib: {calib} does not exist")
    for s in ("train", "val"):
        try:
            files = open_dataset(calib, split=s).image_paths
        except EdgesegError:
            continue
        if files:
            check_overlap(files, eval_files, where)
            return
    from edgeseg.data.decoding import IMAGE_EXTS

    check_overlap([p for p in Path(text).rglob("*") if p.suffix.lower() in IMAGE_EXTS], eval_files, where)


def calibration_note(calib, data, count) -> dict[str, Any]:
    if calib is None:
        return {"source": "none (QAT checkpoint: learned scales)"}
    if count is not None:
        return {"source": f"{data} split 'train' (disjoint from the evaluated split)", "count": count,
                "selection": "stratified", "seed": 0}
    return {"source": str(calib), "checked_disjoint": True}


__all__ = ["calibration_source", "calibration_note", "check_train_split", "check_calib_disjoint",
           "write_train_recipe"]
