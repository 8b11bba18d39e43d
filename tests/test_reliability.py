"""Reliability and security through the real CLI: bad data, unsafe/corrupted checkpoints and artifacts,
wrong input contracts, outputs never overwritten without --force, SIGKILL during export and training, exit codes
and one-line messages (traceback only with --debug).

In-process `edgeseg.cli.main([...])` where a process boundary adds nothing; subprocesses (`python -c` bootstrap
that registers tests/_tiny.py's `tiny_ops`, then calls `edgeseg.cli.main`) where the point is what a user sees on
stderr, a native runtime that could crash the process, or SIGKILL.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402  (registers tiny_ops)

from edgeseg.cli import main  # noqa: E402
from edgeseg.errors import ArtifactError, DataError, EdgesegError, UsageError  # noqa: E402
from edgeseg.train.state import load_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
HW = (64, 64)
BOOT = ("import sys; sys.path.insert(0, {tests!r}); import _tiny; from edgeseg.cli import main; "
        "sys.argv[0] = 'edgeseg'; raise SystemExit(main(sys.argv[1:]))").format(tests=str(TESTS))


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO),
                PYTHONUNBUFFERED="1", EDGESEG_DEBUG="")


def cli_cmd(*args) -> list[str]:
    return [sys.executable, "-c", BOOT, *map(str, args)]


def run_cli(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, env=_env(), timeout=timeout, cwd=REPO)


def _one_line_error(err: str, *needles: str) -> str:
    """stderr holds exactly one line, `edgeseg: error: ...`, containing every needle; no traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("edgeseg: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------ fixtures

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")


def _pair(rng, hw=HW):
    h, w = hw
    lab = np.zeros((h, w), np.uint8)
    horizon = int(rng.integers(h // 3, 2 * h // 3))
    lab[horizon:] = 3
    lab[horizon // 3:horizon, 8:24] = 1
    lab[horizon + 2:horizon + 10, 30:50] = 8
    lab[rng.random((h, w)) < 0.02] = 11
    img = np.zeros((h, w, 3), np.float32)
    for c, col in {0: (70, 130, 230), 1: (200, 60, 40), 3: (120, 120, 120), 8: (240, 220, 40)}.items():
        img[lab == c] = col
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    return img, lab


def make_camvid(root: Path, n_train: int = 4, n_val: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lab = _pair(rng)
            cv2.imwrite(str(root / split / f"s{i:03d}.png"), img[:, :, ::-1])
            cv2.imwrite(str(root / f"{split}annot" / f"s{i:03d}.png"), lab)
    return root


def make_ckpt(path: Path) -> Path:
    """tiny_ops with CamVid's 11 classes (ignore 11) at 64x64."""
    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.data.datasets import CAMVID_INFO
    from edgeseg.models import create_model
    from edgeseg.types import ModelSpec

    torch.manual_seed(0)
    model = create_model(_tiny.TINY, num_classes=11).eval()
    spec = ModelSpec(model=_tiny.TINY, num_classes=11, class_names=CAMVID_INFO.class_names,
                     palette=CAMVID_INFO.palette, ignore_index=CAMVID_INFO.ignore_index, input_hw=HW)
    return save_checkpoint(path, model, spec, force=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def ckpt(work) -> Path:
    return make_ckpt(work / "ckpt")


@pytest.fixture(scope="module")
def onnx_art(work, ckpt) -> Path:
    """A real fp32 ONNX artifact of the tiny checkpoint (exported once for the module)."""
    from edgeseg.export import export_checkpoint, get_exporter

    missing = get_exporter("onnx").check_environment()
    if missing:
        pytest.skip(f"onnx: missing {missing}")
    torch.set_num_threads(1)
    return export_checkpoint(ckpt, "onnx", "fp32", out=work / "onnx-fp32")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rehash(art: Path) -> None:
    """Recompute manifest.sha256 after a deliberate change (so that only the runtime can notice it)."""
    from edgeseg.export.base import MANIFEST
    from edgeseg.fileio import sha256_file

    m = json.loads((art / MANIFEST).read_text())
    m["sha256"] = {rel: sha256_file(art / rel) for rel in m["sha256"]}
    (art / MANIFEST).write_text(json.dumps(m))


# ================================================================================================== data

def _break(root: Path, case: str) -> Path | None:
    """Damage the CamVid-layout dataset at `root` (val split); return the file the message must name."""
    val, ann = root / "val", root / "valannot"
    img, lab = val / "s001.png", ann / "s001.png"
    if case == "truncated_image":
        data = img.read_bytes()
        img.write_bytes(data[: len(data) // 2])
        return img
    if case == "unreadable_image":
        img.write_bytes(b"this is not an image" * 10)
        return img
    if case == "zero_byte_image":
        img.write_bytes(b"")
        return img
    if case == "size_mismatch":
        cv2.imwrite(str(lab), np.zeros((32, 48), np.uint8))
        return lab
    if case == "label_out_of_range":
        a = cv2.imread(str(lab), cv2.IMREAD_UNCHANGED)
        a[0, :5] = 40
        cv2.imwrite(str(lab), a)
        return lab
    if case == "rgb_colour_mask":
        a = cv2.imread(str(lab), cv2.IMREAD_UNCHANGED)
        rgb = np.stack([a * 10, a * 3, a], -1).astype(np.uint8)  # channels differ
        cv2.imwrite(str(lab), rgb)
        return lab
    if case == "truncated_mask":
        data = lab.read_bytes()
        lab.write_bytes(data[: len(data) // 2])
        return lab
    if case == "image_without_label":
        lab.unlink()
        return img
    if case == "empty_split":
        for p in val.iterdir():
            p.unlink()
        return val
    if case == "missing_annotation_folder":
        shutil.rmtree(ann)
        return ann
    raise AssertionError(case)


PAIR_CASES = {  # one bad pair: --skip-bad skips and counts it
    "truncated_image": "truncated PNG",
    "unreadable_image": "unreadable image",
    "zero_byte_image": "empty file",
    "size_mismatch": "differs from its image",
    "label_out_of_range": "label values 40 outside",
    "rgb_colour_mask": "RGB colour mask",
    "truncated_mask": "truncated PNG",
    "image_without_label": "without a label",
}
SPLIT_CASES = {  # the whole split is unusable: an error even with --skip-bad
    "empty_split": "empty split",
    "missing_annotation_folder": "missing annotation folder",
}


@pytest.mark.parametrize("case", [*PAIR_CASES, *SPLIT_CASES])
def test_bad_data_is_one_line_naming_the_file(case, ckpt, tmp_path, capsys):
    data = make_camvid(tmp_path / "camvid")
    bad = _break(data, case)
    js = tmp_path / "m.json"
    argv = ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--json", str(js), "--no-progress"]
    assert main(argv) == 1
    _one_line_error(capsys.readouterr().err, bad, {**PAIR_CASES, **SPLIT_CASES}[case])
    assert not js.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["camvid"]  # no partial output
    if case in SPLIT_CASES:
        assert main(argv + ["--skip-bad"]) == 1
        _one_line_error(capsys.readouterr().err, bad)
        assert not js.exists()


@pytest.mark.parametrize("case", list(PAIR_CASES))
def test_skip_bad_warns_counts_and_leaves_the_pair_out(case, ckpt, tmp_path, capsys, caplog):
    data = make_camvid(tmp_path / "camvid")
    bad = _break(data, case)
    js = tmp_path / "m.json"
    with caplog.at_level("WARNING"):
        assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--json", str(js), "--no-progress",
                     "--skip-bad"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(bad) in w and "skipping" in w for w in warned), warned
    out = capsys.readouterr().out
    assert "2 images" in out and "1 bad pairs skipped" in out
    res = json.loads(js.read_text())
    assert res["skipped"] == 1 and res["num_images"] == 2
    # never a silent wrong metric: exactly the metrics of the dataset without that pair
    clean = make_camvid(tmp_path / "clean")
    (clean / "val" / "s001.png").unlink()
    (clean / "valannot" / "s001.png").unlink()
    js2 = tmp_path / "clean.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(clean), "--json", str(js2), "--no-progress"]) == 0
    ref = json.loads(js2.read_text())
    for k in ("miou", "aacc", "macc", "fwiou", "per_class_iou", "num_pixels"):
        assert res[k] == ref[k], k


def test_bad_data_through_the_real_process_one_line_and_skip_bad_warning(ckpt, tmp_path):
    """What a user sees: one stderr line without --debug; the traceback with --debug; with --skip-bad the
    warning on stderr and the count on stdout."""
    data = make_camvid(tmp_path / "camvid")
    bad = _break(data, "label_out_of_range")
    base = ["eval", "--checkpoint", ckpt, "--data", data, "--no-progress"]
    p = run_cli(*base)
    assert p.returncode == 1, p.stderr
    _one_line_error(p.stderr, bad, "outside the 11 classes")
    p = run_cli("--debug", *base, "--skip-bad")
    assert p.returncode == 0, p.stderr
    assert "skipping bad pair" in p.stderr and str(bad) in p.stderr
    assert "1 bad pairs skipped" in p.stdout


def test_debug_shows_the_traceback(ckpt, tmp_path, capsys):
    data = make_camvid(tmp_path / "camvid")
    _break(data, "rgb_colour_mask")
    argv = ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--no-progress"]
    for debug in (["--debug"], [], ):
        if debug:  # main re-raises: the interpreter prints the traceback
            with pytest.raises(DataError, match="RGB colour mask"):
                main(debug + argv)
            with pytest.raises(DataError):
                main(argv[:1] + ["--debug"] + argv[1:])  # the flag also works after the command
        else:
            assert main(argv) == 1
            _one_line_error(capsys.readouterr().err, "RGB colour mask")


def test_unexpected_exception_is_one_line_unless_debug(monkeypatch, capsys):
    from edgeseg.commands import models as models_cmd

    def boom(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(models_cmd, "run", boom)
    assert main(["models"]) == 1
    line = _one_line_error(capsys.readouterr().err, "ZeroDivisionError", "--debug")
    assert "second line" not in line
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "models"])


# ======================================================================================= checkpoints

class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_pickle_with_code_is_refused_never_executed(suffix, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    src = tmp_path / f"evil{suffix}"
    with open(src, "wb") as f:  # a plain pickle (not even a torch zip): the payload runs on unpickling
        pickle.dump({"state_dict": {"decode_head.conv_seg.weight": torch.zeros(150, 8, 1, 1)},
                     "x": _Evil(marker)}, f)
    assert not marker.exists()
    torch_zip = tmp_path / f"evil_zip{suffix}"
    torch.save({"state_dict": {"decode_head.conv_seg.weight": torch.zeros(150, 8, 1, 1)}, "x": _Evil(marker)},
               torch_zip)
    for f in (src, torch_zip):
        out = tmp_path / f"out-{f.stem}"
        assert main(["import", "--from", "offseg", str(f), "--model", "offseg_t", "--out", str(out)]) == 1
        _one_line_error(capsys.readouterr().err, f, "refused to load")
        assert not out.exists()
    assert not marker.exists()


def test_garbage_safetensors_given_to_import_is_an_artifact_error(tmp_path, capsys):
    src = tmp_path / "w.safetensors"
    src.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + os.urandom(64))
    out = tmp_path / "o"
    assert main(["import", "--from", "offseg", str(src), "--model", "offseg_t", "--out", str(out)]) == 1
    _one_line_error(capsys.readouterr().err, src)
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "header", "empty", "missing", "spec_garbage", "spec_wrong_types"])
def test_corrupted_checkpoint_is_one_line(damage, ckpt, tmp_path, capsys):
    ck = _copy(ckpt, tmp_path / "ck")
    w, s = ck / "model.safetensors", ck / "model.json"
    named = w
    if damage == "truncated":
        data = w.read_bytes()
        w.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "header":
        data = bytearray(w.read_bytes())
        data[8:40] = b"\xff" * 32
        w.write_bytes(bytes(data))
    elif damage == "empty":
        w.write_bytes(b"")
    elif damage == "missing":
        w.unlink()
    elif damage == "spec_garbage":
        s.write_text("{not json")
        named = s
    elif damage == "spec_wrong_types":
        d = json.loads(s.read_text())
        d["palette"] = "red"
        s.write_text(json.dumps(d))
        named = s
    data = make_camvid(tmp_path / "camvid", n_train=0, n_val=1)
    js = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(ck), "--data", str(data), "--json", str(js), "--no-progress"]) == 1
    _one_line_error(capsys.readouterr().err, named)
    assert not js.exists()


# ========================================================================================== artifacts

def test_sha256_mismatch_reported_by_verify_open_session_validate_and_bench(onnx_art, tmp_path, capsys):
    from edgeseg.export.base import verify_manifest
    from edgeseg.runtime import open_session

    art = _copy(onnx_art, tmp_path / "art")
    model = art / "model.onnx"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])  # truncated, manifest untouched
    for fn in (verify_manifest, open_session):
        with pytest.raises(ArtifactError, match="sha256 does not match") as e:
            fn(art)
        assert str(model) in str(e.value) and "\n" not in str(e.value)
    camvid = make_camvid(tmp_path / "camvid", n_train=0, n_val=1)
    js = tmp_path / "v.json"
    assert main(["validate", str(art), "--data", str(camvid), "--reference", str(onnx_art.parent / "ckpt"),
                 "--no-progress", "--json", str(js)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "sha256 does not match" in out and str(model) in out
    assert json.loads(js.read_text())[0]["status"] == "failed"
    assert main(["bench", str(art), "--runs", "1", "--warmup", "0", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "sha256 does not match" in out


def test_missing_file_and_broken_manifest(onnx_art, tmp_path):
    from edgeseg.export.base import MANIFEST
    from edgeseg.runtime import open_session

    art = _copy(onnx_art, tmp_path / "a1")
    (art / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="listed in manifest.json but missing"):
        open_session(art)
    art = _copy(onnx_art, tmp_path / "a2")
    text = (art / MANIFEST).read_text()
    (art / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        open_session(art)
    (art / MANIFEST).write_text(json.dumps({"target": "onnx"}))
    with pytest.raises(ArtifactError, match="missing"):
        open_session(art)


def test_truncated_onnx_with_matching_manifest_is_reported_by_the_runtime(onnx_art, tmp_path):
    from edgeseg.runtime import open_session

    art = _copy(onnx_art, tmp_path / "art")
    model = art / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    _rehash(art)  # sha256 matches now: the runtime itself must refuse the file
    with pytest.raises(ArtifactError, match="could not load") as e:
        open_session(art)
    assert str(model) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("record", [{"package": "os", "thread_control": "x", "int8_runtime_optimize": False},
                                    {"package": "../../evil", "thread_control": "x", "int8_runtime_optimize": False},
                                    {"package": "onnx"}, ["onnx"]])
def test_a_manifest_runtime_record_names_only_a_shipped_runtime(record, onnx_art, tmp_path):
    """The manifest's runtime record picks the session module that opens the artifact: a record from elsewhere or
    edited is refused in one line naming manifest.json before anything is imported from it."""
    from edgeseg.export.base import MANIFEST
    from edgeseg.runtime import open_session

    art = _copy(onnx_art, tmp_path / "art")
    m = json.loads((art / MANIFEST).read_text())
    m["runtime"] = record
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="runtime") as e:
        open_session(art)
    assert str(art / MANIFEST) in str(e.value) and "\n" not in str(e.value)


def _fake_artifact(onnx_art: Path, dst: Path, target: str, files: dict[str, bytes]) -> Path:
    """The onnx artifact's manifest relabelled as `target` with `files` (the first is the model file) holding
    truncated/garbage bytes and matching sha256: only the target's runtime can tell they are broken."""
    from edgeseg.export.base import MANIFEST
    from edgeseg.fileio import sha256_file

    dst.mkdir()
    m = json.loads((onnx_art / MANIFEST).read_text())
    for name, data in files.items():
        (dst / name).write_bytes(data)
    from edgeseg.targets import load_profile, runtime_record

    m.update(target=target, model_file=next(iter(files)), files=list(files),
             sha256={n: sha256_file(dst / n) for n in files},
             runtime=runtime_record(load_profile(target)))  # how `target`'s artifacts run (recorded at export)
    m.pop("device_kit", None)  # the fake holds no device kit (README, run script, expected/) of its own
    (dst / MANIFEST).write_text(json.dumps(m))
    return dst


def test_truncated_pte_and_xml_are_reported_by_bench_without_crashing(onnx_art, tmp_path):
    """A subprocess: a native runtime that crashed on a bad file would take the process down (rc < 0)."""
    pte = _fake_artifact(onnx_art, tmp_path / "et", "executorch-xnnpack",
                         {"model.pte": b"\x00\x00\x00\x00ET12" + os.urandom(200)})
    xml_text = (b'<?xml version="1.0"?>\n<net name="m" version="11">\n<layers>\n<layer id="0" name="image" '
                b'type="Parameter" version="opset1">\n<data shape="1,3,64,64" element_type="f32"/>\n<output>')
    xml = _fake_artifact(onnx_art, tmp_path / "ov", "openvino", {"model.xml": xml_text, "model.bin": b"\x00" * 16})
    p = run_cli("bench", pte, xml, "--runs", "1", "--warmup", "0", "--no-progress")
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    for art, f in ((pte, "model.pte"), (xml, "model.xml")):
        line = next(ln for ln in p.stdout.splitlines() if ln.startswith(f"FAILED {art.name}"))
        assert str(art / f) in line and "could not" in line, line


def test_wrong_input_size_layout_dtype_names_expected_and_actual(onnx_art, ckpt):
    from edgeseg.runtime import open_session

    for path in (onnx_art, ckpt):
        with open_session(path, num_threads=1) as s:
            ok = s.run(np.zeros((1, 3, 64, 64), np.float32))
            assert ok.shape == (1, 11, 16, 16)
            for bad, actual in ((np.zeros((1, 3, 32, 32), np.float32), "(1, 3, 32, 32)"),
                                (np.zeros((1, 64, 64, 3), np.float32), "(1, 64, 64, 3)"),
                                (np.zeros((3, 64, 64), np.float32), "(3, 64, 64)"),
                                (np.zeros((1, 3, 64, 64), np.uint8), "uint8")):
                with pytest.raises(UsageError) as e:
                    s.run(bad)
                msg = str(e.value)
                assert "float32 NCHW shape (N,3,64,64)" in msg and actual in msg and "\n" not in msg, msg
            for bad, actual in ((np.zeros((1, 3, 48, 64), np.float32), "(1, 3, 48, 64)"),
                                (np.zeros((1, 64, 64, 3), np.float32), "(1, 64, 64, 3)")):
                with pytest.raises(UsageError) as e:
                    s.predict_logits(bad)
                assert actual in str(e.value) and "(N,3," in str(e.value), str(e.value)
            with pytest.raises(UsageError, match=r"expected an RGB uint8 \(H,W,3\) image, got float32"):
                s.segment(np.zeros((64, 64, 3), np.float32))


# ============================================================================ existing outputs, exit codes

# (existing outputs are refused without --force: tests/test_no_overwrite.py, one case per command and output)


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "no_such_model", "--data", "x", "--out", "o"], "no_such_model"),
    (["eval", "--input-size", "10x"], "--input-size"),
    (["eval", "--input-size", "100x100"], "multiples of 32"),
    (["eval", "--input-size", "0x64"], "--input-size"),
    (["eval", "--batch-size", "0"], "--batch-size"),
    (["train", "--model", "tiny_ops", "--data", "x", "--crop", "ax4"], "--crop"),
    (["train", "--model", "tiny_ops", "--data", "x", "--iters", "0"], "--iters"),
    (["export", "--checkpoint", "CKPT", "--target", "no_such_target"], "no_such_target"),
    (["export", "--checkpoint", "CKPT", "--target", "onnx", "--input-size", "abc"], "--input-size"),
    (["export", "--checkpoint", "CKPT", "--target", "onnx", "--precision", "int8", "--option", "nope=1"], "nope"),
    (["export", "--target", "onnx"], "--checkpoint"),
    (["import", "--from", "offseg", "x.pth", "--model", "segnext_t", "--out", "o"], "segnext_t"),
    (["quant-report", "--checkpoint", "CKPT", "--target", "onnx", "--data", "x", "--limit", "0"],
     "--limit 0: must be >= 1"),
    (["validate", "CKPT", "--data", "x", "--max-images", "0"], "--max-images 0: must be >= 1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_usage_errors_exit_2(argv, needle, ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(ckpt) if a == "CKPT" else a for a in argv]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, needle)
    assert list(tmp_path.iterdir()) == []


def test_export_zero_input_size_is_a_usage_error(ckpt, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(ckpt), "--target", "onnx", "--input-size", "0x64", "--out",
                 str(tmp_path / "o")]) == 2
    _one_line_error(capsys.readouterr().err, "--input-size")


@pytest.mark.parametrize("argv", [
    ["train", "--model", "tiny_ops", "--data", "x", "--iters", "2", "--epochs", "1"],  # conflicting flags
    ["eval", "--format", "nope"],
    ["eval", "--no-such-flag"],
    ["no-such-command"],
])
def test_argparse_usage_errors_exit_2_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("edgeseg: error: ") and "Traceback" not in err


def test_failures_exit_1(tmp_path, capsys):
    for argv, needle in (
            (["eval", "--checkpoint", str(tmp_path / "nope")], "checkpoint not found"),
            (["validate", str(tmp_path / "nope"), "--data", str(tmp_path)], None),
            (["import", "--from", "offseg", str(tmp_path / "nope.pth"), "--model", "offseg_t", "--out",
              str(tmp_path / "o")], "not found")):
        rc = main(argv)
        captured = capsys.readouterr()
        assert rc == 1, (argv, captured)
        if needle:
            _one_line_error(captured.err, needle, tmp_path / "nope")
    assert not (tmp_path / "o").exists()


# ================================================================================== SIGKILL: export

def _visible_siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".") and p != out)


def _hidden_leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _kill_when(cmd: list[str], ready, max_wait: float = 180.0, sig=signal.SIGKILL, stderr: list | None = None
               ) -> tuple[int, float]:
    """Start `cmd`, send `sig` as soon as `ready(t, pid)` is true (polled every 5 ms). Returns (returncode, t)."""
    # SIGINT as a terminal's Ctrl-C delivers it: a shell without job control starts background jobs (`pytest &`,
    # nohup) with SIGINT ignored, the child inherits that, and Python then installs no KeyboardInterrupt handler
    # (the export ran to completion, rc 0, when the suite ran in the background)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            t = time.monotonic() - t0
            if ready(t, proc.pid) or t > max_wait:
                proc.send_signal(sig)
                break
            time.sleep(0.005)
        _, err = proc.communicate(timeout=120)
        if stderr is not None:
            stderr.append(err)
        return proc.returncode, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _assert_absent_or_complete(out: Path) -> str:
    from edgeseg.export.base import verify_manifest

    assert _visible_siblings(out) == [], _visible_siblings(out)  # no visible temporary next to the output
    if not out.exists():
        return "absent"
    verify_manifest(out)  # complete: every file present and matching its sha256
    return "complete"


def test_sigkill_during_export_leaves_nothing_or_a_complete_artifact(ckpt, onnx_art, tmp_path):
    from edgeseg.export.base import MANIFEST

    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "art"
    cmd = cli_cmd("export", "--checkpoint", ckpt, "--target", "onnx", "--out", out)

    def tmp_dirs(pid):  # the temporary folder of that process (not a leftover of a killed predecessor)
        return [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.tmp-{pid}-")]

    def tmp_with(name):
        return lambda t, pid: any((d / name).exists() for d in tmp_dirs(pid))

    outcomes = {}
    # early (importing / loading), as soon as the temporary folder exists, once the model file is written, and
    # once the first manifest is written (the proof runs next)
    for label, ready in (("0.5s", lambda t, pid: t > 0.5), ("tmpdir", lambda t, pid: bool(tmp_dirs(pid))),
                         ("model", tmp_with("model.onnx")), ("manifest", tmp_with(MANIFEST))):
        rc, t = _kill_when(cmd, ready)
        assert rc == -signal.SIGKILL, (label, rc)
        outcomes[label] = _assert_absent_or_complete(out)
        # a SIGKILL leaves at most its own hidden temporary: each export removes those of killed predecessors
        assert len(_hidden_leftovers(out)) <= 1 and all(n.startswith(".") for n in _hidden_leftovers(out))
    assert outcomes["0.5s"] == "absent" and outcomes["tmpdir"] == "absent", outcomes
    # SIGINT (Ctrl-C) as soon as the temporary folder exists, and once the model file is written: exit 130, one
    # line, nothing written, nothing left over
    for label, trigger in (("tmpdir", lambda t, pid: bool(tmp_dirs(pid))), ("model", tmp_with("model.onnx"))):
        errs: list[str] = []
        rc, _ = _kill_when(cmd, trigger, sig=signal.SIGINT, stderr=errs)
        assert rc == 130 and errs[0].strip().splitlines()[-1] == "edgeseg: interrupted", (label, rc, errs[0][-2000:])
        assert "Traceback" not in errs[0]
        assert not out.exists() and _visible_siblings(out) == [] and _hidden_leftovers(out) == [], label
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _assert_absent_or_complete(out) == "complete"
    assert _hidden_leftovers(out) == []
    def files(folder: Path) -> dict[str, bytes]:  # every file, the device kit's expected/ folder included
        return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}

    before = files(out)
    # kill a --force re-export over the complete artifact right after its manifest is written: the previous
    # artifact survives intact (or, in the instant between the two renames, nothing is there)
    rc, _ = _kill_when(cmd + ["--force"], tmp_with(MANIFEST))
    assert rc == -signal.SIGKILL
    state = _assert_absent_or_complete(out)
    if state == "complete":
        assert files(out) == before
    leftovers = _hidden_leftovers(out)
    assert leftovers and all(n.startswith(".") for n in leftovers)
    from edgeseg.fileio import clean_stale  # what the next write of `out` calls first

    assert sorted(p.name for p in clean_stale(out)) == leftovers and _hidden_leftovers(out) == []


def test_clean_stale_keeps_live_temporaries(tmp_path):
    from edgeseg.fileio import atomic_dir, clean_stale

    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()
    for name in (f".out.tmp-{dead.pid}-abc", f".out.old-{dead.pid}", f".out.tmp-{live}-abc", f".out.tmp-{dead.pid}",
                 f".out.tmp-{dead.pid}.mp4", f".out.tmp-{live}.mp4", ".out.tmp-notapid", f".other.tmp-{dead.pid}-x"):
        (tmp_path / name).mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", f".out.tmp-{live}-abc", f".out.tmp-{live}.mp4", ".out.tmp-notapid", f".other.tmp-{dead.pid}-x"])
    assert clean_stale(out) == []


def test_fileio_reads_the_umask_without_setting_it(tmp_path, monkeypatch):
    """Setting the umask to read it would race with other threads creating files; the output folder still gets
    the usual permissions (mkdtemp alone makes 0700)."""
    import edgeseg.fileio as fileio

    old = os.umask(0o027)
    try:
        def no_umask(_mask):
            raise AssertionError("os.umask called while writing outputs")

        monkeypatch.setattr(fileio.os, "umask", no_umask)
        with fileio.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


# ================================================================================= SIGKILL: training

def _weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_sigkill_during_training_then_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    data = make_camvid(tmp_path / "camvid", n_train=4, n_val=2)
    iters = 24

    def train(out, *extra):
        return cli_cmd("train", "--model", _tiny.TINY, "--data", data, "--iters", iters, "--batch-size", 2,
                       "--crop", "32x32", "--input-size", "64x64", "--device", "cpu", "--out", out,
                       "--val-interval", iters, "--save-interval", 4, "--warmup-iters", 2, "--lr", "2e-3",
                       "--seed", 5, "--workers", 1, "--no-progress", *extra)

    ref, run = tmp_path / "ref", tmp_path / "run"
    ref_proc = subprocess.Popen(train(ref), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                cwd=REPO)
    try:
        # kill the second run right after its first save (train_state.safetensors appears), mid-way through the run
        rc, _ = _kill_when(train(run), lambda t, pid: (run / "train_state.safetensors").exists())
        assert rc == -signal.SIGKILL
        state = load_state(run / "train_state.safetensors")
        assert 4 <= state["step"] < iters, state["step"]
        assert [p.name for p in run.iterdir() if not p.name.startswith(".") and ".tmp" in p.name] == []
        from edgeseg.checkpoint import load_checkpoint

        load_checkpoint(run / "last")  # the last saved checkpoint is complete
        # without --resume the run folder is not overwritten
        assert main(train(run)[3:]) == 2
        _one_line_error(capsys.readouterr().err, run, "not empty")
        p = subprocess.run(train(run, "--resume"), capture_output=True, text=True, env=_env(), cwd=REPO,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        out, err = ref_proc.communicate(timeout=300)
        assert ref_proc.returncode == 0, err[-3000:]
    finally:
        if ref_proc.poll() is None:
            ref_proc.kill()
            ref_proc.wait()
    wa, wb = _weights(ref / "last"), _weights(run / "last")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert load_state(run / "train_state.safetensors")["step"] == iters


# ============================================================================== property-based: manifest

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                     max_leaves=12)
_REQUIRED = ("target", "precision", "model", "model_file", "input", "output", "mean", "std", "class_names",
             "palette", "ignore_index", "input_hw")


def _valid_manifest(onnx_art: Path) -> dict:
    from edgeseg.export.base import MANIFEST

    return json.loads((onnx_art / MANIFEST).read_text())


def _check_only_artifact_error(art: Path) -> None:
    from edgeseg.export.base import read_manifest, verify_manifest

    for fn in (read_manifest, verify_manifest):
        try:
            fn(art)
        except ArtifactError as e:
            assert "\n" not in str(e)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=300), _json.map(lambda v: json.dumps(v).encode()),
                     st.text(max_size=200).map(str.encode)))
def test_fuzz_manifest_bytes_and_random_json(raw, tmp_path_factory):
    art = tmp_path_factory.mktemp("m")
    (art / "manifest.json").write_bytes(raw)
    _check_only_artifact_error(art)


def test_deeply_nested_manifest_is_an_artifact_error(tmp_path):
    (tmp_path / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    _check_only_artifact_error(tmp_path)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(drop=set(), replace={"sha256": ["model.onnx"]})
@given(drop=st.sets(st.sampled_from(_REQUIRED + ("sha256", "files")), max_size=3),
       replace=st.dictionaries(st.sampled_from(_REQUIRED + ("sha256", "files")), _json, max_size=3))
def test_fuzz_manifest_missing_keys_and_wrong_types(drop, replace, onnx_art, tmp_path_factory):
    """A manifest with keys missing or of the wrong type: verify_manifest either accepts it or raises
    ArtifactError (one line), never another exception."""
    art = tmp_path_factory.mktemp("m")
    shutil.copy(onnx_art / "model.onnx", art / "model.onnx")
    m = _valid_manifest(onnx_art)
    for k in drop:
        m.pop(k, None)
    m.update(replace)
    (art / "manifest.json").write_text(json.dumps(m))
    _check_only_artifact_error(art)


@pytest.mark.parametrize("case", ["sha256_list", "sha256_non_str_digest", "sha256_path_escape",
                                  "model_file_unhashed", "model_file_absolute"])
def test_manifest_types_and_paths_are_checked(case, onnx_art, tmp_path):
    """Named cases of the fuzz test above, and the security side: a manifest must not make open_session load a
    file whose sha256 it does not check (outside the folder, or not listed)."""
    from edgeseg.export.base import verify_manifest

    art = _copy(onnx_art, tmp_path / "art")
    m = _valid_manifest(onnx_art)
    outside = tmp_path / "outside.onnx"
    shutil.copy(onnx_art / "model.onnx", outside)
    if case == "sha256_list":
        m["sha256"] = list(m["sha256"])
    elif case == "sha256_non_str_digest":
        m["sha256"] = {"model.onnx": 5}
    elif case == "sha256_path_escape":
        m["sha256"] = {**m["sha256"], "../outside.onnx": m["sha256"]["model.onnx"]}
    elif case == "model_file_unhashed":
        shutil.copy(outside, art / "other.onnx")
        m["model_file"] = "other.onnx"
    elif case == "model_file_absolute":
        m["model_file"] = str(outside)
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError):
        verify_manifest(art)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode())),
       replace=st.dictionaries(st.sampled_from(["model", "class_names", "palette", "ignore_index", "input_hw", "mean",
                                                "std", "quant", "provenance"]), _json, max_size=3),
       num_classes=st.one_of(st.none(), st.integers(-2, 16), st.text(max_size=3), st.floats(0, 20)))
def test_fuzz_checkpoint_spec_only_artifact_error(raw, replace, num_classes, ckpt, tmp_path_factory):
    """model.json: random bytes/JSON, or the real one with fields of the wrong type -> ArtifactError only."""
    from edgeseg.checkpoint import load_checkpoint, load_spec

    d = tmp_path_factory.mktemp("s")
    (d / "model.json").write_bytes(raw)
    try:
        load_spec(d)
    except ArtifactError as e:
        assert "\n" not in str(e)
    shutil.copy(ckpt / "model.safetensors", d / "model.safetensors")
    spec = json.loads((ckpt / "model.json").read_text())
    spec.update(replace)
    if num_classes is not None:  # small values only: a huge class count would allocate a huge classifier
        spec["num_classes"] = num_classes
    (d / "model.json").write_text(json.dumps(spec))
    try:
        load_checkpoint(d)
    except EdgesegError as e:
        assert "\n" not in str(e)


# ============================================================================= property-based: classes.txt

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(text="road 1 2 \u00b2\n")  # a Unicode digit that str.isdigit() accepts and int() does not
@given(text=st.text(max_size=120))
def test_fuzz_folder_classes_txt_only_dataerror(text, tmp_path_factory):
    """The dataset readers are fuzzed in test_datasets.py; the folder layout's classes.txt was not."""
    from edgeseg.data.datasets import open_dataset

    root = tmp_path_factory.mktemp("ct")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    cv2.imwrite(str(root / "images" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(root / "masks" / "a.png"), np.zeros((8, 8), np.uint8))
    (root / "classes.txt").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        ds = open_dataset(root)
    except DataError as e:
        assert "\n" not in str(e) and "classes.txt" in str(e)
    else:
        assert ds.info.num_classes >= 1 and len(ds.info.palette) == ds.info.num_classes
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ds.info.palette)


def test_ctrl_c_turned_into_another_error_still_exits_130():
    """A SIGINT that a C extension turns into its own error (ONNX Runtime's import raised "ImportError:
    initialization failed" when Ctrl-C landed during it) is still reported as an interruption."""
    from types import SimpleNamespace

    from edgeseg import cli

    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None
        return 0

    assert cli._run(SimpleNamespace(_run=command), debug=False) == (130, cli.INTERRUPTED)

    # without a SIGINT the same error is an ordinary failure
    def failing(args):
        raise ImportError("initialization failed")

    code, err = cli._run(SimpleNamespace(_run=failing), debug=False)
    assert code == 1 and "ImportError: initialization failed" in err


def test_ctrl_c_swallowed_by_a_library_publishes_nothing_and_exits_130(tmp_path):
    """A SIGINT whose KeyboardInterrupt some library catches and drops (CI once saw an export interrupted as soon
    as its temporary folder existed run to the end and exit 0) still stops every commit of an output."""
    from types import SimpleNamespace

    from edgeseg import cli, fileio

    out = tmp_path / "art"

    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except BaseException:  # what a library that swallows the interrupt does
            pass
        with fileio.atomic_dir(out) as d:
            (d / "model.onnx").write_bytes(b"x")
        return 0

    try:
        assert cli._run(SimpleNamespace(_run=command), debug=False) == (130, cli.INTERRUPTED)
        assert os.listdir(tmp_path) == []  # neither the output nor its temporary
        # every way of writing an output refuses while the interrupt stands
        with pytest.raises(KeyboardInterrupt):
            fileio.write_text(tmp_path / "r.json", "{}")
        with pytest.raises(KeyboardInterrupt):
            with fileio.atomic_path(tmp_path / "m.pte") as p:
                p.write_bytes(b"x")
        assert os.listdir(tmp_path) == []
    finally:
        fileio.reset_interrupt()
    # the next command in the same process starts clean
    assert cli._run(SimpleNamespace(_run=lambda a: 0), debug=False) == (0, None)


def test_signal_stack_is_edgesegs_after_a_session_opens(checkpoints):
    """A Ctrl-C after in-process OpenVINO and ExecuTorch sessions killed the test process with SIGSEGV (the main
    thread's alternate signal stack pointed at memory a runtime had released): sessions re-install edgeseg's own
    stack after they load (edgeseg/sigstack.py), and it is the main thread's alternate stack afterwards."""
    import ctypes
    import sys

    from edgeseg import sigstack
    from edgeseg.runtime import open_session

    if not sys.platform.startswith("linux"):
        pytest.skip("sigaltstack is set on Linux only")
    libc = ctypes.CDLL(None, use_errno=True)
    foreign = ctypes.create_string_buffer(1 << 16)  # what a runtime might leave behind
    libc.sigaltstack(ctypes.byref(sigstack._StackT(ctypes.addressof(foreign), 0, len(foreign))), None)
    with open_session(checkpoints(_tiny.TINY)):
        pass
    now = sigstack._StackT()
    libc.sigaltstack(None, ctypes.byref(now))
    assert now.ss_sp == ctypes.addressof(sigstack._buffer) and now.ss_size == 1 << 20
