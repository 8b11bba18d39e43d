"""ONNX int8: ONNX Runtime static QDQ quantization of the exported float graph (edgeseg.targets.onnx.exporter; the Jetson
TensorRT exporter uses it too), with the float policy's nodes excluded. Heavy imports stay inside functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.errors import ArtifactError, one_line
from edgeseg.export.base import INPUT_NAME, CalibrationData


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over CalibrationData."""

    def __init__(self, data: CalibrationData):
        self._it = iter(data.numpy())

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {INPUT_NAME: x}


def _name_scopes(node) -> list[str]:
    """Module paths of an ONNX node (edgeseg.targets.onnx.session.onnx_name_scopes: the exporter's name-scope metadata)."""
    from edgeseg.targets.onnx.session import onnx_name_scopes

    return onnx_name_scopes(node)


def onnx_nodes_to_exclude(policy, onnx_model) -> list[str]:
    """Names of the ONNX nodes that lie inside the policy's float modules, by the module paths the dynamo
    exporter records in each node's `pkg.torch.onnx.name_scopes` metadata. `onnx_model`: a ModelProto or a
    path."""
    import onnx

    if isinstance(onnx_model, (str, Path)):
        onnx_model = onnx.load(str(onnx_model), load_external_data=False)
    return [n.name for n in onnx_model.graph.node if any(policy.covers(s) for s in _name_scopes(n))]


def float_nodes(onnx_model, policy) -> list[str]:
    """Names of the ONNX nodes traced from inside the float policy's modules (ORT `nodes_to_exclude`), sorted;
    none for no policy."""
    if policy is None or not len(policy):
        return []
    return sorted(set(onnx_nodes_to_exclude(policy, onnx_model)))


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
    from edgeseg.cpu import EXACT_WHY, SATURATES_WHY, resolve_auto

    value, why = resolve_auto(requested, lambda cpu: cpu.int8_saturates, True, False, SATURATES_WHY, EXACT_WHY)
    return bool(value), why


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


def one_hot_gather_convs(onnx_model) -> list[str]:
    """Conv nodes that only copy taps: one input channel and a constant weight whose every filter is a single 1
    (CARAFE's and the local similarity's im2col in the models' export form). They compute nothing int8 could speed
    up, and ORT's QLinearConv on one-channel images was the largest int8 cost of offseg_t's stride-4 fusion
    (65 of 281 ms at 384x480): left float, they run as a plain copy-convolution between dequantize and quantize."""
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx_model.graph.initializer}
    out = []
    for node in onnx_model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim == 4 and w.shape[1] == 1 and set(np.unique(w)) <= {0.0, 1.0} and \
                (w.reshape(w.shape[0], -1).sum(1) == 1).all():
            out.append(node.name)
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
    policy_nodes = float_nodes(fp32, policy)
    gathers = [n for n in one_hot_gather_convs(fp32) if n not in set(policy_nodes)]
    excluded = sorted(set(policy_nodes) | set(gathers))
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
                            f"{one_line(e)}") from e
    return {"scheme": "ONNX Runtime static QDQ", "activations": f"{activation_type} per-tensor"
            + (" symmetric" if symmetric else " asymmetric"), "weights": "int8 symmetric "
            + ("per-channel" if per_channel else "per-tensor") + (" 7-bit (reduce_range)" if reduce_range else ""),
            "calibrate_method": calibrate_method, "calibration_images": len(calib.inputs),
            "op_types_quantized": op_types or "ORT default",
            "per_tensor_weights": sorted(overrides),
            "float_modules": policy.to_json() if policy is not None else {},
            "float_nodes": len(policy_nodes), "float_gather_convs": len(gathers)}


__all__ = ["onnx_nodes_to_exclude", "float_nodes", "one_hot_gather_convs", "unshare_initializers",
           "resolve_reduce_range", "per_tensor_weight_overrides", "quantize_qdq"]
