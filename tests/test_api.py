"""The Python API (edgeseg/api.py) as a notebook uses it: `edgeseg.load` a checkpoint and an ONNX artifact, predict
on an odd-sized RGB array, draw; `edgeseg.export` and `edgeseg.validate` as thin wrappers; `import edgeseg` stays
cheap and re-exports the API lazily. Real runtimes on the shared tiny checkpoint/artifacts (tests/conftest.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402  (registers tiny_ops)

import edgeseg  # noqa: E402
from edgeseg.errors import ArtifactError, UsageError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARGMAX_OPTIONS = dict(input_dtype="uint8", input_layout="NHWC", output="argmax")  # test_export.py's export


def odd_image(h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    """A smooth RGB picture with a block of random colour: an odd size, far from the 64x64 input."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], -1).astype(np.uint8)
    img[h // 4:h // 2, w // 3:2 * w // 3] = rng.integers(0, 256, 3)
    return img


def eager_reference(ckpt: Path, img: np.ndarray, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The eager model's (class map, max softmax) on `img`, computed here with torch: resize (cv2 bilinear) to the
    checkpoint's input size, or with `pad_to` the image's own size zero-padded (after normalisation) to that
    multiple; logits upsampled bilinearly to the (padded) image size, cropped, argmax / softmax."""
    import cv2

    from edgeseg.checkpoint import load_checkpoint

    model, spec = load_checkpoint(ckpt)
    h, w = img.shape[:2]
    if pad_to is None:
        small = cv2.resize(img, (spec.input_hw[1], spec.input_hw[0]), interpolation=cv2.INTER_LINEAR)
        size = (h, w)
    else:
        small, size = img, (-(-h // pad_to) * pad_to, -(-w // pad_to) * pad_to)
    x = (torch.from_numpy(small).float() - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    x = x.permute(2, 0, 1)[None]
    if pad_to is not None:
        x = F.pad(x, (0, size[1] - w, 0, size[0] - h))
    with torch.no_grad():
        logits = F.interpolate(model.eval()(x), size=size, mode="bilinear", align_corners=False)[0, :, :h, :w]
    return logits.argmax(0).numpy().astype(np.uint8), logits.softmax(0).amax(0).numpy()


@pytest.mark.exports([("onnx", _tiny.TINY, "fp32")])
def test_notebook_checkpoint_and_onnx_on_an_odd_sized_image(exports):
    ckpt = exports.checkpoint(_tiny.TINY)
    art = exports.get("onnx", _tiny.TINY, "fp32")
    img = odd_image()
    ref, ref_conf = eager_reference(ckpt, img)
    assert len(np.unique(ref)) >= 2  # a map with several classes, so that agreement means something

    with edgeseg.load(ckpt) as eager, edgeseg.load(art, threads=1) as onnx:
        for seg in (eager, onnx):
            cmap = seg.predict(img)
            assert cmap.shape == img.shape[:2] and cmap.dtype == np.uint8
            assert cmap.max() < len(_tiny.CLASSES)
        assert np.array_equal(eager.predict(img), ref)
        # the ONNX fp32 artifact gives the eager model's argmax on this image (ties aside: fp32 rounding)
        assert (onnx.predict(img) == ref).mean() >= 0.999
        cmap, conf = onnx.predict(img, return_confidence=True)
        assert conf.shape == img.shape[:2] and conf.dtype == np.float32
        assert conf.min() >= 1 / len(_tiny.CLASSES) - 1e-6 and conf.max() <= 1.0
        np.testing.assert_allclose(conf, ref_conf, atol=1e-4)
        # what the model is
        assert onnx.classes == _tiny.CLASSES and onnx.palette == _tiny.PALETTE
        assert onnx.input_size == (64, 64) and onnx.target == "onnx" and onnx.precision == "fp32"
        assert eager.target == "torch" and eager.kind == "checkpoint" and onnx.kind == "artifact"
        assert onnx.threads == 1 and onnx.runtime == "onnx" and "tiny_ops" in repr(onnx)
        assert eager.runtime == "torch"  # the manifest's runtime record for an artifact; eager for a checkpoint
        assert onnx.predict_logits(img).shape == (len(_tiny.CLASSES), 16, 16)  # stride 4 at 64x64
        # drawing: colours from the palette, the overlay blends them over the image
        colour = onnx.colorize(cmap)
        assert colour.shape == img.shape and np.array_equal(colour, np.asarray(_tiny.PALETTE, np.uint8)[cmap])
        assert np.array_equal(onnx.overlay(img, cmap, alpha=0.0), img)
        assert np.array_equal(onnx.overlay(img, cmap, alpha=1.0), colour)
        half = onnx.overlay(img, cmap)
        assert np.abs(half.astype(int) - (img.astype(int) + colour) / 2).max() <= 1


def test_images_of_other_forms_and_bad_arguments(checkpoints):
    ckpt = checkpoints(_tiny.TINY)
    seg = edgeseg.load(ckpt)
    img = odd_image(21, 30)
    grey = img[:, :, 0]
    assert np.array_equal(seg.predict(grey), seg.predict(np.repeat(grey[:, :, None], 3, 2)))
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 7, np.uint8)], 2)
    assert np.array_equal(seg.predict(rgba), seg.predict(img))
    for bad in (img.astype(np.float32), np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 2), np.uint8)):
        with pytest.raises(UsageError, match="expected an RGB uint8"):
            seg.predict(bad)
    with pytest.raises(UsageError, match="alpha"):
        seg.overlay(img, seg.predict(img), alpha=2)
    with pytest.raises(UsageError, match="threads"):
        edgeseg.load(ckpt, threads=0)
    with pytest.raises(ArtifactError, match="neither an artifact"):
        edgeseg.load(ckpt.parent)


def test_native_size_runs_a_checkpoint_at_the_image_size_padded_to_32(checkpoints):
    ckpt = checkpoints(_tiny.TINY)
    img = odd_image(50, 70, seed=3)
    ref, ref_conf = eager_reference(ckpt, img, pad_to=32)
    with edgeseg.load(ckpt, native_size=True) as seg:
        cmap, conf = seg.predict(img, return_confidence=True)
        assert np.array_equal(cmap, ref)
        np.testing.assert_allclose(conf, ref_conf, atol=1e-5)
        assert seg.predict_logits(img).shape == (len(_tiny.CLASSES), 64 // 4, 96 // 4)  # padded to 64x96
        assert not np.array_equal(cmap, edgeseg.load(ckpt).predict(img))  # not the resized protocol


@pytest.mark.exports([("onnx", _tiny.TINY, "fp32", ARGMAX_OPTIONS), ("onnx", _tiny.TINY, "fp32")])
def test_argmax_artifact_map_is_resized_nearest_and_has_no_confidence(exports):
    art = exports.get("onnx", _tiny.TINY, "fp32", **ARGMAX_OPTIONS)
    with edgeseg.load(art) as seg:
        assert not seg.has_confidence
        img = odd_image()
        cmap = seg.predict(img)
        assert cmap.shape == img.shape[:2] and cmap.dtype == np.uint8
        with pytest.raises(UsageError, match="no confidence"):
            seg.predict(img, return_confidence=True)
        with pytest.raises(ArtifactError, match="not logits"):
            seg.predict_logits(img)
        with pytest.raises(UsageError, match="native_size is for checkpoints"):
            edgeseg.load(art, native_size=True)
        # the artifact's 64x64 class map resized with nearest neighbour: no value it does not hold, and close to
        # the logits artifact's map (upsampled logits, then argmax)
        raw = seg.session.run(seg.session.input_for(img))[0]
        assert raw.shape == (64, 64) and set(np.unique(cmap)) <= set(np.unique(raw))
        assert np.array_equal(seg.predict(odd_image(64, 64)), seg.session.run(seg.session.input_for(
            odd_image(64, 64)))[0])
        with edgeseg.load(exports.get("onnx", _tiny.TINY, "fp32")) as logits:
            assert (logits.predict(img) == cmap).mean() >= 0.9


def test_export_and_validate_are_the_library_functions(tmp_path):
    from test_reliability import make_camvid, make_ckpt

    ckpt = make_ckpt(tmp_path / "ckpt")  # tiny_ops with CamVid's 11 classes at 64x64
    data = make_camvid(tmp_path / "camvid", n_train=1, n_val=2)
    art = edgeseg.export(ckpt, "onnx", out=tmp_path / "onnx-fp32", progress=False)
    assert art == tmp_path / "onnx-fp32"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["target"] == "onnx" and manifest["precision"] == "fp32"
    with pytest.raises(UsageError, match="exists"):
        edgeseg.export(ckpt, "onnx", out=art, progress=False)
    rec = edgeseg.validate(art, data=data, progress=False)  # its source checkpoint is the reference
    assert isinstance(rec, dict) and rec["verdict"] == "pass", rec
    assert rec["data"]["num_images"] == 2
    recs = edgeseg.validate([art, art], data=data, reference=ckpt, max_images=1, progress=False)
    assert [r["verdict"] for r in recs] == ["pass", "pass"] and recs[0]["data"]["num_images"] == 1


def test_import_edgeseg_stays_cheap_and_reexports_the_api_lazily():
    code = ("import sys, edgeseg\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'cv2', 'onnxruntime', 'edgeseg.api', 'edgeseg.export')"
            " if m in sys.modules)\n"
            "assert not heavy, heavy\n"
            "assert callable(edgeseg.export)  # the package, callable as edgeseg.api.export\n"
            "from edgeseg.export import export_checkpoint\n"
            "assert callable(edgeseg.export) and edgeseg.export.export_checkpoint is export_checkpoint\n"
            "from edgeseg.api import Predictor, load, validate\n"
            "assert (edgeseg.load, edgeseg.validate, edgeseg.Predictor) == (load, validate, Predictor)\n"
            "assert 'load' in dir(edgeseg) and 'torch' not in sys.modules\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_edgeseg_export_called_is_api_export(monkeypatch, tmp_path):
    import edgeseg.export as package

    calls = []
    monkeypatch.setattr(package, "export_checkpoint", lambda *a, **k: calls.append((a, k)) or tmp_path)
    assert edgeseg.export("ck", "onnx", input_size=(32, 64), opset=18) == tmp_path
    (args, kwargs), = calls
    assert args == ("ck", "onnx", "fp32") and kwargs["input_hw"] == (32, 64) and kwargs["opset"] == 18
    assert kwargs["out"] is None and kwargs["force"] is False
