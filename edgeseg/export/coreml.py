"""Core ML exporter: `.mlpackage` ML program through `ct.convert(torch.export(...).run_decompositions({}))`.

Precisions: fp32, fp16 (the default: fp16 compute and weights) and int8, either
  * "w8a8" (default): a quantized torch model from the PT2E flow with Core ML's own quantizer (`CoreMLQuantizer`
    from executorch.backends.apple.coreml.quantizer over coremltools.optimize.torch's `LinearQuantizerConfig`:
    int8 symmetric per-channel weights, uint8 activations), calibrated on the calibration images, then
    converted: the program holds `quantize`/`dequantize` activation ops (iOS17 opset) and int8
    `constexpr_affine_dequantize` weights; or
  * "weights": weight-only int8 (`ct.optimize.coreml.linear_quantize_weights`, symmetric per-channel) of the fp16
    program, restricted to conv/linear/conv_transpose weights so that constants such as grid_sample's base grid
    or the AFM DFT matrices stay float.

A QAT checkpoint (`edgeseg qat --target coreml`, the same CoreMLQuantizer scheme, fake-quantized in training) is
converted from its converted PT2E graph as is, so the program carries the learned scales (no calibration).

Core ML cannot execute on Linux: here the exporter inspects the saved program (op histogram, weight dtypes,
quantized ops present) and the manifest says "not executed on this host"; on macOS the same path executes it
(the proof runs `MLModel.predict`) and lists the ops the compute plan does not place on the Neural Engine.

Export-time lowering (in this file, never in model code), measured with coremltools 9.0 + torch 2.13:
  * `aten.upsample_bicubic2d` has no converter in coremltools 9.0. Models bake their bicubic resize (the
    EfficientFormerV2 attention-bias table) in `prepare_for_export`, so none should remain; if one does,
    `bicubic_as_matmul()` rewrites it during tracing into two matmuls with constant interpolation matrices
    computed by PyTorch's own bicubic formula (a=-0.75, clamped borders), exact for static shapes.
  * FFT/complex ops (`fft_rfft2`, ...) have no converter: the AFM matmul-DFT back-end (prepare_for_export) avoids
    them; if one remains the export fails with an error that names the op and the fix.
  * Converted as is (checked op by op): grid_sample -> `resample`, unfold -> `conv` (identity kernels), atan2 ->
    `atan` + selects, softmax, LayerNorm, GELU, hardswish, pixel_(un)shuffle, bilinear/nearest resize, argmax.
Heavy imports (coremltools, executorch, torchao) stay inside functions.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgeseg.errors import ArtifactError, UsageError
from edgeseg.export.base import (CalibrationData, Exporter, ExportOptions, ExportResult, INPUT_NAME,
                                 export_float_policy)

log = logging.getLogger(__name__)

MODEL_FILE = "model.mlpackage"
COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")
INT8_MODES = ("w8a8", "weights")
NOT_EXECUTED = "Core ML cannot execute on this host ({system}); converted and inspected only"
# aten ops without a coremltools 9.0 converter, and what removes them.
_NO_CONVERTER = {
    "fft": "use the matmul-DFT back-end (edgeseg.models.prepare_for_export does this for AFM)",
    "complex": "use the matmul-DFT back-end (edgeseg.models.prepare_for_export does this for AFM)",
    "angle": "use the portable atan2 of the AFM module (prepare_for_export)",
    "view_as_real": "use the matmul-DFT back-end (prepare_for_export)",
}
# MIL op types that mean "quantized" in a program.
_QUANT_OPS = ("quantize", "dequantize", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale",
              "constexpr_lut_to_dense")


@dataclass
class CoreMLOptions(ExportOptions):
    """coreml options.

    Attributes:
        compute_units: ct.ComputeUnit name stored in the model and used on macOS: "ALL" | "CPU_AND_NE" |
            "CPU_AND_GPU" | "CPU_ONLY".
        minimum_deployment_target: ct.target name ("iOS16", "iOS17", "iOS18", "macOS14", ...); W8A8 needs iOS17+.
        int8_mode: int8: "w8a8" (PT2E CoreMLQuantizer, quantized activations) or "weights" (weight-only int8).
    """

    compute_units: str = "ALL"
    minimum_deployment_target: str = "iOS17"
    int8_mode: str = "w8a8"

    def validate(self, where: str = "options") -> None:
        super().validate(where)
        if self.compute_units not in COMPUTE_UNITS:
            raise UsageError(f"{where}.compute_units: {self.compute_units!r} is not one of {', '.join(COMPUTE_UNITS)}")
        if not re.fullmatch(r"(iOS|macOS|tvOS|watchOS)\d+", str(self.minimum_deployment_target)):
            raise UsageError(f"{where}.minimum_deployment_target: {self.minimum_deployment_target!r} is not a "
                             "ct.target name such as iOS17 or macOS14")
        if self.int8_mode not in INT8_MODES:
            raise UsageError(f"{where}.int8_mode: {self.int8_mode!r} is not one of {', '.join(INT8_MODES)}")
        if self.input_dtype == "uint8":
            raise UsageError(f"{where}.input_dtype: Core ML multi-array inputs cannot be uint8; use float32 "
                             "(normalise on the host)")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0] if s else ''}"


def deployment_target(name: str):
    import coremltools as ct

    t = getattr(ct.target, name, None)
    if t is None:
        known = [n for n in dir(ct.target) if not n.startswith("_")]
        raise UsageError(f"options.minimum_deployment_target: {name!r} is not a ct.target in coremltools "
                         f"{ct.__version__}; known: {', '.join(known)}")
    return t


# ----------------------------------------------------------------------------------------------------------------
# Export-time rewrite: bicubic resize as two matmuls (coremltools 9.0 has no upsample_bicubic2d converter)
# ----------------------------------------------------------------------------------------------------------------
def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """PyTorch's cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor(src); t = src - floor."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def bicubic_matrix(n_in: int, n_out: int, align_corners: bool, scale_factor: float | None = None) -> np.ndarray:
    """(n_out, n_in) matrix M with `M @ x` == PyTorch's 1-D bicubic resize of x (upsample_bicubic2d along one axis).

    Source index as in aten's area_pixel_compute_source_index(cubic=True): align_corners -> dst*(in-1)/(out-1);
    else (dst+0.5)*scale-0.5 with scale = 1/scale_factor when given else in/out, not clamped; taps clamped.
    """
    dst = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = dst * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        scale = (1.0 / scale_factor) if scale_factor else n_in / n_out
        src = (dst + 0.5) * scale - 0.5
    i0 = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - i0)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for k in range(4):
        idx = np.clip(i0 - 1 + k, 0, n_in - 1)
        np.add.at(m, (np.arange(n_out), idx), w[:, k])
    return m.astype(np.float32)


@contextlib.contextmanager
def bicubic_as_matmul() -> Iterator[list]:
    """While active, `F.interpolate(..., mode="bicubic")` on a static 4-D shape becomes `Mh @ x @ Mw^T` with constant
    matrices (exact up to float rounding). Yields a list that records each rewrite ((in_hw, out_hw)).

    Needed with coremltools 9.0 (no upsample_bicubic2d converter); applied only around torch.export in this module.
    """
    import torch
    import torch.nn.functional as F

    original = F.interpolate
    rewrites: list = []

    def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                    recompute_scale_factor=None, antialias=False):
        if mode != "bicubic" or antialias or input.dim() != 4:
            return original(input, size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners,
                            recompute_scale_factor=recompute_scale_factor, antialias=antialias)
        h, w = int(input.shape[-2]), int(input.shape[-1])
        sf = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
        if size is not None:
            oh, ow = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
            sh = sw = None
        else:
            oh, ow = int(np.floor(h * sf[0])), int(np.floor(w * sf[1]))
            sh, sw = (None, None) if recompute_scale_factor else (float(sf[0]), float(sf[1]))
        ac = bool(align_corners)
        mh = torch.from_numpy(bicubic_matrix(h, oh, ac, sh)).to(input.dtype)
        mw = torch.from_numpy(bicubic_matrix(w, ow, ac, sw)).to(input.dtype)
        rewrites.append(((h, w), (oh, ow)))
        return torch.matmul(torch.matmul(mh, input), mw.transpose(0, 1))

    F.interpolate = interpolate
    try:
        yield rewrites
    finally:
        F.interpolate = original


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------
def export_program(model, example):
    """torch.export with the export-time rewrites, then `run_decompositions({})` (core ATen, as ct.convert needs).
    Returns (ExportedProgram, rewrites record)."""
    import torch

    with bicubic_as_matmul() as rewrites:
        ep = torch.export.export(model, (example,))
    ep = ep.run_decompositions({})
    check_convertible(ep)
    return ep, {"bicubic_as_matmul": [list(map(list, r)) for r in rewrites]} if rewrites else {}


def aten_ops(ep) -> dict[str, int]:
    c: collections.Counter = collections.Counter()
    for n in ep.graph.nodes:
        if n.op == "call_function":
            c[str(n.target)] += 1
    return dict(sorted(c.items()))


def check_convertible(ep) -> None:
    """Fail early, naming the op and the fix, for aten ops that coremltools 9.0 cannot convert."""
    for op in aten_ops(ep):
        for key, fix in _NO_CONVERTER.items():
            if key in op:
                raise ArtifactError(f"coreml: {op} has no Core ML converter (coremltools 9.0); {fix}")


def _convert(ep, precision_fp16: bool, options: CoreMLOptions, input_shape, output_name: str):
    import coremltools as ct

    kwargs: dict[str, Any] = dict(
        convert_to="mlprogram", minimum_deployment_target=deployment_target(options.minimum_deployment_target),
        compute_precision=ct.precision.FLOAT16 if precision_fp16 else ct.precision.FLOAT32,
        compute_units=getattr(ct.ComputeUnit, options.compute_units),
        inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(input_shape), dtype=np.float32)],
        outputs=[ct.TensorType(name=output_name)],
        skip_model_load=sys.platform != "darwin")
    try:
        return ct.convert(ep, **kwargs)
    except NotImplementedError as e:
        raise ArtifactError(f"coreml: ct.convert failed: {_first_line(e)} (coremltools {ct.__version__} has no "
                            "converter for it; lower it at export time in edgeseg/export/coreml.py)") from e
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"coreml: ct.convert failed: {_first_line(e)}") from e


def _cached_patterns() -> None:
    """Speed up executorch 1.5.1's CoreMLQuantizer: every `prepare_pt2e` re-traces ~400 small pattern modules with
    torch.export (measured: 405 traces, ~110 s of CPU per call on this host, whatever the model size). The pattern
    builders take hashable arguments, so they are memoised per process and each call gets a deep copy (the
    matcher rewrites the pattern graph's output in place); and the 1-D/3-D convolution patterns (our models have only 2-D convolutions) are answered with the 2-D pattern, which
    the matcher then skips as already annotated. Patched in place once; annotation results are unchanged."""
    import copy
    import functools

    import executorch.backends.apple.coreml.quantizer._coreml_quantizer_utils as utils

    if getattr(utils, "_edgeseg_cached", False):
        return

    def copying(fn):
        memo = functools.lru_cache(maxsize=None)(fn)

        @functools.wraps(fn)
        def get(*args, **kwargs):
            return copy.deepcopy(memo(*args, **kwargs))

        return get

    for name in ("get_conv_pattern", "get_conv_bn_pattern", "get_linear_pattern", "get_linear_bn_pattern",
                 "get_binary_op_act_pattern"):
        fn = getattr(utils, name, None)
        if fn is None:
            continue
        cached = copying(fn)
        if name in ("get_conv_pattern", "get_conv_bn_pattern"):
            def conv2d_only(conv_dim, *args, _cached=cached, **kwargs):
                return _cached(2, *args, **kwargs)

            setattr(utils, name, conv2d_only)
        else:
            setattr(utils, name, cached)
    utils._edgeseg_cached = True


def coreml_quantizer(per_channel: bool = True):
    """Core ML's W8A8 PT2E quantizer: int8 symmetric per-channel (or per-tensor) weights, uint8 per-tensor
    activations. The same object serves PTQ (prepare_pt2e) and QAT (prepare_qat_pt2e, edgeseg.quant.qat).

    The returned quantizer also takes `set_filter_function(keep)` (nodes for which `keep(node)` is False stay
    unannotated, i.e. float), which `edgeseg.quant.policy.FloatPolicy.apply_pt2e` uses; executorch 1.5.1's
    CoreMLQuantizer has no such hook (its per-module configs would cost one more pattern-matching pass per module)."""
    import torch
    from coremltools.optimize.torch.quantization.quantization_config import LinearQuantizerConfig
    from executorch.backends.apple.coreml.quantizer import CoreMLQuantizer

    _cached_patterns()

    class FilteredCoreMLQuantizer(CoreMLQuantizer):
        filter_fn = None

        def set_filter_function(self, fn):
            self.filter_fn = fn
            return self

        def _annotate_all_patterns(self, model, quantization_config, filter_fn=None):
            keep = self.filter_fn
            if keep is not None:
                inner = filter_fn

                def filter_fn(n, _keep=keep, _inner=inner):  # noqa: E731 - combined: both must accept the node
                    return _keep(n) and (_inner is None or _inner(n))

            return super()._annotate_all_patterns(model, quantization_config, filter_fn)

    cfg = LinearQuantizerConfig.from_dict({"global_config": {
        "quantization_scheme": "symmetric", "activation_dtype": torch.quint8, "weight_dtype": torch.qint8,
        "weight_per_channel": bool(per_channel)}})
    return FilteredCoreMLQuantizer(cfg)


def quantize_w8a8(model, calib: CalibrationData, policy=None):
    """PT2E PTQ with CoreMLQuantizer: returns (the converted (quantize/dequantize) torch GraphModule, number of
    FX ops left in float by `policy`).

    `policy` (edgeseg.quant.policy.FloatPolicy) keeps its modules unannotated. Needed for NMF2D (SegNeXt's
    LightHam): CoreMLQuantizer's observers are FakeQuantize modules that quantize while calibrating, so NMF's
    multiplicative updates divide by int8-rounded denominators; measured on test_segnext (executorch 1.5.1,
    torchao 0.18): the observer after `decode_head.hamburger.ham`'s last division saw inf/NaN and calibration
    failed with "min nan should be less than max nan"."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = model.example_input()
    try:
        with bicubic_as_matmul():
            gm = torch.export.export(model, (example,)).module()
        quantizer = coreml_quantizer()
        if policy is not None:
            quantizer = policy.apply_pt2e(quantizer)
        prepared = prepare_pt2e(gm, quantizer)
        float_ops = 0 if policy is None else sum(
            1 for n in prepared.graph.nodes if n.op == "call_function" and policy.node_is_float(n))
        with torch.no_grad():
            for x in calib.inputs:
                prepared(x)
        return convert_pt2e(prepared), float_ops
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"coreml: W8A8 quantization (PT2E CoreMLQuantizer) failed: {_first_line(e)}") from e


def quantize_weights(mlmodel):
    """Weight-only int8 (symmetric, per output channel) of conv/linear/conv_transpose weights."""
    import coremltools.optimize.coreml as cto

    op_cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=0)
    # batch_norm gets the same config: coremltools 9.0 refuses ("compression config conflict detected between
    # ops") a constant shared by a conv and a batch_norm (seen on OffSeg-T) when only one of them is configured.
    cfg = cto.OptimizationConfig(op_type_configs={"conv": op_cfg, "linear": op_cfg, "conv_transpose": op_cfg,
                                                  "batch_norm": op_cfg})
    try:
        return cto.linear_quantize_weights(mlmodel, cfg)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"coreml: linear_quantize_weights failed: {_first_line(e)}") from e


# ----------------------------------------------------------------------------------------------------------------
# Inspection of a saved .mlpackage (works on every host: reads the protobuf spec, runs nothing)
# ----------------------------------------------------------------------------------------------------------------
def _walk_ops(block) -> Iterator[Any]:
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from _walk_ops(b)


def _numel(tensor_type) -> int:
    n = 1
    for d in tensor_type.dimensions:
        n *= int(d.constant.size) if d.WhichOneof("dimension") == "constant" else 1
    return n


def inspect_mlpackage(path: str | Path) -> dict[str, Any]:
    """Facts about a saved ML program: spec version, I/O, op histogram, weight dtypes, quantized ops present.

    Returns {spec_version, inputs, outputs, op_histogram, weight_dtypes: {"<op>[.<arg>]: <dtype>": count} for
    constant tensors of more than 16 elements, quantized_ops: {op: count}}.
    """
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    spec = ct.utils.load_spec(str(path))
    if spec.WhichOneof("Type") != "mlProgram":
        raise ArtifactError(f"{path}: not an ML program")
    hist: collections.Counter = collections.Counter()
    dtypes: collections.Counter = collections.Counter()
    for fname, fn in spec.mlProgram.functions.items():
        block = fn.block_specializations[fn.opset]
        for op in _walk_ops(block):
            hist[op.type] += 1
            if op.type == "const" or op.type.startswith("constexpr"):
                for aname, val in op.attributes.items():
                    if val.type.WhichOneof("type") == "tensorType" and _numel(val.type.tensorType) > 16:
                        dt = MIL_pb2.DataType.Name(val.type.tensorType.dataType)
                        key = op.type if aname == "val" else f"{op.type}.{aname}"
                        dtypes[f"{key}: {dt}"] += 1
    return {"spec_version": spec.specificationVersion,
            "inputs": [i.name for i in spec.description.input],
            "outputs": [o.name for o in spec.description.output],
            "op_histogram": dict(sorted(hist.items())),
            "weight_dtypes": dict(sorted(dtypes.items())),
            "quantized_ops": {k: hist[k] for k in _QUANT_OPS if hist.get(k)}}


def compute_plan_fallbacks(path: Path, compute_units: str) -> list[str] | None:
    """macOS only: MIL ops the Core ML compute plan does not prefer to run on the Neural Engine ("op xN")."""
    if sys.platform != "darwin":
        return None
    try:
        import coremltools as ct
        from coremltools.models.compute_device import MLNeuralEngineComputeDevice
        from coremltools.models.compute_plan import MLComputePlan

        compiled = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units)
                                     ).get_compiled_model_path()
        plan = MLComputePlan.load_from_path(compiled, compute_units=getattr(ct.ComputeUnit, compute_units))
        off: collections.Counter = collections.Counter()
        for fn in plan.model_structure.program.functions.values():
            for op in fn.block.operations:
                if op.operator_name in ("const",) or op.operator_name.startswith("constexpr"):
                    continue
                usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
                if usage is not None and not isinstance(usage.preferred_compute_device, MLNeuralEngineComputeDevice):
                    off[op.operator_name] += 1
        return [f"{k} x{v}" for k, v in sorted(off.items())]
    except Exception as e:  # noqa: BLE001 - the plan is informative; its absence is not an export failure
        log.warning("coreml: compute plan unavailable (%s)", _first_line(e))
        return None


def _check_w8a8_target(options: CoreMLOptions) -> None:
    if not re.fullmatch(r"(iOS(1[7-9]|[2-9]\d)|macOS(1[4-9]|[2-9]\d)|tvOS(1[7-9]|[2-9]\d)|watchOS(1[0-9]|[2-9]\d))",
                        options.minimum_deployment_target):
        raise UsageError(f"options.minimum_deployment_target: W8A8 needs iOS17/macOS14 or later (quantize/"
                         f"dequantize ops), not {options.minimum_deployment_target}")


class CoreMLExporter(Exporter):
    """Core ML ML program (.mlpackage): fp32, fp16, int8 (W8A8 PT2E or weight-only)."""

    name = "coreml"
    precisions = ("fp32", "fp16", "int8")
    Options = CoreMLOptions
    tools = ("coremltools", "torch", "executorch")

    def quantizer(self, options: ExportOptions | None = None):
        return coreml_quantizer()  # callers apply their FloatPolicy (it has set_filter_function)

    def export(self, model, spec, precision, input_hw, calib_data, out_dir: Path, options: CoreMLOptions
               ) -> ExportResult:
        import platform

        if precision not in self.precisions:
            raise UsageError(f"--precision: coreml supports {', '.join(self.precisions)}, not {precision}")
        if options.input_dtype == "uint8":
            raise UsageError("options.input_dtype: Core ML multi-array inputs cannot be uint8; use float32")
        out_dir = Path(out_dir)
        output_name = model.output_contract(spec.num_classes)["name"]
        example = model.example_input()
        timings: dict[str, float] = {}
        quant: dict[str, Any] = {}
        t = time.perf_counter()
        source = model
        prequantized = getattr(model, "prequantized", None) if precision == "int8" else None
        w8a8 = precision == "int8" and (options.int8_mode == "w8a8" or bool(prequantized))
        if prequantized:
            # QAT graph (edgeseg qat --target coreml): already quantize/dequantize with the learned scales;
            # ct.convert turns them into quantize/dequantize + int8 constexpr weights, no calibration here
            _check_w8a8_target(options)
            quant = {**prequantized, "calibration_images": 0,
                     "conversion": "ct.convert of the QAT-converted PT2E graph (CoreMLQuantizer scheme)"}
        elif w8a8:
            _check_w8a8_target(options)
            if calib_data is None or not calib_data.inputs:
                raise UsageError("--precision int8: coreml W8A8 needs calibration images")
            policy = export_float_policy(model, options)
            source, float_ops = quantize_w8a8(model, calib_data, policy)
            timings["pt2e_quantize"] = time.perf_counter() - t
            quant = {"scheme": "W8A8: PT2E CoreMLQuantizer (executorch.backends.apple.coreml.quantizer)",
                     "weights": "int8 symmetric per-channel", "activations": "uint8 per-tensor",
                     "calibration_images": len(calib_data.inputs), "float_modules": policy.to_json(),
                     "float_ops": float_ops}
            t = time.perf_counter()
        try:
            ep, rewrites = export_program(source, example)
        except ArtifactError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"coreml: torch.export failed: {_first_line(e)}") from e
        timings["torch_export"] = time.perf_counter() - t
        t = time.perf_counter()
        mlmodel = _convert(ep, precision != "fp32", options, example.shape, output_name)
        timings["ct_convert"] = time.perf_counter() - t
        if precision == "int8" and not w8a8:
            t = time.perf_counter()
            mlmodel = quantize_weights(mlmodel)
            timings["linear_quantize_weights"] = time.perf_counter() - t
            quant = {"scheme": "weight-only int8 (ct.optimize.coreml.linear_quantize_weights)",
                     "weights": "int8 symmetric per-channel (conv, linear, conv_transpose)",
                     "activations": "fp16"}
        mlmodel.short_description = f"edgeseg {spec.model} ({precision})"
        try:
            mlmodel.save(str(out_dir / MODEL_FILE))
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"coreml: saving {MODEL_FILE} failed: {_first_line(e)}") from e

        info = inspect_mlpackage(out_dir / MODEL_FILE)
        if info["inputs"] != [INPUT_NAME] or info["outputs"] != [output_name]:
            raise ArtifactError(f"{out_dir / MODEL_FILE}: I/O names {info['inputs']} -> {info['outputs']}, expected "
                                f"[{INPUT_NAME!r}] -> [{output_name!r}]")
        if precision == "int8" and not info["quantized_ops"]:
            raise ArtifactError(f"{out_dir / MODEL_FILE}: int8 export holds no quantized op")
        if w8a8 and not info["quantized_ops"].get("quantize"):
            raise ArtifactError(f"{out_dir / MODEL_FILE}: W8A8 export holds no activation quantize op")
        executed = sys.platform == "darwin"
        inspection = {**info, "compute_units": options.compute_units,
                      "minimum_deployment_target": options.minimum_deployment_target,
                      "aten_ops": aten_ops(ep), "rewrites": rewrites,
                      "timings_s": {k: round(v, 2) for k, v in timings.items()}}
        return ExportResult(files=[MODEL_FILE],
                            fallback_ops=compute_plan_fallbacks(out_dir / MODEL_FILE, options.compute_units),
                            executed_here=executed,
                            not_executed_reason=None if executed else NOT_EXECUTED.format(system=platform.system()),
                            quantization=quant, inspection=inspection)


EXPORTER = CoreMLExporter
