"""OpenVINO session: compiles `model.xml` of the openvino target with `ov.Core` (CPU by default).

The IR is read from bytes, never from a path: `model.xml` and its weights `model.bin` must both be listed in the
manifest, and the bytes checked against their sha256 are the bytes OpenVINO gets (given a path, OpenVINO would read
whatever `model.bin` lies beside the XML, listed or not, link or not).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgeseg.errors import ArtifactError, one_line
from edgeseg.runtime.base import INSERTED, RT_INFO_KEY, UNKNOWN, Session, artifact_of


def read_ir(core, root: Path, manifest):
    """(`core.read_model` of the artifact's IR from its checked bytes (XML and `<stem>.bin`, both in the manifest),
    the weights' bytes). The model's constants point into those bytes without a copy: the caller keeps them alive
    as long as the model or anything compiled from it (freed early, a later call read freed memory: the test
    process died with SIGSEGV).

    Raises:
        ArtifactError (one line naming the file): a file not listed, changed, a link; or OpenVINO cannot read it.
    """
    from edgeseg.artifact import read_hashed

    xml = read_hashed(root, manifest, manifest.model_file)
    weights = read_hashed(root, manifest, str(PurePosixPath(manifest.model_file).with_suffix(".bin")))
    try:
        return core.read_model(xml, weights), weights
    except Exception as e:  # noqa: BLE001 - runtime failures become one line naming the file
        raise ArtifactError(f"{root / manifest.model_file}: OpenVINO could not read it ({type(e).__name__}: "
                            f"{one_line(e)})") from e


class OpenVINOSession(Session):
    """ov.Core compile + one infer request.

    `num_threads` sets the plugin's INFERENCE_NUM_THREADS. kwargs: `device` (default: the manifest's
    options.device, else "CPU"); `inference_precision` ("f32" | "bf16"; default: `artifact_precision_hint`, what
    the export resolved and validated); `config` (extra plugin properties).
    """

    def _load(self) -> None:
        import openvino as ov

        self.device = self.kwargs.get("device") or (self.manifest.options or {}).get("device") or "CPU"
        config = dict(self.kwargs.get("config") or {})
        if self.num_threads:
            config["INFERENCE_NUM_THREADS"] = int(self.num_threads)
        self.inference_precision = self.kwargs.get("inference_precision") or artifact_precision_hint(self.manifest)
        if self.device == "CPU":
            config["INFERENCE_PRECISION_HINT"] = self.inference_precision
            self.float_compute = "bf16" if self.inference_precision == "bf16" else "fp32"
            if self.float_compute == "bf16":
                self.notes.append("OpenVINO computes the float parts in bf16 (the artifact's inference precision)")
        core = ov.Core()
        model, self._weights = read_ir(core, self.path, self.manifest)
        try:
            self._compiled = core.compile_model(model, self.device, config)
        except Exception as e:  # noqa: BLE001 - runtime failures become one line naming the file
            raise ArtifactError(f"{self.model_path}: OpenVINO could not compile it on {self.device} "
                                f"({type(e).__name__}: {one_line(e)})") from e
        self._request = self._compiled.create_infer_request()
        self._output = self._compiled.outputs[0]

    def _run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] != 1:  # the IR is static (batch 1): run a batch image by image
            return np.concatenate([self._run(x[i:i + 1]) for i in range(x.shape[0])], 0)
        res = self._request.infer({0: x})
        return np.array(res[self._output], copy=True)

    def close(self) -> None:
        self._request = None
        self._compiled = None
        self._weights = None  # after everything that reads it


SESSION = OpenVINOSession


def artifact_precision_hint(manifest) -> str:
    """The CPU plugin's INFERENCE_PRECISION_HINT for an artifact: its manifest's `options.inference_precision`
    (resolved at export: "bf16" or "f32"; manifests from before the option: "f32", what they were validated
    with), "f32" where this CPU has no native bf16 (OpenVINO would emulate it, slower and not what was timed)."""
    from edgeseg.cpu import host_cpu

    hint = (getattr(manifest, "options", None) or {}).get("inference_precision", "f32")
    if hint == "bf16" and not host_cpu().native_bf16:
        return "f32"
    return hint if hint in ("f32", "bf16") else "f32"


def profile_ops(xml_path: Path, num_threads: int, runs: int, optimize: bool = True, precision_hint: str | None = None
                ) -> tuple[list[tuple[str, str, float]], dict[str, Any]]:
    """Per-layer performance counters over `runs` runs: [(module path, INSERTED or UNKNOWN, layer type, us)]; an
    executed layer is attributed through the original ops it fused (`originalLayersNames`), whose module path the
    exporter stored in the model's rt_info (RT_INFO_KEY: {FX node name: path}). Read by edgeseg.eval.profile."""
    import time

    import openvino as ov

    core = ov.Core()
    model, weights = read_ir(core, *artifact_of(xml_path))  # noqa: F841  (kept alive while the model runs)
    import json

    # {FX node name: module path}, stored in the model's rt_info by the exporter (edgeseg.targets.openvino.exporter)
    module_of = json.loads(model.get_rt_info([RT_INFO_KEY]).astype(str)) if model.has_rt_info([RT_INFO_KEY]) else {}
    if precision_hint is None:  # what the artifact's sessions compute with
        from edgeseg.artifact import read_manifest

        precision_hint = artifact_precision_hint(read_manifest(Path(xml_path).parent))
    config = {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": int(num_threads), "INFERENCE_PRECISION_HINT": precision_hint}
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    x = np.zeros(list(compiled.inputs[0].shape), np.uint8 if "u8" in str(compiled.inputs[0].element_type)
                 else np.float32)
    request.infer({0: x})
    origin = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        names = str(info["originalLayersNames"].astype(str)) if "originalLayersNames" in info else ""
        origin[op.get_friendly_name()] = [n for n in names.split(",") if n]
    totals: dict[str, list] = {}
    t0 = time.perf_counter()
    for _ in range(runs):
        request.infer({0: x})
        for pi in request.profiling_info:
            us = pi.real_time.total_seconds() * 1e6
            slot = totals.setdefault(pi.node_name, [pi.node_type, 0.0])
            slot[1] += us
    wall = (time.perf_counter() - t0) / runs
    op_times = []
    for node, (node_type, us) in totals.items():
        paths = [module_of[n.split("/", 1)[0]] for n in origin.get(node, [node]) if n.split("/", 1)[0] in module_of]
        op_times.append((paths[0] if paths else (INSERTED if not origin.get(node) else UNKNOWN), node_type, us))
    return op_times, {"wall_ms": round(1000 * wall, 3), "precision_hint": precision_hint,
                      "source": "openvino per-layer performance counters + originalLayersNames + rt_info "
                                + RT_INFO_KEY + ("" if module_of else " (this IR carries no module paths: "
                                                 "re-export it with this edgeseg)")}


# The artifact folder's run script (edgeseg.export.device_kit writes run_openvino.py around it): a `Runner` that
# needs only openvino and numpy, compiled as edgeseg's session compiles it (device, threads, inference precision).
RUN_SCRIPT = '''
RUNTIME = "OpenVINO"
PACKAGES = ["openvino"]  # pip distributions (pinned to the versions in manifest.json's tool_versions)


class Runner:
    """ov.Core().compile_model on the manifest's device (options.device, default CPU) with `threads`
    INFERENCE_NUM_THREADS and the export's inference precision (bf16 only on CPUs that compute it natively)."""

    def __init__(self, here, manifest, threads):
        import openvino as ov

        core = ov.Core()
        options = manifest.get("options") or {}
        device = options.get("device") or "CPU"
        config = {"INFERENCE_NUM_THREADS": threads}
        if device == "CPU":
            hint = options.get("inference_precision", "f32")
            native_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            config["INFERENCE_PRECISION_HINT"] = "bf16" if hint == "bf16" and native_bf16 else "f32"
        self.precision = config.get("INFERENCE_PRECISION_HINT")
        compiled = core.compile_model(core.read_model(str(here / manifest["model_file"])), device, config)
        self.request = compiled.create_infer_request()
        self.output = compiled.outputs[0]

    def __call__(self, x):
        return np.array(self.request.infer({0: x})[self.output], copy=True)
'''
