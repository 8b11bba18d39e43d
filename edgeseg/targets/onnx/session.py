"""ONNX Runtime session (CPU execution provider): runs `model.onnx` of the onnx and jetson-tensorrt targets.

The model is handed to ONNX Runtime as bytes, never as a path: `model_bytes` checks them against the manifest's
sha256, and inlines any external data from files the manifest lists (checked the same way), so that ONNX Runtime
opens no file of its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.errors import ArtifactError, one_line
from edgeseg.runtime.base import INSERTED, Session, artifact_of


def model_bytes(root: Path, manifest) -> bytes:
    """The artifact's ONNX model as checked bytes, its external data (if any) inlined from listed, checked files.

    Raises:
        ArtifactError (one line naming the file): the model or an external data file is not listed, changed or a
        link; the model is not ONNX.
    """
    import posixpath

    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    from edgeseg.artifact import read_hashed

    data = read_hashed(root, manifest, manifest.model_file)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # noqa: BLE001 - a protobuf that does not parse is this file's one-line error
        raise ArtifactError(f"{root / manifest.model_file}: ONNX Runtime could not load it (not an ONNX model: "
                            f"{type(e).__name__}: {one_line(e)})") from None
    blobs: dict[str, bytes] = {}
    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        info = ExternalDataInfo(t)
        rel = posixpath.normpath(posixpath.join(posixpath.dirname(manifest.model_file), str(info.location)))
        if rel not in blobs:
            blobs[rel] = read_hashed(root, manifest, rel)
        start = int(info.offset or 0)
        t.raw_data = blobs[rel][start:start + int(info.length) if info.length else None]
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    return model.SerializeToString() if blobs else data


class OnnxSession(Session):
    """ORT CPU session. `num_threads` sets intra_op_num_threads; kwargs: `optimize=False` disables graph
    optimisations (QDQ then runs as dequantize -> float op -> quantize, the reference arithmetic).

    An int8 artifact whose profile sets `int8_runtime_optimize = false` (jetson-tensorrt) defaults to
    `optimize=False`: its symmetric full-range int8 weights are what
    TensorRT computes exactly (int32 accumulation), but ORT's fused x86 kernels on CPUs without VNNI saturate
    u8xs8 pair sums on them (measured on the shipped OffSeg-T: 93.98 % argmax agreement with fused kernels,
    99.07 % with the reference arithmetic). So the host check emulates TensorRT's arithmetic instead of judging
    the artifact by a CPU kernel that the Jetson never runs; the record's notes say so.
    """

    def _default_optimize(self) -> bool:
        return default_optimize(self.manifest)

    def _load(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.num_threads:
            so.intra_op_num_threads = int(self.num_threads)
            so.inter_op_num_threads = 1
        optimize = self.kwargs.get("optimize", self._default_optimize())
        self.notes = [] if optimize or "optimize" in self.kwargs else [
            "int8 QDQ run with ONNX Runtime's reference arithmetic (graph optimisations off) to emulate TensorRT; "
            "fused x86 int8 kernels saturate on full-range weights on CPUs without VNNI"]
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        data = model_bytes(self.path, self.manifest)
        try:
            self._sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - runtime failures become one line naming the file
            raise ArtifactError(f"{self.model_path}: ONNX Runtime could not load it ({type(e).__name__}: "
                                f"{one_line(e)})") from e
        self._input = self._sess.get_inputs()[0].name

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._sess.run(None, {self._input: x})[0]

    def close(self) -> None:
        self._sess = None


SESSION = OnnxSession


def default_optimize(manifest) -> bool:
    """Whether ONNX Runtime runs this artifact with its graph optimisations (fused kernels): always for float; for
    int8 as the target's profile says (`int8_runtime_optimize`; false: the reference QDQ arithmetic)."""
    if manifest.precision != "int8":
        return True
    from edgeseg.targets import artifact_runtime

    # the target's profile, recorded at export, says whether its int8 runs with ORT's fused kernels or its
    # reference arithmetic
    return artifact_runtime(manifest).get("int8_runtime_optimize", True)


# The artifact folder's run script (edgeseg.export.device_kit writes run_onnx.py around it): a `Runner` that needs
# only onnxruntime and numpy, run as edgeseg's session runs it (`SETTINGS` from `run_script_settings`).
RUN_SCRIPT = '''
RUNTIME = "ONNX Runtime"
PACKAGES = ["onnxruntime"]  # pip distributions (pinned to the versions in manifest.json's tool_versions)


class Runner:
    """ONNX Runtime on the CPU execution provider, `threads` intra-op threads (1 inter-op thread)."""

    def __init__(self, here, manifest, threads):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if not SETTINGS.get("optimize", True):  # int8 QDQ run with the reference arithmetic (see README.md)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(here / manifest["model_file"]), so,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x):
        return self.session.run(None, {self.input_name: x})[0]
'''


def run_script_settings(manifest) -> dict[str, Any]:
    """How the run script runs this artifact, as `OnnxSession` does: `optimize` (graph optimisations)."""
    return {"optimize": default_optimize(manifest)}


def onnx_name_scopes(node) -> list[str]:
    """Module paths of an ONNX node, outermost first, from the dynamo exporter's `pkg.torch.onnx.name_scopes`
    metadata ([] without it). torch 2.13 writes a Python list repr of cumulative names, e.g.
    "['', 'model', 'model.decode_head', ..., 'model.decode_head.hamburger.ham', 'bmm']" (the last entry is the op);
    a JSON list of per-level names (["", "backbone", "stem", "0"]) is made cumulative."""
    import ast
    import json

    for p in node.metadata_props:
        if p.key != "pkg.torch.onnx.name_scopes":
            continue
        try:
            parts = json.loads(p.value)
        except ValueError:
            try:
                parts = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                parts = [p.value]
        parts = [str(x) for x in (parts if isinstance(parts, (list, tuple)) else [parts]) if x]
        if all("." not in x for x in parts):  # per-level names: make them cumulative
            parts = [".".join(parts[:i + 1]) for i in range(len(parts))]
        return parts
    return []


def _onnx_scopes(data: bytes) -> dict[str, str]:
    """ONNX node name -> its innermost module path (from the exporter's name-scope metadata)."""
    import onnx

    graph = onnx.load_model_from_string(data).graph
    out = {}
    for node in graph.node:
        scopes = onnx_name_scopes(node)
        # the last entry is the op itself ("..., 'model.decode_head.freqfusions.2', 'view_183'")
        if len(scopes) >= 2 and not scopes[-1].startswith(scopes[-2] + "."):
            scopes = scopes[:-1]
        if scopes:
            # ORT's layout transformer names a rewritten node after its output (`<output>_nchwc`)
            for key in (node.name, *node.output):
                out[key] = scopes[-1]
    return out


def _lookup(scopes: dict[str, str], name: str) -> str | None:
    """The module path of a node ORT ran, through the names its graph transformers give rewritten nodes: NCHWc
    (`<output>_nchwc`), QDQ fusion (`<node>_token_<n>`), per-tensor q/dq (`<tensor>_QuantizeLinear`,
    `<tensor>_DequantizeLinear/duplicated...`); a q/dq of a parameter (`model.x.conv.weight_...`) belongs to its
    module."""
    import re

    if name in scopes:
        return scopes[name]
    base = re.sub(r"/duplicated.*$", "", name)
    base = re.sub(r"(_token_\d+)+$", "", base)
    base = re.sub(r"_(De)?[Qq]uantizeLinear$|_nchwc$", "", base)
    if base in scopes:
        return scopes[base]
    if base.startswith("model.") and "." in base:  # an initializer: the module that owns the parameter
        return base.rsplit(".", 1)[0]
    return None


def profile_ops(model_path: Path, num_threads: int, runs: int, optimize: bool = True
                ) -> tuple[list[tuple[str, str, float]], dict[str, Any]]:
    """ORT's profiler over `runs` runs (after one warm-up): [(module path or INSERTED, op type, us)] and the
    wall time. Read by edgeseg.eval.profile."""
    import json
    import os
    import tempfile
    import time

    import onnxruntime as ort

    data = model_bytes(*artifact_of(model_path))
    scopes = _onnx_scopes(data)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = int(num_threads), 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory(prefix="edgeseg-profile-") as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape],
                                 np.uint8 if "uint8" in str(i.type) else np.float32) for i in sess.get_inputs()}
        sess.run(None, feed)  # warm-up (its events are dropped below: the first run allocates)
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feed)
        wall = (time.perf_counter() - t0) / runs
        events = json.loads(Path(sess.end_profiling()).read_text())
    node_events = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
    per_run = len(node_events) // (runs + 1) if node_events else 0
    op_times = []
    for ev in node_events[per_run:]:  # skip the warm-up run's events
        name = ev["name"][:-len("_kernel_time")]
        op_type = (ev.get("args") or {}).get("op_name", "?")
        path = _lookup(scopes, name)
        op_times.append((path or INSERTED, op_type, float(ev.get("dur", 0))))
    return op_times, {"wall_ms": round(1000 * wall, 3),
                      "source": "onnxruntime profiler node events + pkg.torch.onnx.name_scopes"}
