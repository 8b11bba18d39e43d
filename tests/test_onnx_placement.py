"""ONNX manifests report the execution-provider placement ONNX Runtime measured (a profiled run), never an
unmeasured empty `fallback_ops`: the tiny model's fp32 export, its placement checked against the optimised graph
ORT itself writes out, and a provider the session did not run on turning every node into a fallback."""
from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest

from edgeseg.targets.onnx.exporter import INTENDED_PROVIDER, ep_placement

MODEL = "tiny_ops"


def _graph_nodes(path) -> set[str]:
    return {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}


def _optimized_nodes(src, dst) -> set[str]:
    """Node names of the graph ORT runs (its optimised model, written by ORT itself)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=[INTENDED_PROVIDER])
    return _graph_nodes(dst)


@pytest.mark.exports([("onnx", MODEL, "fp32")])
def test_onnx_manifest_fallback_ops_are_measured(exports, tmp_path):
    art = exports.get("onnx", MODEL, "fp32")
    m = json.loads((art / "manifest.json").read_text())
    placement = m["inspection"]["ep_placement"]
    assert placement["source"].startswith("onnxruntime profile"), placement
    assert placement["intended_provider"] == INTENDED_PROVIDER and placement["optimized"] is True
    # the CPU provider takes every node: an empty list, but a measured one
    assert m["fallback_ops"] == [] and placement["fallback_nodes"] == []
    assert placement["providers"] == {INTENDED_PROVIDER: placement["nodes_placed"]}
    # every node of the graph ORT runs was placed (profile names == ORT's own optimised graph)
    opt = _optimized_nodes(art / "model.onnx", tmp_path / "opt.onnx")
    assert placement["nodes_placed"] == len(opt) > 10

    # without graph optimisations the profile names exactly the nodes of the file
    raw = ep_placement(art / "model.onnx", optimize=False)
    assert raw["nodes_placed"] == len(_graph_nodes(art / "model.onnx"))


@pytest.mark.exports([("onnx", MODEL, "fp32")])
def test_nodes_off_the_intended_provider_are_fallbacks(exports):
    art = exports.get("onnx", MODEL, "fp32")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present: the session would run on it")
    # asking for a provider this ORT lacks: ORT falls back to CPU, and every node it ran there is a fallback
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        p = ep_placement(art / "model.onnx", intended="CUDAExecutionProvider")
    assert p["session_providers"] == [INTENDED_PROVIDER]
    assert p["fallback_nodes"] and len(p["fallback_nodes"]) == p["nodes_placed"]
    assert "Conv" in p["fallback_ops"]
