"""`edgeseg predict` through the real CLI on the shared tiny checkpoint and artifacts: folders with a bad file and a
subfolder (skip note / --strict), the indexed PNG's palette, overlays and confidence, duplicate names, videos,
--limit, no overwrite without --force, every target that runs here, and Core ML's one-line refusal on Linux."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402  (registers tiny_ops)
from conftest import unavailable  # noqa: E402
from test_api import odd_image  # noqa: E402

import edgeseg  # noqa: E402
from edgeseg.cli import main  # noqa: E402

RUNS_HERE = ("onnx", "openvino", "executorch-xnnpack", "litert", "jetson-tensorrt")


def _save(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """photos/: a good image, a corrupt .jpg, a text file, and sub/ holding an image with the same stem."""
    root = tmp_path / "photos"
    _save(root / "street.png", odd_image(37, 53, seed=0))
    _save(root / "sub" / "street.jpg", odd_image(40, 30, seed=1))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image: not a source")
    return root


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("edgeseg: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_folder_with_a_bad_file_and_a_subfolder(folder, checkpoints, tmp_path, capfd):
    ckpt = checkpoints(_tiny.TINY)
    out = tmp_path / "preds"
    rc = main(["predict", str(folder), "--checkpoint", str(ckpt), "--out", str(out), "--confidence",
               "--no-progress"])
    cap = capfd.readouterr()
    assert rc == 0, cap.err
    skips = [ln for ln in cap.err.splitlines() if ln.startswith("skipping")]
    assert len(skips) == 1 and str(folder / "broken.jpg") in skips[0], cap.err
    assert "2 images" in cap.out and "images/s" in cap.out and "p50" in cap.out and "ms" in cap.out
    assert edgeseg.api.load(ckpt).runtime in cap.out and str(out / "predictions.json") in cap.out

    rec = json.loads((out / "predictions.json").read_text())
    assert [Path(r["source"]).relative_to(folder).as_posix() for r in rec["images"]] == ["street.png",
                                                                                         "sub/street.jpg"]
    assert rec["skipped"] == [{"source": str(folder / "broken.jpg"), "reason": rec["skipped"][0]["reason"]}]
    assert rec["target"] == "torch" and rec["precision"] == "fp32" and rec["kind"] == "checkpoint"
    assert rec["cpu"]["model"] and rec["summary"]["images"] == 2 and rec["summary"]["latency_ms"]["p50"] > 0
    first, second = rec["images"]
    assert first["outputs"] == {"class_map": "masks/street.png", "overlay": "overlays/street.png",
                                "confidence": "confidence/street.png"}
    assert second["outputs"]["class_map"] == "masks/sub/street.png" and second["size"] == [40, 30]
    assert first["size"] == [37, 53] and first["latency_ms"] > 0

    # the class map is an indexed PNG whose palette is the model's, and whose pixels are the API's class map
    seg = edgeseg.load(ckpt)
    img = odd_image(37, 53, seed=0)
    with Image.open(out / "masks" / "street.png") as im:
        assert im.mode == "P"
        assert im.getpalette()[:3 * len(_tiny.PALETTE)] == [v for c in _tiny.PALETTE for v in c]
        assert len(im.getpalette()) == 3 * len(_tiny.PALETTE)
        assert np.array_equal(np.asarray(im), seg.predict(img))
    overlay = cv2.cvtColor(cv2.imread(str(out / "overlays" / "street.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(overlay, seg.overlay(img, seg.predict(img)))
    conf = cv2.imread(str(out / "confidence" / "street.png"), cv2.IMREAD_UNCHANGED)
    assert conf.dtype == np.uint16 and conf.shape == (37, 53)
    np.testing.assert_allclose(conf / 65535.0, seg.predict(img, return_confidence=True)[1], atol=1e-4)
    assert sorted(p.name for p in out.iterdir() if p.name != "vendor.log") == [
        "confidence", "masks", "overlays", "predictions.json"]


def test_strict_fails_on_the_bad_file_and_leaves_nothing(folder, checkpoints, tmp_path, capfd):
    out = tmp_path / "preds"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["predict", str(folder), "--checkpoint", str(checkpoints(_tiny.TINY)), "--out", str(out), "--strict",
               "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 1
    line = _one_line(err)
    assert str(folder / "broken.jpg") in line and "nothing written" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary left


def test_no_overwrite_without_force_and_force_only_replaces_its_own(folder, checkpoints, tmp_path, capfd):
    ckpt = str(checkpoints(_tiny.TINY))
    out = tmp_path / "preds"
    argv = ["predict", str(folder / "street.png"), "--checkpoint", ckpt, "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    before = (out / "predictions.json").read_bytes()
    capfd.readouterr()
    assert main(argv) == 2
    line = _one_line(capfd.readouterr().err)
    assert f"--out {out}" in line and "exists" in line and "--force" in line
    assert (out / "predictions.json").read_bytes() == before
    assert not (out / "confidence").exists()
    assert main(argv + ["--force", "--confidence"]) == 0
    assert (out / "confidence" / "street.png").is_file()  # replaced by the new run
    user = tmp_path / "mine"
    user.mkdir()
    (user / "keep.txt").write_text("the user's")
    assert main(argv[:-3] + ["--out", str(user), "--force", "--no-progress"]) == 2
    assert "not written by edgeseg" in _one_line(capfd.readouterr().err)
    assert (user / "keep.txt").read_text() == "the user's"
    # an output inside a source folder is refused (the next run would read it back)
    assert main(["predict", str(folder), "--checkpoint", ckpt, "--out", str(folder / "preds"), "--no-progress"]) == 2
    assert "lies inside the input SOURCE" in _one_line(capfd.readouterr().err)


def test_duplicate_stems_globs_and_missing_sources(tmp_path, checkpoints, capfd):
    ckpt = str(checkpoints(_tiny.TINY))
    a = _save(tmp_path / "a" / "img.jpg", odd_image(20, 24, seed=0))
    b = _save(tmp_path / "b" / "img.jpg", odd_image(20, 24, seed=1))
    c = _save(tmp_path / "b" / "img.png", odd_image(20, 24, seed=2))
    out = tmp_path / "out"
    rc = main(["predict", str(a), str(tmp_path / "b" / "*.*"), str(a), "--checkpoint", ckpt, "--out", str(out),
               "--no-progress"])
    assert rc == 0, capfd.readouterr().err
    rec = json.loads((out / "predictions.json").read_text())
    got = {r["source"]: r["outputs"]["class_map"] for r in rec["images"]}
    assert got == {str(a): "masks/img.png", str(b): "masks/img-2.png", str(c): "masks/img-3.png"}
    for rel in got.values():
        assert (out / rel).is_file()
    for missing, needle in ((tmp_path / "nope.jpg", "no such file"), (tmp_path / "z*.png", "matches no file")):
        assert main(["predict", str(missing), "--checkpoint", ckpt, "--out", str(tmp_path / "o2")]) == 2
        line = _one_line(capfd.readouterr().err)
        assert str(missing) in line and needle in line
    assert not (tmp_path / "o2").exists()


def _video(path: Path, frames: int = 5, hw=(48, 64)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (hw[1], hw[0]))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(cv2.cvtColor(odd_image(*hw, seed=i), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.mark.exports([("onnx", _tiny.TINY, "fp32")])
def test_video_frames_and_limit(tmp_path, exports, capfd):
    video = _video(tmp_path / "drive.mp4")
    art = str(exports.get("onnx", _tiny.TINY, "fp32"))
    out = tmp_path / "out"
    assert main(["predict", str(video), "--artifact", art, "--out", str(out), "--no-progress"]) == 0
    rec = json.loads((out / "predictions.json").read_text())
    assert [r["frame"] for r in rec["images"]] == list(range(5))
    assert [r["outputs"]["class_map"] for r in rec["images"]] == [f"masks/drive/{i:06d}.png" for i in range(5)]
    assert all(r["size"] == [48, 64] and r["source"] == str(video) for r in rec["images"])
    assert rec["target"] == "onnx" and rec["runtime"] == "onnx"
    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read()
    cap.release()
    with Image.open(out / "masks" / "drive" / "000000.png") as im:
        assert np.array_equal(np.asarray(im), edgeseg.load(art).predict(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
    # --limit counts frames; a file that is neither an image nor a video is skipped with its name
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    capfd.readouterr()
    assert main(["predict", str(junk), str(video), "--artifact", art, "--out", str(tmp_path / "lim"), "--limit", "2",
                 "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert any(ln.startswith("skipping") and str(junk) in ln for ln in err.splitlines()), err
    assert len(json.loads((tmp_path / "lim" / "predictions.json").read_text())["images"]) == 2


def _require(target: str) -> None:
    from edgeseg.export import get_exporter

    try:
        missing = get_exporter(target).check_environment()
    except ModuleNotFoundError as e:
        missing = [f"module {e.name}"]
    if missing:
        unavailable(f"{target}: missing {'; '.join(missing)}")


@pytest.mark.exports(lambda p: [(p["target"], _tiny.TINY, "fp32")])
@pytest.mark.parametrize("target", RUNS_HERE)
def test_every_target_that_runs_here_predicts_like_the_checkpoint(target, exports, tmp_path, capfd):
    _require(target)
    art = exports.get(target, _tiny.TINY, "fp32")
    img = odd_image(45, 61, seed=4)
    src = _save(tmp_path / "in" / "x.png", img)
    out = tmp_path / "out"
    assert main(["predict", str(src), "--artifact", str(art), "--out", str(out), "--threads", "1",
                 "--confidence", "--no-progress"]) == 0, capfd.readouterr().err
    rec = json.loads((out / "predictions.json").read_text())
    assert rec["target"] == target and rec["threads"] == 1 and rec["images"][0]["size"] == [45, 61]
    with Image.open(out / "masks" / "x.png") as im:
        assert im.mode == "P" and im.size == (61, 45)
        ref = edgeseg.load(exports.checkpoint(_tiny.TINY)).predict(img)
        assert (np.asarray(im) == ref).mean() >= 0.99  # fp32 on its runtime: the eager argmax, ties aside
    assert (out / "confidence" / "x.png").is_file()


@pytest.mark.exports([("coreml", _tiny.TINY, "fp32")])
def test_coreml_artifact_is_refused_in_one_line(tmp_path, exports, capfd):
    _require("coreml")
    if platform.system() == "Darwin":
        pytest.skip("Core ML runs on macOS: no refusal to check")
    art = exports.get("coreml", _tiny.TINY, "fp32")
    src = _save(tmp_path / "x.png", odd_image())
    out = tmp_path / "out"
    assert main(["predict", str(src), "--artifact", str(art), "--out", str(out), "--no-progress"]) == 1
    line = _one_line(capfd.readouterr().err)
    assert f"Core ML cannot run on {platform.system()}" in line and str(art) in line
    assert not out.exists()
    with pytest.raises(edgeseg.EdgesegError, match="Core ML cannot run"):
        edgeseg.load(art)


def test_usage_errors(tmp_path, checkpoints, capfd):
    ckpt = str(checkpoints(_tiny.TINY))
    src = str(_save(tmp_path / "x.png", odd_image()))
    for extra, needle in ((["--threads", "0"], "--threads"), (["--limit", "0"], "--limit"),
                          (["--alpha", "1.5"], "--alpha"), (["--artifact", ckpt, "--native-size"], "--native-size")):
        argv = ["predict", src, "--out", str(tmp_path / "o")] + extra
        if "--artifact" not in extra:
            argv += ["--checkpoint", ckpt]
        assert main(argv) == 2, extra
        assert needle in _one_line(capfd.readouterr().err)
    assert not (tmp_path / "o").exists()
