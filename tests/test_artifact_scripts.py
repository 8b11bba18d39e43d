"""The device kit of an artifact folder (edgeseg.export.device_kit): README.md, run_<runtime>.py and expected/.

Each run script is run, from a copy of its artifact folder, by the Python of a clean venv (`python -m venv
--without-pip`, no system site-packages, run with `-I`) whose site-packages holds only the runtime's distributions,
numpy and Pillow, with everything they require: edgeseg, OpenCV (and torch, except for ExecuTorch, whose Python
runtime links libtorch) cannot be imported there, which the test asserts first. The distributions are this venv's
own installed files, linked in (the same versions, no network, ~1 s a venv); a `pip install` of the versions the
README names gives the same venv in ~10 s where an index is reachable, and was checked by hand for onnxruntime and
openvino. `--self-test` must reproduce the class maps edgeseg's session made at export (>= 99.9 %).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402  (registers tiny_ops)

from edgeseg.artifact import MANIFEST, verify_manifest  # noqa: E402
from edgeseg.errors import ArtifactError  # noqa: E402
from edgeseg.export import device_kit  # noqa: E402

from edgeseg.targets import flows  # noqa: E402

# (target, precision, options) whose device kit runs in a clean venv: each target package's FLOW.device_kit
CASES = [(t, p, dict(o)) for t, f in flows().items() for p, o in f.device_kit]
IDS = ["-".join([t, p, *(str(v) for v in o.values())]) for t, p, o in CASES]


# ---------------------------------------------------------------------------------------------- clean venvs
def _closure(names: list[str]) -> list:
    """The installed distributions `names` need (their Requires-Dist without extras, recursively)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement this venv lacks (the runtime imports without it)
        seen[name] = dist
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def make_clean_venv(root: Path, dists: list[str]) -> Path:
    """A venv at `root` holding only `dists` and their requirements (linked from this venv's installed files);
    returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True)
    site = next((root / "lib").glob("python3*/site-packages"))
    for dist in _closure(dists):
        for top in sorted({f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}):
            if top == "__pycache__" or top.endswith(".pth") or (site / top).exists():
                continue
            src = Path(dist.locate_file(top))
            if src.exists():
                (site / top).symlink_to(src, target_is_directory=src.is_dir())
    return root / "bin" / "python"


@pytest.fixture(scope="session")
def clean_python(tmp_path_factory):
    """`clean_python(runtime) -> python` of a clean venv with only that runtime, numpy and Pillow (made once)."""
    made: dict[str, Path] = {}

    def get(runtime: str) -> Path:
        if runtime not in made:
            py = make_clean_venv(tmp_path_factory.mktemp(f"venv-{runtime}"),
                                 device_kit.runtime_packages(runtime) + ["numpy", "pillow"])
            # the venv is clean: edgeseg and OpenCV are not importable there, torch only where the runtime needs it
            hidden = ["edgeseg", "cv2"] + ([] if runtime == "executorch" else ["torch"])
            probe = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in %r))" % (hidden,)
            assert _run([str(py), "-I", "-c", probe]).returncode == 0, f"{hidden} importable in the clean venv"
            made[runtime] = py
        return made[runtime]

    return get


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.exports([("onnx", _tiny.TINY, "fp32")])
def test_kit_is_written_hashed_and_described(exports, tmp_path):
    art = exports.get("onnx", _tiny.TINY, "fp32")
    m = json.loads((art / MANIFEST).read_text())
    kit = m["device_kit"]
    assert kit["runtime"] == "onnx" and kit["script"] == "run_onnx.py"
    assert {"README.md", "run_onnx.py", "expected/expected.json"} <= set(kit["files"]) == set(kit["sha256"])
    assert m["files"] == ["model.onnx"] and set(m["sha256"]) == {"model.onnx"}  # the model's, as before
    assert kit["self_test"]["min_agreement"] == device_kit.SELF_TEST_MIN_AGREEMENT
    readme = (art / "README.md").read_text()
    for fact in ("`image`", "float32", "[1, 3, 64, 64]", "NCHW", str(m["mean"]), str(m["std"]), "`logits`",
                 "stride 4", "bilinear", *_tiny.CLASSES, str(tuple(_tiny.PALETTE[1])), "onnxruntime==",
                 "proof at export", kit["cpu"], "python run_onnx.py --self-test"):
        assert fact in readme, fact
    # the kit is covered by the integrity check: a changed README is refused like a changed model
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    verify_manifest(copy)
    (copy / "README.md").write_text("changed")
    with pytest.raises(ArtifactError, match="README.md: sha256 does not match"):
        verify_manifest(copy)


@pytest.mark.parametrize("target,precision,options", CASES, ids=IDS)
@pytest.mark.exports(lambda p: [(p["target"], _tiny.TINY, p["precision"], p["options"])])
def test_run_script_reproduces_export_in_clean_venv(exports, clean_python, tmp_path, target, precision, options):
    art = exports.get(target, _tiny.TINY, precision, **options)
    m = json.loads((art / MANIFEST).read_text())
    kit = m["device_kit"]
    copy = tmp_path / "device"  # what the engineer copies to the device
    shutil.copytree(art, copy)
    py = clean_python(kit["runtime"])

    # --self-test: the script's class maps vs the ones edgeseg's session made at export
    r = _run([str(py), "-I", kit["script"], "--self-test", "--json"], cwd=copy)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["self_test"]["passed"] and summary["self_test"]["agreement"] >= 0.999, r.stdout
    assert kit["self_test"]["made_by"].startswith("edgeseg's") and kit["self_test"]["min_agreement"] == 0.999

    # an image of another size: resized in, class map out at the image's size with the palette
    from PIL import Image

    rng = np.random.default_rng(1)
    img = (rng.random((50, 70, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "street.png")
    r = _run([str(py), "-I", str(copy / kit["script"]), str(tmp_path / "street.png"), "--out",
              str(tmp_path / "masks"), "--threads", "2"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "street.png:" in r.stdout and " ms (" in r.stdout
    with Image.open(tmp_path / "masks" / "street.png") as out:
        assert out.mode == "P" and out.size == (70, 50)
        assert out.getpalette()[:3] == list(_tiny.PALETTE[0])
        got = np.asarray(out)
    from edgeseg.runtime import open_session

    with open_session(art, num_threads=1) as sess:  # edgeseg's own answer (OpenCV's resize, torch's upsampling)
        want = sess.segment(img)
    assert (got == want).mean() >= 0.95  # the resize rounds a pixel value here and there differently


@pytest.mark.exports([("onnx", _tiny.TINY, "fp32")])
def test_run_script_errors_are_one_line(exports, clean_python, tmp_path):
    art = exports.get("onnx", _tiny.TINY, "fp32")
    copy = tmp_path / "device"
    shutil.copytree(art, copy)
    py = clean_python("onnx")
    r = _run([str(py), "-I", "run_onnx.py", str(tmp_path / "missing.png")], cwd=copy)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "missing.png" in r.stderr, r.stderr
    (copy / "model.onnx").write_bytes(b"not a model")
    r = _run([str(py), "-I", "run_onnx.py", "--self-test"], cwd=copy)
    assert r.returncode == 2 and "sha256 does not match" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_every_runtime_template_renders_to_python():
    """Every runtime module's RUN_SCRIPT makes a script that compiles (Core ML's cannot run here; its Swift
    snippet ships beside it)."""

    from edgeseg.targets import all_profiles, session_module

    runtimes = sorted({p.runtime for p in all_profiles().values()})
    with_script = []
    for rt in runtimes:
        mod = session_module(rt)
        if getattr(mod, "RUN_SCRIPT", None):
            src = device_kit.render_script(mod.RUN_SCRIPT, {}, device_kit.script_name(rt))
            compile(src, device_kit.script_name(rt), "exec")
            assert "class Runner" in src and "PACKAGES = [" in src and "RUNTIME = " in src
            with_script.append(rt)
    assert {"onnx", "openvino", "executorch", "coreml", "litert"} <= set(with_script)
    from edgeseg.targets.coreml import session as coreml

    assert "MLModel" in coreml.EXTRA_FILES["Segment.swift"]
