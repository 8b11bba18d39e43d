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


def test_non_editable_install_carries_the_defaults(tmp_path):
    """A wheel of this tree, installed into a plain folder and imported from elsewhere (not the checkout), loads the
    shipped checkpoints and finds the shipped int8 artifacts: package data is declared, not read from the repo."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    try:  # the venv's own setuptools when it is new enough (offline, fast); else pip fetches the build backend
        import setuptools

        isolation = [] if int(setuptools.__version__.split(".")[0]) >= 70 else ["--use-pep517"]
    except ImportError:
        isolation = ["--use-pep517"]
    no_iso = ["--no-build-isolation"] if not isolation else []
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *no_iso, "-q", "-w", str(wheels),
                        str(repo)], capture_output=True, text=True, timeout=600)
    if p.returncode != 0 and "No module named pip" in p.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert p.returncode == 0, p.stderr[-2000:]
    (whl,) = wheels.glob("edgeseg-*.whl")
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(whl)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    code = ("import json, edgeseg; from edgeseg.data import embedded; from edgeseg.checkpoint import load_checkpoint\n"
            "ck = embedded.default_checkpoint(); m, spec = load_checkpoint(ck)\n"
            "names = sorted(p.name for p in (embedded.ASSETS / 'checkpoints').iterdir())\n"
            "for n in names: load_checkpoint(embedded.ASSETS / 'checkpoints' / n)\n"
            "print(json.dumps({'module': edgeseg.__file__, 'default': str(ck), 'model': spec.model, 'ckpts': names,"
            " 'artifacts': [a.name for a in embedded.shipped_artifacts()]}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["module"].startswith(str(site)) and got["default"].startswith(str(site)), got
    assert got["model"] == "offseg_t" and {"offseg_t_camvid", "segnext_t_offset_camvid"} <= set(got["ckpts"])
    assert got["artifacts"] == [a.name for a in embedded.shipped_artifacts()] and got["artifacts"]
