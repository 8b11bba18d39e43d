"""`edgeseg eval` end to end on a tiny registered model, against a direct computation of the protocol."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeseg.checkpoint import save_checkpoint
from edgeseg.cli import main
from edgeseg.data.datasets import CAMVID_INFO, open_dataset
from edgeseg.data.embedded import default_data_dir
from edgeseg.eval.evaluate import evaluate, predict_label_map, torch_predictor
from edgeseg.models.registry import list_models, register_model
from edgeseg.types import ModelSpec

MODEL = "evalcli_tiny"  # not test_*: the per-variant model tests must not pick it up


class EvalTiny(nn.Module):
    """Stride-4 patchify conv + 1x1 classifier; enough to give non-trivial, deterministic predictions."""

    output_stride = 4

    def __init__(self, num_classes: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.ReLU())
        self.decode_head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    if MODEL not in list_models(MODEL):
        def evalcli_tiny(num_classes: int, **kw):
            """Tiny stride-4 model for the eval CLI tests."""
            return EvalTiny(num_classes)

        register_model(evalcli_tiny)
    torch.manual_seed(0)
    model = EvalTiny(11)
    with torch.no_grad():
        model.decode_head.bias.copy_(torch.linspace(-1, 1, 11))
    spec = ModelSpec(model=MODEL, num_classes=11, class_names=CAMVID_INFO.class_names, palette=CAMVID_INFO.palette,
                     ignore_index=11, input_hw=(64, 96))
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", model, spec)


def _camvid(root: Path, n: int = 5, h: int = 45, w: int = 70) -> Path:
    rng = np.random.default_rng(1)
    (root / "val").mkdir(parents=True)
    (root / "valannot").mkdir()
    for i in range(n):
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
        cv2.imwrite(str(root / "val" / f"f{i}.png"), img)
        lab = rng.integers(0, 12, (h, w), dtype=np.uint8)
        lab[:, :3] = 11
        cv2.imwrite(str(root / "valannot" / f"f{i}.png"), lab)
    return root


def _direct(ckpt: Path, root: Path, input_hw) -> dict:
    """The protocol written out independently: resize, normalise, forward, upsample, argmax, confusion."""
    from edgeseg.checkpoint import load_checkpoint

    model, spec = load_checkpoint(ckpt)
    conf = np.zeros((11, 11), np.int64)
    for ip in sorted((root / "val").iterdir()):
        img = cv2.cvtColor(cv2.imread(str(ip), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        lab = cv2.imread(str(root / "valannot" / (ip.stem + ".png")), cv2.IMREAD_UNCHANGED).astype(np.int64)
        x = cv2.resize(img, (input_hw[1], input_hw[0]), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        x = (x - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
        with torch.no_grad():
            logits = model(torch.from_numpy(x.transpose(2, 0, 1).copy())[None])
        pred = F.interpolate(logits, size=lab.shape, mode="bilinear", align_corners=False)[0].argmax(0).numpy()
        keep = lab != 11
        np.add.at(conf, (lab[keep], pred[keep]), 1)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = tp[present] / union[present]
    return {"miou": iou.mean(), "aacc": tp.sum() / conf.sum(), "conf": conf, "present": present,
            "macc": (tp[conf.sum(1) > 0] / conf.sum(1)[conf.sum(1) > 0]).mean(),
            "fwiou": ((conf.sum(1) / conf.sum())[present] * iou).sum()}


def test_eval_cli_json_matches_direct_computation(tiny_ckpt, tmp_path, capsys):
    root = _camvid(tmp_path / "cv")
    out = tmp_path / "m.json"
    rc = main(["eval", "--checkpoint", str(tiny_ckpt), "--data", str(root), "--json", str(out), "--no-progress",
               "--input-size", "64x96", "--batch-size", "2", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Sky" in printed and "mIoU" in printed and "5 images" in printed
    res = json.loads(out.read_text())
    for key in ("miou", "per_class_iou", "aacc", "macc", "fwiou", "num_images", "excluded_classes", "checkpoint",
                "split"):
        assert key in res
    assert res["num_images"] == 5 and res["split"] == "val" and res["checkpoint"] == str(tiny_ckpt)
    assert list(res["per_class_iou"]) == list(CAMVID_INFO.class_names)
    ref = _direct(tiny_ckpt, root, (64, 96))
    assert ref["conf"].sum() > 0 and 0 < ref["miou"] < 1
    assert res["miou"] == pytest.approx(ref["miou"], abs=1e-12)
    assert res["aacc"] == pytest.approx(ref["aacc"], abs=1e-12)
    assert res["macc"] == pytest.approx(ref["macc"], abs=1e-12)
    assert res["fwiou"] == pytest.approx(ref["fwiou"], abs=1e-12)
    excluded = [CAMVID_INFO.class_names[i] for i in np.flatnonzero(~ref["present"])]
    assert res["excluded_classes"] == excluded
    # batch size does not change the result
    out1 = tmp_path / "m1.json"
    assert main(["eval", "--checkpoint", str(tiny_ckpt), "--data", str(root), "--json", str(out1),
                 "--no-progress", "--input-size", "64x96"]) == 0
    assert json.loads(out1.read_text())["miou"] == res["miou"]


def test_eval_defaults_to_embedded_data_and_checkpoint_input_size(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(tiny_ckpt), "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["num_images"] == 12 and res["input_hw"] == [64, 96]
    assert Path(res["data"]) == default_data_dir()
    # the library call on the same data gives the same numbers, and predict_label_map agrees per image
    from edgeseg.checkpoint import load_checkpoint

    model, spec = load_checkpoint(tiny_ckpt)
    ds = open_dataset(default_data_dir())
    r = evaluate(torch_predictor(model), ds, (64, 96), spec.mean, spec.std, batch_size=4, progress=False)
    assert r["miou"] == res["miou"] and r["num_images"] == 12
    img, lab = ds[0]
    pm = predict_label_map(torch_predictor(model), img, (64, 96), spec.mean, spec.std)
    assert pm.shape == lab.shape and pm.dtype == np.uint8 and pm.max() < 11


def test_eval_real_camvid(tiny_ckpt, camvid_root, tmp_path):
    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(tiny_ckpt), "--data", str(camvid_root), "--json", str(out),
                 "--no-progress", "--batch-size", "8"]) == 0
    assert json.loads(out.read_text())["num_images"] == 101


def test_eval_errors(tiny_ckpt, tmp_path, capsys):
    root = _camvid(tmp_path / "cv", n=3)
    out = tmp_path / "m.json"
    out.write_text("{}")
    base = ["eval", "--checkpoint", str(tiny_ckpt), "--data", str(root), "--no-progress"]

    def err(argv, code):
        assert main(argv) == code
        e = capsys.readouterr().err.strip()
        assert e.startswith("edgeseg: error: ") and "\n" not in e
        return e

    assert "--json" in err(base + ["--json", str(out)], 2) and out.read_text() == "{}"
    assert main(base + ["--json", str(out), "--force"]) == 0 and "miou" in out.read_text()
    assert "--input-size" in err(base + ["--input-size", "60x7"], 2)
    assert "--batch-size" in err(base + ["--batch-size", "0"], 2)
    assert "checkpoint not found" in err(["eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(root)], 1)
    assert "data folder not found" in err(["eval", "--checkpoint", str(tiny_ckpt), "--data", str(tmp_path / "x")], 1)
    # bad data: one line naming the file; --skip-bad evaluates the rest and counts it
    (root / "val" / "f1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert "f1.png" in err(base, 1)
    out2 = tmp_path / "s.json"
    assert main(base + ["--skip-bad", "--json", str(out2)]) == 0
    res = json.loads(out2.read_text())
    assert res["num_images"] == 2 and res["skipped"] == 1
    # a dataset with a different number of classes
    vroot = tmp_path / "fl"
    (vroot / "images").mkdir(parents=True)
    (vroot / "masks").mkdir()
    cv2.imwrite(str(vroot / "images" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(vroot / "masks" / "a.png"), np.ones((8, 8), np.uint8))
    assert "2 classes but checkpoint" in err(["eval", "--checkpoint", str(tiny_ckpt), "--data", str(vroot)], 1)


def test_eval_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    h = capsys.readouterr().out
    assert "examples:" in h and "--checkpoint" in h and "--skip-bad" in h and "--json" in h


def test_eval_registered_test_offseg(tmp_path):
    from edgeseg.models import create_model

    root = _camvid(tmp_path / "cv", n=2)
    model = create_model("test_offseg", num_classes=11).eval()
    spec = ModelSpec(model="test_offseg", num_classes=11, class_names=CAMVID_INFO.class_names,
                     palette=CAMVID_INFO.palette, ignore_index=11, input_hw=(64, 96))
    ck = save_checkpoint(tmp_path / "ck", model, spec)
    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(ck), "--data", str(root), "--json", str(out), "--no-progress",
                 "--batch-size", "2"]) == 0
    res = json.loads(out.read_text())
    ref = evaluate(torch_predictor(model), open_dataset(root), (64, 96), spec.mean, spec.std, progress=False)
    assert res["miou"] == pytest.approx(ref["miou"], abs=1e-6) and res["num_images"] == 2
