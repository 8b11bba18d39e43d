"""What the package ships: the trained checkpoints reproduce the val mIoU they report, and the shipped int8
artifacts are intact and agree with their checkpoint on the embedded frames."""
from __future__ import annotations

import hashlib
import json

import pytest

from edgeseg.cli import main
from edgeseg.data import embedded

CHECKPOINTS = sorted(p for p in (embedded.ASSETS / "checkpoints").iterdir() if (p / "model.json").is_file())


def test_the_package_ships_checkpoints_and_int8_artifacts():
    names = {p.name for p in CHECKPOINTS}
    assert {"offseg_t_camvid", "segnext_t_offset_camvid"} <= names
    assert embedded.shipped_artifacts(), "no shipped int8 artifact under edgeseg/assets/artifacts"


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=lambda p: p.name)
def test_shipped_checkpoint_reproduces_its_val_miou(ckpt, camvid_root, tmp_path):
    """`edgeseg eval` on CamVid val gives the mIoU recorded in model.json (and quoted in the README)."""
    reported = json.loads((ckpt / "model.json").read_text())["metrics"]["val"]["miou"]
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(camvid_root), "--split", "val", "--json", str(out),
                 "--no-progress"]) == 0
    got = json.loads(out.read_text())
    got = got.get("metrics", got)["miou"]
    # recorded from the fp32 training checkpoint; the package ships fp16 (measured: equal within 0.01 points)
    assert got == pytest.approx(reported, abs=2e-3)


@pytest.mark.parametrize("art", embedded.shipped_artifacts(), ids=lambda p: p.name)
def test_shipped_artifact_is_intact_and_agrees_with_its_checkpoint(art, tmp_path):
    from edgeseg.eval.validate import validate

    manifest = json.loads((art / "manifest.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((art / name).read_bytes()).hexdigest() == digest, name
    ckpt = embedded.ASSETS / "checkpoints" / f"{manifest['model']}_camvid"
    assert (ckpt / "model.json").is_file(), f"{art.name}: no shipped checkpoint {ckpt.name} to compare with"
    (rec,) = validate([art], embedded.default_data_dir(), reference=ckpt, progress=False)
    assert rec["executed"] is True
    assert rec["agreement"] >= 0.93, rec
    assert rec["miou_drop"] <= 0.02, rec
