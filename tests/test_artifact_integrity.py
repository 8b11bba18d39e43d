"""An artifact runs only what its manifest hashes, and a checkpoint loads only sane values.

- every file a runtime opens is listed in manifest.json with its sha256, read once and checked, so that what was
  hashed is what runs (OpenVINO's model.bin, ONNX external data), and nothing outside the folder is followed;
- the recorded source checkpoint (validate's default reference) must still hash as it did at export;
- a .pte that crashes the ExecuTorch runtime is one line, not an aborted process;
- non-finite weights and out-of-range model.json values are refused at load, naming the file and the key.

Exports come from the session's shared cache (tests/conftest.py `exports`); the tiny models run at 64x64.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402  (registers tiny_ops)

from edgeseg.errors import ArtifactError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BOOT = ("import sys; sys.path.insert(0, {tests!r}); import _tiny; from edgeseg.cli import main; "
        "sys.argv[0] = 'edgeseg'; raise SystemExit(main(sys.argv[1:]))").format(tests=str(TESTS))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _write_manifest(art: Path, m: dict, rehash: tuple[str, ...] = ()) -> None:
    for rel in rehash:
        m["sha256"][rel] = hashlib.sha256((art / rel).read_bytes()).hexdigest()
    (art / "manifest.json").write_text(json.dumps(m))


def _zeros(session) -> np.ndarray:
    inp = session.manifest.input
    return np.zeros([1, *inp["shape"][1:]], np.uint8 if inp["dtype"] == "uint8" else np.float32)


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


# ------------------------------------------------------------------------------------------------ OpenVINO

@pytest.mark.exports([("openvino", _tiny.TINY, "fp32")])
def test_openvino_weights_must_be_listed_hashed_and_inside(exports, tmp_path):
    from edgeseg.artifact import verify_manifest
    from edgeseg.runtime import open_session
    from edgeseg.targets.openvino.session import OpenVINOSession

    src = exports.get("openvino", _tiny.TINY, "fp32")
    with open_session(src) as s:
        want = s.run(_zeros(s))
    # model.bin not listed: today OpenVINO reads it beside model.xml anyway, tampered or not
    art = _copy(src, tmp_path / "unlisted")
    m = _manifest(art)
    m["files"].remove("model.bin")
    del m["sha256"]["model.bin"]
    _write_manifest(art, m)
    with pytest.raises(ArtifactError) as e:
        open_session(art)
    _one_line(e, art / "model.bin", "not listed")
    # ... nor a link to a file outside the folder
    (tmp_path / "outside.bin").write_bytes((src / "model.bin").read_bytes())
    (art / "model.bin").unlink()
    (art / "model.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(ArtifactError) as e:
        open_session(art)
    _one_line(e, "model.bin")
    # listed, but changed after the manifest was verified: the session reads the bytes it checks
    art = _copy(src, tmp_path / "swapped")
    manifest = verify_manifest(art)
    data = bytearray((art / "model.bin").read_bytes())
    data[-4:] = b"\x7f\x7f\x7f\x7f"
    (art / "model.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as e:
        OpenVINOSession(art, manifest)
    _one_line(e, art / "model.bin", "sha256 does not match")
    # the intact artifact still runs, from the verified bytes, with the same output
    with open_session(_copy(src, tmp_path / "intact")) as s:
        np.testing.assert_array_equal(s.run(_zeros(s)), want)


# ------------------------------------------------------------------------------------------------ ONNX

@pytest.mark.exports([("onnx", _tiny.TINY, "fp32")])
def test_onnx_external_data_must_be_listed_and_hashed(exports, tmp_path):
    import onnx

    from edgeseg.artifact import verify_manifest
    from edgeseg.runtime import open_session
    from edgeseg.targets.onnx.session import OnnxSession

    src = exports.get("onnx", _tiny.TINY, "fp32")
    with open_session(src) as s:
        want = s.run(_zeros(s))
    art = _copy(src, tmp_path / "external")
    model = onnx.load(str(art / "model.onnx"))
    onnx.save_model(model, str(art / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.data")
    m = _manifest(art)
    _write_manifest(art, m, rehash=("model.onnx",))
    # weights.data is not listed: today ONNX Runtime loads it unhashed
    with pytest.raises(ArtifactError) as e:
        open_session(art)
    _one_line(e, art / "weights.data", "not listed")
    # listed with its sha256: loaded from the verified bytes, same output
    m["files"].append("weights.data")
    _write_manifest(art, m, rehash=("weights.data",))
    with open_session(art) as s:
        np.testing.assert_allclose(s.run(_zeros(s)), want, rtol=0, atol=1e-6)
    # changed after verification: refused by the session itself
    manifest = verify_manifest(art)
    data = bytearray((art / "weights.data").read_bytes())
    data[:4] = b"\x00\x00\xc0\x7f"  # a NaN
    (art / "weights.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as e:
        OnnxSession(art, manifest)
    _one_line(e, art / "weights.data", "sha256 does not match")


# ------------------------------------------------------------------------------------------------ reference

def _camvid_ckpt(path: Path, seed: int) -> Path:
    """tiny_ops with CamVid's classes at 64x64 (validate compares the classes with the dataset's)."""
    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.data.datasets import CAMVID_INFO
    from edgeseg.models import create_model
    from edgeseg.types import ModelSpec

    torch.manual_seed(seed)
    model = create_model(_tiny.TINY, num_classes=CAMVID_INFO.num_classes).eval()
    spec = ModelSpec(model=_tiny.TINY, num_classes=CAMVID_INFO.num_classes, class_names=CAMVID_INFO.class_names,
                     palette=CAMVID_INFO.palette, ignore_index=CAMVID_INFO.ignore_index, input_hw=(64, 64))
    return save_checkpoint(path, model, spec, force=True)


def _camvid(root: Path) -> Path:
    import cv2

    rng = np.random.default_rng(0)
    for d in ("val", "valannot"):
        (root / d).mkdir(parents=True)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "val" / "a.png"), img)
    cv2.imwrite(str(root / "valannot" / "a.png"), np.full((64, 64), 3, np.uint8))
    return root


def test_changed_reference_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    from edgeseg.cli import main
    from edgeseg.eval.references import resolve_reference
    from edgeseg.export import export_checkpoint

    torch.set_num_threads(1)
    ckpt = _camvid_ckpt(tmp_path / "ckpts" / "camvid", seed=0)
    art = export_checkpoint(ckpt, "onnx", "fp32", out=tmp_path / "arts" / "onnx-fp32", proof_images=1)
    m = _manifest(art)
    assert resolve_reference(art, m, None) == ("checkpoint", ckpt.resolve())
    data = _camvid(tmp_path / "camvid")
    base = ["validate", str(art), "--data", str(data), "--max-images", "1", "--no-progress"]
    assert main(base) == 0
    capsys.readouterr()

    _camvid_ckpt(ckpt, seed=1)  # retrained in place: today validate compares with it ("agreement 0.0 %")
    with pytest.raises(ArtifactError) as e:
        resolve_reference(art, m, None)
    _one_line(e, "the reference checkpoint changed", ckpt / "model.safetensors")
    assert main(base) == 1
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("FAILED onnx-fp32")]
    assert "the reference checkpoint changed" in line
    # the recorded path is followed only as export records it: absolute, with its sha256, no link on the way
    digests = m["source_checkpoint"]["sha256"]
    link = tmp_path / "link"
    link.symlink_to(ckpt.parent)
    with pytest.raises(ArtifactError) as e:
        resolve_reference(art, {**m, "source_checkpoint": {"path": str(link / "camvid"), "sha256": digests}}, None)
    _one_line(e, "the reference checkpoint changed", "symbolic link")
    monkeypatch.chdir(tmp_path)  # a relative path would be looked up from here: it is not followed
    for rec in ({"path": "ckpts/camvid", "sha256": digests}, {"path": str(ckpt.resolve())},
                {"path": str(tmp_path / "gone"), "sha256": digests}):
        assert resolve_reference(art, {**m, "source_checkpoint": rec}, None) is None, rec


# ------------------------------------------------------------------------------------------------ ExecuTorch

@pytest.mark.exports([("executorch-xnnpack", _tiny.TINY, "fp32")])
def test_corrupt_pte_is_one_line_not_an_abort(exports, tmp_path):
    """A subprocess: a .pte that aborts the ExecuTorch runtime would take the process down (rc 134 today)."""
    src = exports.get("executorch-xnnpack", _tiny.TINY, "fp32")
    art = _copy(src, tmp_path / "bad")
    data = bytearray((art / "model.pte").read_bytes())
    data[:16] = bytes(b ^ 0xA5 for b in data[:16])  # the flatbuffer header: the runtime aborts on it
    (art / "model.pte").write_bytes(bytes(data))
    _write_manifest(art, _manifest(art), rehash=("model.pte",))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), EDGESEG_DEBUG="")
    p = subprocess.run([sys.executable, "-c", BOOT, "bench", str(art), "--runs", "1", "--warmup", "0",
                        "--threads", "1", "--no-progress"], capture_output=True, text=True, env=env, timeout=240,
                       cwd=REPO)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])  # the command finished: its FAILED row and exit 1
    assert "Traceback" not in p.stderr and "terminate called" not in p.stderr, p.stderr[-2000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("FAILED bad")]
    assert str(art / "model.pte") in line and "could not load" in line and "crashed" in line, line


@pytest.mark.exports([("executorch-xnnpack", _tiny.TINY, "fp32")])
def test_pte_probe_runs_once_per_program(exports, monkeypatch):
    import edgeseg.targets.executorch.session as et
    from edgeseg.runtime import open_session

    calls = []
    real = et._probe_in_child
    monkeypatch.setattr(et, "_probe_in_child", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(et, "_PROBED", set())
    src = exports.get("executorch-xnnpack", _tiny.TINY, "fp32")
    for _ in range(2):
        with open_session(src, num_threads=1) as s:
            assert s.run(_zeros(s)).shape[0] == 1
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------------ checkpoints

def test_non_finite_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from edgeseg.checkpoint import load_checkpoint
    from edgeseg.export import export_checkpoint

    ckpt = _tiny.make_checkpoint(tmp_path / "nan", _tiny.TINY, (64, 64))
    state = load_file(str(ckpt / "model.safetensors"))
    key = "decode_head.cls.weight"
    state[key][0, 0, 0, 0] = float("nan")
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(ArtifactError) as e:
        load_checkpoint(ckpt)
    _one_line(e, ckpt / "model.safetensors", key, "NaN")
    state[key][0, 0, 0, 0] = float("inf")
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(ArtifactError) as e:  # export would publish a 100 % proof of NaN against NaN
        export_checkpoint(ckpt, "onnx", "fp32", out=tmp_path / "art")
    _one_line(e, key)
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("key,value", [("mean", [math.nan, 116.28, 103.53]), ("mean", [math.inf, 1.0, 1.0]),
                                       ("std", [58.4, math.inf, 57.4]), ("std", [58.4, 0.0, 57.4]),
                                       ("std", [58.4, -1.0, 57.4]), ("palette", 256), ("palette", -1),
                                       ("palette", 1.5), ("input_hw", [64.5, 64]), ("input_hw", [64, True]),
                                       ("input_hw", ["64", 64])])
def test_model_json_values_out_of_range_name_file_and_key(key, value, tmp_path):
    from edgeseg.checkpoint import load_checkpoint

    ckpt = _tiny.make_checkpoint(tmp_path / "ckpt", _tiny.TINY, (64, 64))
    d = json.loads((ckpt / "model.json").read_text())
    if key == "palette":
        d["palette"][1][2] = value
    else:
        d[key] = value
    (ckpt / "model.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError) as e:
        load_checkpoint(ckpt)
    _one_line(e, ckpt / "model.json", key)


@pytest.mark.exports([("onnx", _tiny.TINY, "fp32")])
@pytest.mark.parametrize("key,value", [("mean", [math.nan, 1.0, 1.0]), ("std", [1.0, math.inf, 1.0]),
                                       ("std", [1.0, 0.0, 1.0])])
def test_manifest_mean_std_must_be_finite(key, value, exports, tmp_path):
    from edgeseg.artifact import read_manifest

    art = _copy(exports.get("onnx", _tiny.TINY, "fp32"), tmp_path / "art")
    m = _manifest(art)
    m[key] = value
    _write_manifest(art, m)
    with pytest.raises(ArtifactError) as e:
        read_manifest(art)
    _one_line(e, "manifest.json", key)
