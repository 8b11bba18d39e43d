"""Accuracy budget (`--max-miou-drop`): a deliberately fragile layer makes int8 blow the budget, and the loop keeps
exactly that layer in float; a budget that cannot be met writes no artifact; calibration never shares an image
with the evaluated split, and random stand-in images never pass silently. Real ONNX Runtime int8 exports of a
three-layer 1x1-conv model on the embedded CamVid images, split into train (every 3rd) and val (a few seconds per
export)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from edgeseg.models.registry import list_models, register_model

BUDGET_TINY = "budget_tiny"


class BudgetTiny(nn.Module):
    """a: copies RGB and adds a channel that is always 0; b: identity on RGB plus a huge weight on that zero
    channel (float ignores it, per-channel int8 rounds the identity to 0); c: nearest-centroid classifier."""

    output_stride = 1

    def __init__(self, num_classes: int = 11):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, num_classes, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


if BUDGET_TINY not in list_models(BUDGET_TINY):
    @register_model
    def budget_tiny(num_classes: int, **kw) -> nn.Module:
        """1x1 convs with one int8-fragile layer (budget tests only)."""
        return BudgetTiny(num_classes, **kw)


@pytest.fixture(scope="module")
def data_dir():
    from edgeseg.data.embedded import default_data_dir

    return default_data_dir()


@pytest.fixture(scope="module")
def split_data(data_dir, tmp_path_factory):
    """The embedded CamVid images as a dataset with a train split (every 3rd image) and a disjoint val split."""
    import shutil

    from edgeseg.data.datasets import open_dataset

    root = tmp_path_factory.mktemp("split") / "camvid"
    ds = open_dataset(data_dir, split="val")
    for i, (img, lab) in enumerate(zip(ds.image_paths, ds.label_paths)):
        split = "train" if i % 3 == 0 else "val"
        for src, sub in ((img, split), (lab, f"{split}annot")):
            (root / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / sub / Path(src).name)
    return root


@pytest.fixture(scope="module")
def fragile_ckpt(data_dir, tmp_path_factory):
    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.data.datasets import CAMVID_INFO, open_dataset
    from edgeseg.data.transforms import preprocess
    from edgeseg.models import create_model
    from edgeseg.types import ModelSpec

    spec = ModelSpec(model=BUDGET_TINY, num_classes=11, class_names=CAMVID_INFO.class_names,
                     palette=CAMVID_INFO.palette, ignore_index=CAMVID_INFO.ignore_index, input_hw=(64, 64))
    ds = open_dataset(data_dir, split="val")
    sums, counts = np.zeros((11, 3)), np.zeros(11)
    for i in range(len(ds)):  # class colour centroids in the normalised input space
        img, lab = ds[i]
        x = preprocess(img, spec.input_hw, spec.mean, spec.std).reshape(3, -1).T
        import cv2

        lab = cv2.resize(np.asarray(lab, np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST).ravel()
        for k in range(11):
            sel = lab == k
            sums[k] += x[sel].sum(0)
            counts[k] += sel.sum()
    m = create_model(BUDGET_TINY, num_classes=11)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.a.weight[:3, :, 0, 0] = torch.eye(3)
        m.b.weight[:3, :3, 0, 0] = torch.eye(3)
        m.b.weight[:, 3, 0, 0] = 1e4
        for k in range(11):
            if counts[k]:
                mu = torch.tensor(sums[k] / counts[k], dtype=torch.float32)
                m.c.weight[k, :3, 0, 0] = 2 * mu
                m.c.bias[k] = -(mu * mu).sum()
            else:
                m.c.bias[k] = -1e3
    return save_checkpoint(tmp_path_factory.mktemp("ck") / BUDGET_TINY, m, spec)


def test_budget_keeps_the_fragile_layer_float(fragile_ckpt, split_data, tmp_path, capsys):
    from edgeseg.cli import main
    from edgeseg.data.datasets import open_dataset

    out = tmp_path / "onnx-int8"
    rc = main(["export", "--checkpoint", str(fragile_ckpt), "--target", "onnx", "--precision", "int8",
               "--max-miou-drop", "0.03", "--data", str(split_data), "--val-images", "6", "--out", str(out),
               "--json", str(tmp_path / "s.json")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    table = json.loads((tmp_path / "onnx-int8.budget.json").read_text())
    rows = table["rounds"]
    assert table["passed"] and len(rows) == 2, rows
    assert not rows[0]["fits"] and rows[0]["miou_drop"] > 0.03  # all-int8: b's identity rounds to 0
    assert rows[1]["added"][0] == "b" and rows[1]["fits"], rows  # the SQNR ranking put b first
    assert "over budget" in captured.out and "fits" in captured.out
    m = json.loads((out / "manifest.json").read_text())
    assert "model.b" in m["quantization"]["float_modules"]
    assert m["quantization"]["budget"]["float_layers"] == rows[1]["added"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # work folders removed
    # calibrated on --data's train split, none of it in the val split the drop was measured on
    val = {Path(p).name for p in open_dataset(split_data, split="val").image_paths}
    train = {Path(p).name for p in open_dataset(split_data, split="train").image_paths}
    assert m["calibration"]["split"] == "train" and set(m["calibration"]["files"]) <= train
    assert m["calibration"]["files"] and not set(m["calibration"]["files"]) & val
    assert table["calibration"]["source"].endswith("split 'train' (disjoint from the evaluated split)")
    assert table["warnings"] == [] and m["quantization"]["budget"]["warnings"] == []


def test_budget_miss_writes_no_artifact(fragile_ckpt, split_data, tmp_path):
    from edgeseg.export.budget import quantize_with_budget

    out = tmp_path / "onnx-int8"
    res = quantize_with_budget(fragile_ckpt, "onnx", split_data, 0.03, out=out, max_rounds=1, max_images=4)
    assert not res["passed"] and res["artifact"] is None
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["onnx-int8.budget.json"]
    assert res["suggested_keep_float"][0] == "b"
    assert json.loads((tmp_path / "onnx-int8.budget.json").read_text())["rounds"][0]["fits"] is False


def test_budget_needs_a_runnable_target(fragile_ckpt, data_dir, tmp_path, capsys, monkeypatch):
    import sys

    from edgeseg.cli import main

    monkeypatch.setattr(sys, "platform", "linux")
    rc = main(["export", "--checkpoint", str(fragile_ckpt), "--target", "coreml", "--precision", "int8",
               "--max-miou-drop", "0.01", "--data", str(data_dir), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "--max-miou-drop" in err and "macOS" in err, err
    assert list(tmp_path.iterdir()) == []


def test_budget_never_calibrates_on_the_evaluated_split(fragile_ckpt, data_dir, split_data, tmp_path, capsys):
    """No train split to draw from, or a --calib that holds the evaluated images: refused in one line, nothing
    written (before, the export calibrated on the embedded val frames and the budget judged on the same ones)."""
    from edgeseg.cli import main

    base = ["export", "--checkpoint", str(fragile_ckpt), "--target", "onnx", "--precision", "int8",
            "--max-miou-drop", "0.5", "--out", str(tmp_path / "x")]
    assert main(base + ["--data", str(data_dir)]) == 2  # the embedded set has a val split only
    err = capsys.readouterr().err
    assert "train" in err and "--calib" in err and len(err.strip().splitlines()) == 1, err
    rc = main(base + ["--data", str(split_data), "--calib", str(data_dir)])  # its val images are in split_data's val
    err = capsys.readouterr().err
    assert rc == 1 and "calibration image(s) are in the evaluation split" in err, err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_random_proof_images_are_a_loud_warning(fragile_ckpt, split_data, tmp_path, monkeypatch):
    """Without the embedded CamVid set the export proves on random images: the round row, the table, the JSON and
    the manifest say so."""
    from edgeseg.data import embedded
    from edgeseg.errors import DataError
    from edgeseg.export.budget import quantize_with_budget

    def missing():
        raise DataError("embedded CamVid mini set not installed")

    monkeypatch.setattr(embedded, "default_data_dir", missing)
    out = tmp_path / "onnx-int8"
    res = quantize_with_budget(fragile_ckpt, "onnx", split_data, 0.99, out=out, max_rounds=1, max_images=2)
    assert res["passed"] and res["rounds"][0]["warnings"], res["rounds"]
    assert "random uint8 images" in res["warnings"][0] and "WARNING" in res["table"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["proof"]["source"].startswith("random uint8 images")
    assert m["quantization"]["budget"]["warnings"] == res["warnings"]
    assert m["calibration"]["split"] == "train"  # the calibration itself stayed on real images
