"""Core ML session: `MLModel.predict` on macOS; on other hosts the artifact opens (inspection works) but running it
raises a clear ArtifactError, because the Core ML framework exists only on Apple platforms. The inspection of a saved
program (`inspect_mlpackage`: op histogram, weight dtypes, quantized ops) reads its protobuf spec and works on
every host; the exporter records it in the manifest."""
from __future__ import annotations

import collections
import logging
import platform
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgeseg.errors import ArtifactError, one_line
from edgeseg.runtime.base import Session

log = logging.getLogger(__name__)


# MIL op types that mean "quantized" in a program.
_QUANT_OPS = ("quantize", "dequantize", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale",
              "constexpr_lut_to_dense")


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
        log.warning("coreml: compute plan unavailable (%s)", one_line(e, with_type=True))
        return None


class CoreMLSession(Session):
    """Opens `model.mlpackage`. `executes_here` is True only where Core ML can run it (macOS).

    kwargs: `compute_units` (a ct.ComputeUnit name; default the manifest's options.compute_units). `num_threads` is
    ignored (Core ML schedules its own threads).
    """

    @property
    def executes_here(self) -> bool:
        return sys.platform == "darwin"

    executed = executes_here  # the name this session's attribute had before `Session.executes_here`

    @property
    def why_not_here(self) -> str | None:
        if self.executes_here:
            return None
        return (f"Core ML cannot run on {platform.system()}: Core ML exists only on macOS/iOS (this artifact is "
                "converted and can be inspected here, not run)")

    def _load(self) -> None:
        self.compute_units = self.kwargs.get("compute_units") or (self.manifest.options or {}).get(
            "compute_units", "ALL")
        self._model = None
        if not self.model_path.is_dir():
            raise ArtifactError(f"{self.model_path}: missing .mlpackage folder")
        if not self.executes_here:
            return
        import coremltools as ct

        try:
            self._model = ct.models.MLModel(str(self.model_path),
                                            compute_units=getattr(ct.ComputeUnit, self.compute_units))
        except Exception as e:  # noqa: BLE001 - runtime failures become one line naming the file
            raise ArtifactError(f"{self.model_path}: Core ML could not load it ({type(e).__name__}: "
                                f"{one_line(e)})") from e

    def inspect(self) -> dict[str, Any]:
        """The program's structure (op histogram, weight dtypes, quantized ops); works on every host."""
        return inspect_mlpackage(self.model_path)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if not self.executes_here:
            raise ArtifactError(f"{self.model_path}: Core ML cannot execute on this host ({platform.system()}); "
                                "converted and inspected only (run it on macOS/iOS)")
        if x.shape[0] != 1:  # static batch 1
            return np.concatenate([self._run(x[i:i + 1]) for i in range(x.shape[0])], 0)
        out = self._model.predict({self.manifest.input["name"]: x})
        y = np.asarray(out[self.manifest.output["name"]])
        return y.astype(np.uint8) if self.manifest.output.get("dtype") == "uint8" else y.astype(np.float32)

    def close(self) -> None:
        self._model = None


SESSION = CoreMLSession


# The artifact folder's run script (edgeseg.export.device_kit writes run_coreml.py around it): a `Runner` on
# coremltools' MLModel.predict (macOS only; Core ML exists only on Apple platforms), plus `Segment.swift` for an app.
RUN_SCRIPT = '''
RUNTIME = "Core ML"
PACKAGES = ["coremltools"]  # pip distributions (pinned to the versions in manifest.json's tool_versions)


class Runner:
    """coremltools MLModel(compute_units = the export's options.compute_units) -> predict; macOS only. Core ML
    schedules its own threads (`threads` is not used)."""

    def __init__(self, here, manifest, threads):
        if sys.platform != "darwin":
            raise RuntimeError("Core ML runs only on macOS/iOS (coremltools predict needs macOS); on iOS use "
                               "Segment.swift")
        import coremltools as ct

        units = (manifest.get("options") or {}).get("compute_units", "ALL")
        self.model = ct.models.MLModel(str(here / manifest["model_file"]),
                                       compute_units=getattr(ct.ComputeUnit, units))
        self.input_name, self.output_name = manifest["input"]["name"], manifest["output"]["name"]

    def __call__(self, x):
        return np.asarray(self.model.predict({self.input_name: x})[self.output_name])
'''

SWIFT_FILE = "Segment.swift"
# A Swift starting point for an iOS/macOS app: Core ML in, class map out, constants from manifest.json (not compiled
# here: edgeseg's hosts have no Swift toolchain).
SWIFT_SNIPPET = '''// Segment.swift: run this edgeseg Core ML artifact in an iOS/macOS app (Core ML only).
// Add model.mlpackage to the Xcode target (Xcode compiles it to model.mlmodelc) and manifest.json as a resource.
// See README.md for the input and output contract; run_coreml.py --self-test checks the same steps on a Mac.
import CoreML
import Foundation

struct Manifest: Decodable {
    struct Tensor: Decodable {
        let name: String; let shape: [Int]; let dtype: String; let layout: String?; let kind: String?
    }
    let input: Tensor
    let output: Tensor
    let mean: [Float]
    let std: [Float]
    let input_hw: [Int]
    let class_names: [String]
    let palette: [[Int]]
}

func loadSegmenter() throws -> (MLModel, Manifest) {
    let manifest = try JSONDecoder().decode(Manifest.self, from: Data(contentsOf: Bundle.main.url(
        forResource: "manifest", withExtension: "json")!))
    let config = MLModelConfiguration()
    config.computeUnits = .all
    let model = try MLModel(contentsOf: Bundle.main.url(forResource: "model", withExtension: "mlmodelc")!,
                            configuration: config)
    return (model, manifest)
}

/// `rgb`: input_hw[0] x input_hw[1] RGB pixels, interleaved, already resized (bilinear) to the input size.
/// Returns the class index of each pixel at that size (row-major); colour it with manifest.palette.
func segment(_ model: MLModel, _ m: Manifest, rgb: [UInt8]) throws -> [UInt8] {
    let h = m.input_hw[0], w = m.input_hw[1]
    let nhwc = m.input.layout == "NHWC", inGraph = m.input.dtype == "uint8"
    let x = try MLMultiArray(shape: m.input.shape.map { NSNumber(value: $0) }, dataType: .float32)
    let px = x.dataPointer.bindMemory(to: Float.self, capacity: h * w * 3)
    for i in 0..<(h * w) {
        for c in 0..<3 {
            let v = Float(rgb[i * 3 + c])
            px[nhwc ? i * 3 + c : c * h * w + i] = inGraph ? v : (v - m.mean[c]) / m.std[c]
        }
    }
    let out = try model.prediction(from: MLDictionaryFeatureProvider(dictionary: [m.input.name: x]))
    let y = out.featureValue(for: m.output.name)!.multiArrayValue!
    if m.output.kind == "argmax" {  // (1, H, W) class map at input size
        return (0..<(h * w)).map { UInt8(truncating: y[[0, NSNumber(value: $0 / w), NSNumber(value: $0 % w)]]) }
    }
    // (1, K, h/s, w/s) logits: bilinear upsampling to (H, W) (half-pixel centres), then argmax over K
    let k = y.shape[1].intValue, ys = y.shape[2].intValue, xs = y.shape[3].intValue
    func src(_ o: Int, _ n: Int, _ size: Int) -> (Int, Int, Float) {
        let s = max(0, (Float(o) + 0.5) * Float(n) / Float(size) - 0.5)
        let i0 = min(Int(s), n - 1)
        return (i0, min(i0 + 1, n - 1), s - Float(i0))
    }
    var classes = [UInt8](repeating: 0, count: h * w)
    for r in 0..<h {
        let (r0, r1, tr) = src(r, ys, h)
        for c in 0..<w {
            let (c0, c1, tc) = src(c, xs, w)
            var best = -Float.infinity
            for j in 0..<k {
                func at(_ a: Int, _ b: Int) -> Float {
                    y[[0, NSNumber(value: j), NSNumber(value: a), NSNumber(value: b)]].floatValue
                }
                let v = (at(r0, c0) * (1 - tc) + at(r0, c1) * tc) * (1 - tr)
                    + (at(r1, c0) * (1 - tc) + at(r1, c1) * tc) * tr
                if v > best { best = v; classes[r * w + c] = UInt8(j) }
            }
        }
    }
    return classes
}
'''
EXTRA_FILES = {SWIFT_FILE: SWIFT_SNIPPET}
