"""Accuracy budget (`--max-miou-drop`): a deliberately fragile layer makes int8 blow the budget, and the loop keeps
exactly that layer in float; a budget that cannot be met writes no artifact. Real ONNX Runtime int8 exports of a
three-layer 1x1-conv model on the embedded CamVid images (a few seconds per export)."""
import json

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


def test_budget_keeps_the_fragile_layer_float(fragile_ckpt, data_dir, tmp_path, capsys):
    from edgeseg.cli import main

    out = tmp_path / "onnx-int8"
    rc = main(["export", "--checkpoint", str(fragile_ckpt), "--target", "onnx", "--precision", "int8",
               "--max-miou-drop", "0.03", "--data", str(data_dir), "--val-images", "6", "--out", str(out),
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


def test_budget_miss_writes_no_artifact(fragile_ckpt, data_dir, tmp_path):
    from edgeseg.quant.budget import quantize_with_budget

    out = tmp_path / "onnx-int8"
    res = quantize_with_budget(fragile_ckpt, "onnx", data_dir, 0.03, out=out, max_rounds=1, max_images=4)
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
