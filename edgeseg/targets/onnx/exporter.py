"""ONNX exporter: `torch.onnx.export(..., dynamo=True)` at opset >= 18 with static shapes, checked with
onnx.checker; int8 as QDQ through ONNX Runtime's `quantize_static` (edgeseg.targets.onnx.quantize). Heavy imports
stay inside functions.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.errors import ArtifactError, UsageError, one_line
from edgeseg.export.base import (
    INPUT_NAME,
    Exporter,
    ExportJob,
    ExportOptions,
    ExportResult,
    export_float_policy,
)
from edgeseg.targets.onnx.quantize import quantize_qdq, resolve_reduce_range

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
FLOAT_FILE = "model_fp32.onnx"  # temporary, the float graph quantize_static reads (not part of an int8 artifact)
MIN_OPSET = 18  # torch 2.13's dynamo exporter at opset 17 produced models onnx.checker/ORT rejected here


@dataclass
class OnnxOptions(ExportOptions):
    """onnx options.

    Attributes:
        opset: ONNX opset (>= 18).
        activation_type: int8 QDQ activations, "int8" (s8s8 with int8 weights) or "uint8" (u8s8).
        reduce_range: int8: 7-bit weights, true / false / "auto". Only needed for u8s8 on x86 CPUs without VNNI,
            where ORT's u8s8 kernel (VPMADDUBSW) saturates its int16 sums with full 8-bit weights; "auto" decides
            from the exporting CPU's flags (edgeseg.cpu) and the manifest records the choice and why.
        per_channel: int8: per-channel weight scales.
        calibrate_method: int8: "MinMax" | "Entropy" | "Percentile".
        op_types: int8: ONNX op types that get Q/DQ (ORT `op_types_to_quantize`); empty: ORT's default, every
            op type its QDQ quantizer knows.
    """

    opset: int = MIN_OPSET
    # Measured here (onnxruntime 1.31.1, AVX2 CPU without VNNI, tests/_tiny.py tiny_ops at 64x64, 8 calibration /
    # 4 test CamVid images; "reference" = the same QDQ model with ORT graph optimisations off, i.e. dequantize ->
    # float op -> quantize): max |fused - reference| and argmax agreement of the fused model vs fp32:
    #   u8s8 8-bit weights   0.167  88.1 %  (VPMADDUBSW int16 saturation)
    #   u8s8 reduce_range    0.013  98.8 %
    #   s8s8 8-bit weights   0.054  97.8 %
    # so u8s8 with 7-bit weights (reduce_range) is the default on such CPUs; s8s8 stays available
    # (activation_type="int8"). On VNNI/AMX CPUs u8s8 accumulates in int32 and keeps full 8-bit weights.
    activation_type: str = "uint8"
    reduce_range: bool | str = "auto"
    per_channel: bool = True
    calibrate_method: str = "MinMax"
    op_types: list = field(default_factory=list)

    def validate(self, where: str = "options") -> None:
        super().validate(where)
        if self.opset < MIN_OPSET:
            raise UsageError(f"{where}.opset: {self.opset} < {MIN_OPSET} (the dynamo exporter at opset 17 "
                             "produced invalid models)")
        if self.reduce_range not in (True, False, "auto") or isinstance(self.reduce_range, int) and not isinstance(
                self.reduce_range, bool):
            raise UsageError(f"{where}.reduce_range: {self.reduce_range!r} is not true, false or \"auto\"")
        if self.activation_type not in ("int8", "uint8"):
            raise UsageError(f"{where}.activation_type: {self.activation_type!r} is not int8 or uint8")
        if self.calibrate_method not in ("MinMax", "Entropy", "Percentile"):
            raise UsageError(f"{where}.calibrate_method: {self.calibrate_method!r} is not MinMax, Entropy or "
                             "Percentile")


# Per-node metadata of torch.onnx's dynamo exporter that only names the exporting machine's source files (absolute
# paths) and costs ~25 % of an artifact's size; `pkg.torch.onnx.name_scopes` (module paths) stays: the float policy
# reads it (quantize.float_nodes).
STRIPPED_METADATA = ("pkg.torch.onnx.stack_trace",)


def strip_stack_traces(path: Path) -> int:
    """Remove STRIPPED_METADATA from every node of the ONNX file at `path` (rewritten in place, weights inside);
    returns the number of entries removed."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    removed = 0

    def strip(nodes):
        nonlocal removed
        for node in nodes:
            keep = [p for p in node.metadata_props if p.key not in STRIPPED_METADATA]
            removed += len(node.metadata_props) - len(keep)
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
            for attr in node.attribute:  # If/Loop/Scan bodies
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    strip(g.node)

    strip(m.graph.node)
    for f in m.functions:
        strip(f.node)
    if removed:
        onnx.save(m, str(path))
    return removed


def export_onnx(model, path: Path, opset: int, output_name: str) -> None:
    """Export an ExportWrapper with the dynamo exporter, static shapes, weights inside the file; onnx.checker."""
    import onnx
    import torch

    example = (model.example_input(),)
    try:
        prog = torch.onnx.export(model, example, dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                 output_names=[output_name], external_data=False, verbose=False)
        prog.save(str(path), external_data=False)
        strip_stack_traces(path)
    except Exception as e:  # noqa: BLE001 - the exporter's failure becomes one line
        raise ArtifactError(f"onnx: torch.onnx.export (dynamo, opset {opset}) failed: {type(e).__name__}: "
                            f"{one_line(e)}") from e
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: onnx.checker rejected the exported model: {e}") from e


INTENDED_PROVIDER = "CPUExecutionProvider"  # the provider edgeseg.targets.onnx.session runs artifacts with
_KERNEL_SUFFIX = "_kernel_time"


def ep_placement(path: Path, optimize: bool = True, intended: str = INTENDED_PROVIDER) -> dict[str, Any]:
    """Which execution provider ONNX Runtime placed each node on, measured: one profiled run of the model at
    `path` (session options as edgeseg.targets.onnx.session opens it: `optimize` = graph optimisations on), the node
    -> provider assignment read from the profile's kernel events. Nodes not on `intended` are the fallbacks.

    Returns:
        {source, intended_provider, session_providers, optimized, nodes_placed, providers {provider: nodes},
         fallback_ops (sorted op types off `intended`), fallback_nodes (names)}.
    Raises:
        ArtifactError when the session cannot be created or run, or the profile names no node.
    """
    import json
    import os
    import tempfile

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory(prefix="edgeseg-ort-profile-") as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "profile")
        try:
            sess = ort.InferenceSession(str(path), so, providers=[intended])
            feed = {}
            for i in sess.get_inputs():
                dtype = np.uint8 if i.type == "tensor(uint8)" else np.float16 if i.type == "tensor(float16)" \
                    else np.float32
                feed[i.name] = np.zeros([d if isinstance(d, int) else 1 for d in i.shape], dtype)
            sess.run(None, feed)
            events = json.loads(Path(sess.end_profiling()).read_text())
        except Exception as e:  # noqa: BLE001 - one line naming the file
            raise ArtifactError(f"{path}: profiled ONNX Runtime run for the provider placement failed: "
                                f"{type(e).__name__}: {one_line(e)}"
                                ) from e
    nodes: dict[str, tuple[str, str]] = {}
    for ev in events if isinstance(events, list) else []:
        args = ev.get("args") or {}
        name = str(ev.get("name", ""))
        if ev.get("cat") == "Node" and name.endswith(_KERNEL_SUFFIX) and "provider" in args:
            nodes[name[: -len(_KERNEL_SUFFIX)]] = (str(args.get("op_name")), str(args["provider"]))
    if not nodes:
        raise ArtifactError(f"{path}: the ONNX Runtime profile names no node: provider placement unknown")
    off = {n: op for n, (op, prov) in nodes.items() if prov != intended}
    return {"source": "onnxruntime profile of one run (node kernel events, args.provider)",
            "intended_provider": intended, "session_providers": list(sess.get_providers()), "optimized": optimize,
            "nodes_placed": len(nodes),
            "providers": dict(sorted(collections.Counter(p for _, p in nodes.values()).items())),
            "fallback_ops": sorted(set(off.values())), "fallback_nodes": sorted(off)}


def measured_fallback_ops(path: Path, optimize: bool = True) -> tuple[list[str] | None, dict[str, Any]]:
    """(fallback_ops, placement record) for a manifest: the measured list, or None (unknown) with the reason
    in the record when the profiled run fails; never an unmeasured empty list."""
    try:
        placement = ep_placement(path, optimize=optimize)
    except ArtifactError as e:
        log.warning("%s", e)
        return None, {"source": "not measured", "error": str(e)}
    return placement["fallback_ops"], placement


def op_histogram(path: Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return dict(sorted(collections.Counter(n.op_type for n in m.graph.node).items()))


class OnnxExporter(Exporter):
    """ONNX for ONNX Runtime: fp32, or int8 QDQ (ORT quantize_static, s8s8 per-channel by default)."""

    name = "onnx"
    precisions = ("fp32", "int8")
    Options = OnnxOptions
    tools = ("onnx", "onnxruntime", "onnxscript", "torch")

    def quantizer(self, options: ExportOptions | None = None, is_qat: bool = False):
        """The PT2E quantizer `edgeseg qat --target onnx` trains for: XNNPACK's symmetric int8 config with 7-bit
        weights, as this exporter's PTQ uses reduce_range. The PTQ itself is ONNX Runtime's quantize_static on
        the float ONNX (quantize.quantize_qdq), not PT2E."""
        from edgeseg.quant.pt2e_specs import xnnpack_quantizer

        return xnnpack_quantizer(per_channel=getattr(options, "per_channel", True), is_qat=is_qat, weight_7bit=True)

    def int8_scheme(self, target: str, options: ExportOptions):
        """ONNX Runtime's QDQ arithmetic as quantize_static applies it here (reduce_range resolved from this CPU)."""
        from edgeseg.quant.sensitivity import Int8Scheme

        per_channel = bool(getattr(options, "per_channel", True))
        chan = "per-channel" if per_channel else "per-tensor"
        reduce, why = resolve_reduce_range(options.reduce_range)
        act = options.activation_type
        lo, hi = (0, 255) if act == "uint8" else (-128, 127)
        return Int8Scheme(target, f"ONNX Runtime QDQ: int8 symmetric {chan} weights"
                          + (" 7-bit (reduce_range)" if reduce else "") + f", {act} asymmetric per-tensor activations",
                          w_qmin=-64 if reduce else -127, w_qmax=64 if reduce else 127, w_div=64.0 if reduce else 127.0,
                          per_channel=per_channel, activations="asymmetric", a_qmin=lo, a_qmax=hi,
                          options={"activation_type": act, "reduce_range": reduce, "reduce_range_reason": why,
                                   "per_channel": per_channel,
                                   "calibrate_method": getattr(options, "calibrate_method", "MinMax")})

    def export(self, job: ExportJob) -> ExportResult:
        model, spec, precision, calib_data, options = job.model, job.spec, job.precision, job.calib, job.options
        out_dir = Path(job.out_dir)
        output_name = model.output_contract(spec.num_classes)["name"]
        prequantized = job.qat  # QAT graph: q/dq with learned scales, no PTQ
        target = out_dir / (FLOAT_FILE if precision == "int8" and not prequantized else MODEL_FILE)
        with job.stage("torch_onnx_export", "torch.onnx.export"):
            export_onnx(model, target, options.opset, output_name)
        quant: dict[str, Any] = {}
        if precision == "int8" and prequantized:
            quant = {**prequantized, "calibration_images": 0}
        elif precision == "int8":
            if calib_data is None or not calib_data.inputs:
                raise UsageError("--precision int8: onnx needs calibration images")
            reduce_range, why = resolve_reduce_range(options.reduce_range)
            with job.stage("quantize_static", "ONNX Runtime quantize_static"):
                quant = quantize_qdq(target, out_dir / MODEL_FILE, calib_data,
                                     activation_type=options.activation_type, reduce_range=reduce_range,
                                     per_channel=options.per_channel, calibrate_method=options.calibrate_method,
                                     op_types=list(options.op_types), policy=export_float_policy(model, options))
            quant.update(reduce_range=reduce_range, reduce_range_reason=why)
            target.unlink()
        hist = op_histogram(out_dir / MODEL_FILE)
        if precision == "int8" and not hist.get("QuantizeLinear"):
            raise ArtifactError(f"{out_dir / MODEL_FILE}: int8 export holds no QuantizeLinear node")
        # what ORT actually placed off its provider, from a profiled run (the session edgeseg.targets.onnx.session opens)
        with job.stage("ep_placement", "the profiled ONNX Runtime run"):
            fallback_ops, placement = measured_fallback_ops(out_dir / MODEL_FILE, optimize=True)
        return ExportResult(files=[MODEL_FILE], fallback_ops=fallback_ops, executed_here=True, quantization=quant,
                            inspection={"op_histogram": hist, "opset": options.opset, "ep_placement": placement})


EXPORTER = OnnxExporter
