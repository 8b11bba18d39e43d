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

Export-time lowering (lowering.py, never in model code), measured with coremltools 9.0 + torch 2.13:
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

import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeseg.errors import ArtifactError, UsageError
from edgeseg.export.base import INPUT_NAME, Exporter, ExportJob, ExportOptions, ExportResult, export_float_policy
from edgeseg.targets.coreml.lowering import (  # noqa: F401
    _convert,
    aten_ops,
    bicubic_as_matmul,
    bicubic_matrix,
    check_convertible,
    deployment_target,
    export_program,
)
from edgeseg.targets.coreml.quantize import coreml_quantizer, quantize_w8a8, quantize_weights, zero_channel_configs  # noqa: F401
from edgeseg.targets.coreml.session import compute_plan_fallbacks, inspect_mlpackage  # noqa: F401

log = logging.getLogger(__name__)

MODEL_FILE = "model.mlpackage"
COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")
INT8_MODES = ("w8a8", "weights")
NOT_EXECUTED = "Core ML cannot execute on this host ({system}); converted and inspected only"
# aten ops without a coremltools 9.0 converter, and what removes them.


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

    def quantizer(self, options: ExportOptions | None = None, is_qat: bool = False):
        """Core ML's W8A8 CoreMLQuantizer (coreml_quantizer): the same object serves PTQ and QAT. Callers apply
        their FloatPolicy (it has set_filter_function)."""
        # memoised patterns (one prepare costs ~110 s without) and a node filter for the float policy
        # (executorch 1.5.1's CoreMLQuantizer has neither)
        return coreml_quantizer(per_channel=getattr(options, "per_channel", True))

    def int8_scheme(self, target: str, options: ExportOptions):
        """Core ML's int8 by `int8_mode`: weight-only int8, or W8A8 (CoreMLQuantizer symmetric, uint8 activations
        with zero point 128)."""
        from edgeseg.quant.sensitivity import Int8Scheme

        if options.int8_mode == "weights":
            return Int8Scheme(target, "Core ML weight-only int8: symmetric per-channel weights, float activations",
                              w_qmin=-127, w_qmax=127, w_div=127.0, per_channel=True, activations="none",
                              options={"int8_mode": options.int8_mode})
        return Int8Scheme(target, "Core ML W8A8 (CoreMLQuantizer symmetric): int8 symmetric per-channel weights, "
                          "uint8 symmetric per-tensor activations (zero point 128)", w_qmin=-128, w_qmax=127,
                          w_div=127.5, per_channel=True, activations="symmetric", a_qmin=0, a_qmax=255, a_div=127.5,
                          a_zero=128, options={"int8_mode": options.int8_mode})

    def why_not_here(self) -> str | None:
        return None if sys.platform == "darwin" else f"Core ML runs only on macOS (this host: {sys.platform})"

    def export(self, job: ExportJob) -> ExportResult:
        import platform

        model, spec, precision, calib_data, options = job.model, job.spec, job.precision, job.calib, job.options
        out_dir = Path(job.out_dir)
        output_name = model.output_contract(spec.num_classes)["name"]
        example = model.example_input()
        quant: dict[str, Any] = {}
        source = model
        prequantized = job.qat
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
            with job.stage("pt2e_quantize", "PT2E quantization (CoreMLQuantizer)"):
                source, float_ops = quantize_w8a8(model, calib_data, policy)
            quant = {"scheme": "W8A8: PT2E CoreMLQuantizer (executorch.backends.apple.coreml.quantizer)",
                     "weights": "int8 symmetric per-channel", "activations": "uint8 per-tensor",
                     "calibration_images": len(calib_data.inputs), "float_modules": policy.to_json(),
                     "float_ops": float_ops}
        with job.stage("torch_export", "torch.export"):
            ep, rewrites = export_program(source, example)
        with job.stage("ct_convert", "ct.convert"):
            mlmodel = _convert(ep, precision != "fp32", options, example.shape, output_name)
        if precision == "int8" and not w8a8:
            with job.stage("linear_quantize_weights"):
                mlmodel = quantize_weights(mlmodel)
            quant = {"scheme": "weight-only int8 (ct.optimize.coreml.linear_quantize_weights)",
                     "weights": "int8 symmetric per-channel (conv, linear, conv_transpose)",
                     "activations": "fp16"}
        mlmodel.short_description = f"edgeseg {spec.model} ({precision})"
        with job.stage("save", f"saving {MODEL_FILE}"):
            mlmodel.save(str(out_dir / MODEL_FILE))

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
                      "aten_ops": aten_ops(ep), "rewrites": rewrites}
        return ExportResult(files=[MODEL_FILE],
                            fallback_ops=compute_plan_fallbacks(out_dir / MODEL_FILE, options.compute_units),
                            executed_here=executed,
                            not_executed_reason=None if executed else NOT_EXECUTED.format(system=platform.system()),
                            quantization=quant, inspection=inspection)


EXPORTER = CoreMLExporter
