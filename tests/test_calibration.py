"""Calibration recipes and sets: schema, overlap refusal, minimum size, stratified coverage, coverage numbers."""
import tomllib

import numpy as np
import pytest

from edgeseg.errors import DataError, UsageError
from edgeseg.quant import calibration as cal
from edgeseg.quant import recipes


@pytest.mark.parametrize("name", recipes.list_recipes())
def test_every_recipe_loads_and_matches_schema(name):
    import importlib.resources

    text = (importlib.resources.files("edgeseg.calibration") / f"{name}.toml").read_text()
    data = tomllib.loads(text)
    r = recipes.load_recipe(name)
    assert r.name == name == data["name"]
    assert set(data) <= set(recipes.SCHEMA)
    assert r.selection in recipes.SELECTIONS and r.count >= r.min_count
    # every key carries a `# (type) meaning` comment
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "# (" in line, line
    if r.source == "data":
        assert r.split == "train"  # default recipes draw from the training split


def test_recipes_shipped():
    assert {"camvid-train-64", "camvid-train-16", "embedded-8"} <= set(recipes.list_recipes())


def test_bad_recipe_rejected(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('name = "other"\nsource = "data"\nsplit = "train"\ncount = 8\nselection = "random"\nseed = 0\n')
    with pytest.raises(UsageError, match="file stem"):
        recipes.load_recipe(p)
    p.write_text('name = "bad"\nsource = "data"\nsplit = "train"\ncount = 8\nselection = "best"\nseed = 0\n')
    with pytest.raises(UsageError, match="selection"):
        recipes.load_recipe(p)


def test_overlap_with_eval_split_refused(camvid_root):
    with pytest.raises(DataError, match="evaluation split"):
        cal.build_calibration_set(None, (32, 32), data_root=camvid_root, split="val", count=8, selection="random",
                                  eval_split=(camvid_root, "val"))
    # the embedded mini set is made of CamVid val frames (a copy, other paths): caught by content
    with pytest.raises(DataError, match="evaluation split"):
        cal.build_calibration_set("embedded-8", (32, 32), eval_split=(camvid_root, "val"))
    s = cal.build_calibration_set(None, (32, 32), data_root=camvid_root, split="train", count=8,
                                  selection="random", eval_split=(camvid_root, "val"))
    assert len(s) == 8 and s.arrays[0].shape == (1, 3, 32, 32) and s.arrays[0].dtype == np.float32


def test_minimum_size_refused(camvid_root):
    with pytest.raises(DataError, match="at least 8"):
        cal.build_calibration_set(None, (32, 32), data_root=camvid_root, split="train", count=4, min_count=8)
    s = cal.build_calibration_set(None, (32, 32), data_root=camvid_root, split="train", count=4, min_count=4,
                                  selection="random")
    assert len(s) == 4


def test_stratified_covers_more_classes_than_random(camvid_root):
    from edgeseg.data.datasets import open_dataset

    ds = open_dataset(camvid_root, "train")
    counts = recipes.class_counts(ds)
    def covered(idx):
        return int((counts[idx].sum(0) > 0).sum())
    strat = [covered(recipes.select_indices(counts, 2, "stratified", s)) for s in range(10)]
    rand = [covered(recipes.select_indices(counts, 2, "random", s)) for s in range(10)]
    assert np.mean(strat) > np.mean(rand)
    assert min(strat) >= max(0, int(np.median(rand)))
    assert covered(recipes.select_indices(counts, 8, "stratified", 0)) == counts.shape[1]  # all 11 classes


def test_coverage_numbers_correct():
    counts = np.array([[3, 0, 1], [1, 0, 5]])
    share, present, missing = recipes.coverage(counts, ["a", "b", "c"])
    assert share == pytest.approx({"a": 0.4, "b": 0.0, "c": 0.6})
    assert present == ["a", "c"] and missing == ["b"]


def test_set_coverage_matches_labels(camvid_root):
    from edgeseg.data.datasets import open_dataset

    s = cal.build_calibration_set(None, (32, 32), data_root=camvid_root, split="train", count=8, seed=3)
    ds = open_dataset(camvid_root, "train")
    k = ds.info.num_classes
    hist = np.zeros(k)
    for f in s.files:
        i = [str(p) for p in ds.image_paths].index(f)
        lab = ds[i][1].ravel()
        hist += np.bincount(lab[lab < k], minlength=k)[:k]
    expect = hist / hist.sum()
    assert [s.class_pixel_share[c] for c in ds.info.class_names] == pytest.approx(expect.tolist())
    assert sum(s.class_pixel_share.values()) == pytest.approx(1.0)
    info = s.info()
    assert info["count"] == 8 and set(info["classes_present"]) | set(info["classes_missing"]) == set(ds.info.class_names)
