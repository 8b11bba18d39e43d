"""ONNX exporter: `torch.onnx.export(..., dynamo=True)` at opset >= 18 with static shapes, checked with
onnx.checker; int8 as QDQ through ONNX Runtime's `quantize_static`. Heavy imports stay inside functions.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.errors import ArtifactError, UsageError
from edgeseg.export.base import (INPUT_NAME, CalibrationData, Exporter, ExportOptions, ExportResult,
                                 export_float_policy)

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
# reads it (float_nodes).
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
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: onnx.checker rejected the exported model: {e}") from e


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over CalibrationData."""

    def __init__(self, data: CalibrationData):
        self._it = iter(data.numpy())

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {INPUT_NAME: x}


def _name_scopes(node) -> list[str]:
    """Module paths of an ONNX node from the dynamo exporter's `pkg.torch.onnx.name_scopes` metadata.

    torch 2.13 writes the value as a Python list repr of cumulative names, e.g.
    "['', 'model', 'model.decode_head', ..., 'model.decode_head.hamburger.ham', 'bmm']" (the last entry is the op);
    a JSON list of per-level names is accepted too."""
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


def float_nodes(onnx_model, policy) -> list[str]:
    """Names of the ONNX nodes traced from inside the float policy's modules (ORT `nodes_to_exclude`)."""
    import onnx

    if isinstance(onnx_model, (str, Path)):
        onnx_model = onnx.load(str(onnx_model), load_external_data=False)
    if policy is None or not len(policy):
        return []
    names = {n.name for n in onnx_model.graph.node if any(policy.covers(s) for s in _name_scopes(n))}
    try:  # the policy's own reader, in case it knows metadata this one does not
        names.update(policy.onnx_nodes_to_exclude(onnx_model))
    except Exception as e:  # noqa: BLE001
        log.debug("FloatPolicy.onnx_nodes_to_exclude failed: %s", e)
    return sorted(names)


def unshare_initializers(onnx_model, excluded: list[str]) -> int:
    """Give the excluded (float) nodes their own copy of every initializer they share with quantized nodes.

    The dynamo exporter de-duplicates constants (e.g. a LayerNorm eps scalar used inside and outside a float
    module); ORT would then quantize the shared initializer for the quantized consumer and feed the float node
    its DequantizeLinear output. Returns the number of initializers copied."""
    import onnx

    ex = set(excluded)
    inits = {i.name: i for i in onnx_model.graph.initializer}
    users: dict[str, set[bool]] = {}
    for n in onnx_model.graph.node:
        for i in n.input:
            if i in inits:
                users.setdefault(i, set()).add(n.name in ex)
    shared = [name for name, kinds in users.items() if kinds == {True, False}]
    for name in shared:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}__float"
        onnx_model.graph.initializer.append(copy)
        for n in onnx_model.graph.node:
            if n.name in ex:
                for k, i in enumerate(n.input):
                    if i == name:
                        n.input[k] = copy.name
    return len(shared)


def resolve_reduce_range(requested: bool | str) -> tuple[bool, str]:
    """(reduce_range, why) for the option's value; "auto" decides from the host CPU (edgeseg.cpu)."""
    from edgeseg.cpu import host_cpu

    if requested != "auto":
        return bool(requested), "set explicitly"
    cpu = host_cpu()
    if cpu.int8_saturates:
        return True, f"auto: {cpu.summary()} saturates u8 x s8 int16 sums with full 8-bit weights"
    return False, f"auto: {cpu.summary()} accumulates int8 products exactly (VNNI/AMX or not x86 AVX2)"


def per_tensor_weight_overrides(onnx_model, reduce_range: bool) -> dict[str, list[dict[str, Any]]]:
    """ORT `TensorQuantOverrides` that keep per-channel scales to Conv/Gemm-style weights.

    ORT's QDQ MatMul quantizes any initializer input per-channel (axis 1) when `per_channel` is on; after
    fusion that becomes a QLinearMatMul whose B zero point is per-channel, which ORT's kernel rejects unless B is
    2-D (measured: test_segnext's NMF `bmm` with the (1, C, R) bases buffer failed with "QLinearMatmul : weight
    zero point must be a scalar, 1D tensor of size 1, or last to second dimension is 1"). Per-tensor overrides
    for every MatMul initializer that is not a 2-D right-hand operand (a Linear weight) avoid that."""
    import onnx

    if isinstance(onnx_model, (str, Path)):
        onnx_model = onnx.load(str(onnx_model), load_external_data=False)
    dims = {i.name: len(i.dims) for i in onnx_model.graph.initializer}
    out: dict[str, list[dict[str, Any]]] = {}
    for node in onnx_model.graph.node:
        if node.op_type != "MatMul":
            continue
        for idx, name in enumerate(node.input[:2]):
            if name in dims and not (idx == 1 and dims[name] == 2):
                out[name] = [{"reduce_range": reduce_range}]
    return out


def quantize_qdq(fp32_path: Path, out_path: Path, calib: CalibrationData, *, activation_type: str,
                 reduce_range: bool, per_channel: bool, calibrate_method: str, symmetric: bool = False,
                 op_types: list[str] | None = None, policy=None) -> dict[str, Any]:
    """ONNX Runtime static QDQ quantization; returns the manifest's `quantization` record.

    `policy` (edgeseg.quant.policy.FloatPolicy, wrapper names): its modules' nodes go to `nodes_to_exclude` and
    stay float. Per-channel weight scales only where ORT's int8 kernels take them (`per_tensor_weight_overrides`).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    excluded = float_nodes(fp32, policy)
    if excluded and unshare_initializers(fp32, excluded):
        onnx.save(fp32, str(fp32_path))  # our temporary float file
    extra: dict[str, Any] = {}
    if symmetric:
        extra.update(ActivationSymmetric=True, WeightSymmetric=True)
    overrides = per_tensor_weight_overrides(fp32, reduce_range) if per_channel else {}
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    kwargs: dict[str, Any] = {}
    if op_types:
        kwargs["op_types_to_quantize"] = op_types
    if excluded:
        kwargs["nodes_to_exclude"] = excluded
    del fp32
    try:
        quantize_static(str(fp32_path), str(out_path), _Reader(calib), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, calibrate_method),
                        extra_options=extra, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"onnx: quantize_static failed: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    return {"scheme": "ONNX Runtime static QDQ", "activations": f"{activation_type} per-tensor"
            + (" symmetric" if symmetric else " asymmetric"), "weights": "int8 symmetric "
            + ("per-channel" if per_channel else "per-tensor") + (" 7-bit (reduce_range)" if reduce_range else ""),
            "calibrate_method": calibrate_method, "calibration_images": len(calib.inputs),
            "op_types_quantized": op_types or "ORT default",
            "per_tensor_weights": sorted(overrides),
            "float_modules": policy.to_json() if policy is not None else {},
            "float_nodes": len(excluded)}


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

    def export(self, model, spec, precision, input_hw, calib_data, out_dir: Path, options: OnnxOptions
               ) -> ExportResult:
        if precision not in self.precisions:
            raise UsageError(f"--precision: onnx supports {', '.join(self.precisions)}, not {precision}")
        out_dir = Path(out_dir)
        output_name = model.output_contract(spec.num_classes)["name"]
        timings: dict[str, float] = {}
        t = time.perf_counter()
        prequantized = getattr(model, "prequantized", None)  # QAT graph: q/dq with learned scales, no PTQ
        target = out_dir / (FLOAT_FILE if precision == "int8" and not prequantized else MODEL_FILE)
        export_onnx(model, target, options.opset, output_name)
        timings["torch_onnx_export"] = time.perf_counter() - t
        quant: dict[str, Any] = {}
        if precision == "int8" and prequantized:
            quant = {**prequantized, "calibration_images": 0}
        elif precision == "int8":
            if calib_data is None or not calib_data.inputs:
                raise UsageError("--precision int8: onnx needs calibration images")
            t = time.perf_counter()
            reduce_range, why = resolve_reduce_range(options.reduce_range)
            quant = quantize_qdq(target, out_dir / MODEL_FILE, calib_data, activation_type=options.activation_type,
                                 reduce_range=reduce_range, per_channel=options.per_channel,
                                 calibrate_method=options.calibrate_method,
                                 policy=export_float_policy(model, options))
            quant.update(reduce_range=reduce_range, reduce_range_reason=why)
            target.unlink()
            timings["quantize_static"] = time.perf_counter() - t
        hist = op_histogram(out_dir / MODEL_FILE)
        if precision == "int8" and not hist.get("QuantizeLinear"):
            raise ArtifactError(f"{out_dir / MODEL_FILE}: int8 export holds no QuantizeLinear node")
        return ExportResult(files=[MODEL_FILE], fallback_ops=[], executed_here=True, quantization=quant,
                            inspection={"op_histogram": hist, "opset": options.opset,
                                        "timings_s": {k: round(v, 2) for k, v in timings.items()}})


EXPORTER = OnnxExporter
