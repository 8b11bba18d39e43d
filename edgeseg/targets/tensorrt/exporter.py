"""jetson-tensorrt exporter: a TensorRT-friendly ONNX (static shapes, opset >= 18; int8 as QDQ with symmetric
int8 activations and weights, which is TensorRT's explicit quantization) plus the exact `trtexec` command and a
small on-device build/run script. A QAT checkpoint (`edgeseg qat --target jetson-tensorrt`, symmetric
activations) is exported as ONNX QDQ straight from its converted PT2E graph, keeping the learned scales. The engine
is device-specific, so it is built on the Jetson; when `tensorrt` is importable and a CUDA GPU is present here, the
exporter builds and runs it too.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.errors import ArtifactError, UsageError
from edgeseg.export.base import Exporter, ExportJob, ExportOptions, ExportResult, export_float_policy
from edgeseg.targets.onnx.exporter import MIN_OPSET, MODEL_FILE, export_onnx, op_histogram
from edgeseg.targets.onnx.quantize import quantize_qdq

log = logging.getLogger(__name__)

TRTEXEC_FILE = "trtexec.sh"
SCRIPT_FILE = "build_and_run.py"
ENGINE_FILE = "model.engine"
# TensorRT runs int8 where a Q/DQ pair brackets a layer it can fuse; quantize the compute-heavy ops only and let
# everything else run in fp16/fp32 (TensorRT developer guide, "Explicit Quantization").
TRT_QUANT_OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm"]


@dataclass
class TensorrtOptions(ExportOptions):
    """jetson-tensorrt options (int8 activations and weights are always symmetric: TensorRT's explicit
    quantization has no zero points).

    Attributes:
        opset: ONNX opset (>= 18).
        workspace_mb: trtexec --memPoolSize=workspace:<MiB>.
        per_channel: int8: per-channel weight scales.
        calibrate_method: int8: "MinMax" | "Entropy" | "Percentile".
    """

    opset: int = MIN_OPSET
    workspace_mb: int = 1024
    per_channel: bool = True
    calibrate_method: str = "MinMax"

    def validate(self, where: str = "options") -> None:
        super().validate(where)
        if self.opset < MIN_OPSET:
            raise UsageError(f"{where}.opset: {self.opset} < {MIN_OPSET}")
        if self.calibrate_method not in ("MinMax", "Entropy", "Percentile"):
            raise UsageError(f"{where}.calibrate_method: {self.calibrate_method!r} is not MinMax, Entropy or "
                             "Percentile")


def trtexec_command(precision: str, workspace_mb: int) -> str:
    flags = {"fp32": "", "fp16": " --fp16", "int8": " --int8 --fp16"}[precision]
    return (f"trtexec --onnx={MODEL_FILE} --saveEngine={ENGINE_FILE} --memPoolSize=workspace:{workspace_mb}"
            f"{flags} --useCudaGraph --noDataTransfers --separateProfileRun")


_SCRIPT = '''#!/usr/bin/env python3
"""Build the TensorRT engine from model.onnx on this device (Jetson, JetPack >= 6 / TensorRT >= 10) and run it
once on a random input in the manifest's contract. Usage: python3 build_and_run.py [--runs 50]."""
import argparse, json, time
from pathlib import Path

import numpy as np
import tensorrt as trt

HERE = Path(__file__).resolve().parent
PRECISION = "{precision}"


def build(onnx_path, engine_path, workspace_mb):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        raise SystemExit("\\n".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if PRECISION in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if PRECISION == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the Q/DQ nodes
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise SystemExit("TensorRT engine build failed")
    Path(engine_path).write_bytes(engine)
    return engine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--workspace-mb", type=int, default={workspace_mb})
    args = ap.parse_args()
    import torch  # CUDA buffers; JetPack ships a CUDA torch

    manifest = json.loads((HERE / "manifest.json").read_text())
    engine_bytes = build(HERE / "{model}", HERE / "{engine}", args.workspace_mb)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    ctx = engine.create_execution_context()
    inp = manifest["input"]
    dtype = {{"float32": torch.float32, "uint8": torch.uint8}}[inp["dtype"]]
    x = (torch.randn(inp["shape"]) if dtype == torch.float32 else torch.randint(0, 256, inp["shape"])).to(dtype).cuda()
    outs = {{}}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            ctx.set_tensor_address(name, x.data_ptr())
        else:
            shape = tuple(engine.get_tensor_shape(name))
            t = torch.empty(shape, dtype=torch.float32 if manifest["output"]["dtype"] == "float32" else torch.uint8,
                            device="cuda")
            outs[name] = t
            ctx.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.current_stream().cuda_stream
    ctx.execute_async_v3(stream)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.runs):
        ctx.execute_async_v3(stream)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1000 / max(args.runs, 1)
    print(json.dumps({{"engine": "{engine}", "precision": PRECISION, "latency_ms": round(ms, 3),
                      "outputs": {{k: list(v.shape) for k, v in outs.items()}}}}))


if __name__ == "__main__":
    main()
'''


def _tensorrt_here() -> str | None:
    """None if TensorRT and a CUDA GPU are usable here, else why not."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed on this host (the engine is built on the Jetson: see trtexec.sh)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this host (the engine is built on the Jetson: see trtexec.sh)"
    return None


class TensorrtExporter(Exporter):
    """TensorRT-friendly ONNX + trtexec command + on-device script (engine built on the device)."""

    name = "tensorrt"
    precisions = ("fp32", "fp16", "int8")
    Options = TensorrtOptions
    tools = ("onnx", "onnxruntime", "onnxscript", "torch")

    def quantizer(self, options: ExportOptions | None = None, is_qat: bool = False):
        """The PT2E quantizer `edgeseg qat --target jetson-tensorrt` trains for: XNNPACK's symmetric int8 config
        with symmetric activations (TensorRT's explicit quantization needs zero points of 0). The PTQ itself is
        ONNX Runtime's symmetric quantize_static on the float ONNX (edgeseg.targets.onnx.quantize.quantize_qdq), not PT2E."""
        from edgeseg.quant.pt2e_specs import xnnpack_quantizer

        return xnnpack_quantizer(per_channel=getattr(options, "per_channel", True), is_qat=is_qat,
                                 symmetric_activations=True)

    def int8_scheme(self, target: str, options: ExportOptions):
        """TensorRT's explicit quantization: symmetric int8 weights and activations (zero points of 0)."""
        from edgeseg.quant.sensitivity import Int8Scheme

        per_channel = bool(getattr(options, "per_channel", True))
        chan = "per-channel" if per_channel else "per-tensor"
        return Int8Scheme(target, f"TensorRT explicit QDQ: int8 symmetric {chan} weights, int8 symmetric per-tensor "
                          "activations", w_qmin=-127, w_qmax=127, w_div=127.0, per_channel=per_channel,
                          activations="symmetric", a_qmin=-127, a_qmax=127, a_div=127.0,
                          options={"per_channel": per_channel,
                                   "calibrate_method": getattr(options, "calibrate_method", "MinMax")})

    def export(self, job: ExportJob) -> ExportResult:
        model, spec, precision, calib_data, options = job.model, job.spec, job.precision, job.calib, job.options
        out_dir = Path(job.out_dir)
        output_name = model.output_contract(spec.num_classes)["name"]
        prequantized = job.qat
        fp32_path = out_dir / ("model_fp32.onnx" if precision == "int8" and not prequantized else MODEL_FILE)
        with job.stage("torch_onnx_export", "torch.onnx.export"):
            export_onnx(model, fp32_path, options.opset, output_name)
        quant: dict[str, Any] = {}
        if prequantized:
            # QAT graph (edgeseg qat --target jetson-tensorrt): its q/dq pairs with the learned scales are the
            # QDQ nodes TensorRT reads; no ONNX Runtime calibration. TensorRT needs zero points of 0.
            if not op_histogram(out_dir / MODEL_FILE).get("QuantizeLinear"):
                raise ArtifactError(f"{out_dir / MODEL_FILE}: the QAT graph exported without QuantizeLinear nodes")
            asym = asymmetric_quantize_nodes(out_dir / MODEL_FILE)
            if asym:
                raise ArtifactError(f"{out_dir / MODEL_FILE}: {len(asym)} QuantizeLinear node(s) with a non-zero zero "
                                    f"point (e.g. {asym[0]}); TensorRT takes symmetric int8 only: fine-tune with "
                                    "`edgeseg qat --target jetson-tensorrt`")
            quant = {**prequantized, "calibration_images": 0,
                     "conversion": "ONNX QDQ of the QAT-converted PT2E graph (learned scales, symmetric)"}
        elif precision == "int8":
            if calib_data is None or not calib_data.inputs:
                raise UsageError("--precision int8: jetson-tensorrt needs calibration images")
            # TensorRT explicit quantization takes symmetric int8 (zero point 0) for activations and weights.
            with job.stage("quantize_static", "ONNX Runtime quantize_static"):
                quant = quantize_qdq(fp32_path, out_dir / MODEL_FILE, calib_data, activation_type="int8",
                                     reduce_range=False, per_channel=options.per_channel,
                                     calibrate_method=options.calibrate_method, symmetric=True,
                                     op_types=TRT_QUANT_OPS, policy=export_float_policy(model, options))
            quant["scheme"] = "TensorRT explicit quantization (symmetric int8 QDQ, ONNX Runtime calibration)"
            fp32_path.unlink()
        elif precision == "fp16":
            quant = {"scheme": "fp32 ONNX; TensorRT builds fp16 kernels (trtexec --fp16)"}
        cmd = trtexec_command(precision, options.workspace_mb)
        (out_dir / TRTEXEC_FILE).write_text(
            "#!/bin/sh\n# Build and time the TensorRT engine on the Jetson (JetPack's trtexec is in "
            "/usr/src/tensorrt/bin).\nset -e\ncd \"$(dirname \"$0\")\"\n" + cmd + "\n")
        (out_dir / SCRIPT_FILE).write_text(_SCRIPT.format(precision=precision, workspace_mb=options.workspace_mb,
                                                          model=MODEL_FILE, engine=ENGINE_FILE))
        inspection: dict[str, Any] = {"op_histogram": op_histogram(out_dir / MODEL_FILE), "trtexec": cmd,
                                      "opset": options.opset}
        with job.stage("onnxruntime_check", "the ONNX Runtime check"):
            inspection["onnxruntime_check"] = _ort_check(out_dir / MODEL_FILE, model)
        why_not = _tensorrt_here()
        files = [MODEL_FILE, TRTEXEC_FILE, SCRIPT_FILE]
        if why_not is None:
            inspection["tensorrt"] = _build_and_run_here(out_dir, model, precision, options.workspace_mb)
        return ExportResult(files=files, fallback_ops=None, executed_here=False,
                            not_executed_reason=why_not or "TensorRT engine built and run here (see "
                            "inspection.tensorrt); the shipped artifact is the ONNX, rebuilt on the Jetson",
                            quantization=quant, inspection=inspection)


def asymmetric_quantize_nodes(path: Path) -> list[str]:
    """Names of the QuantizeLinear nodes of an ONNX file whose zero point is not all zeros."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path), load_external_data=False)
    vals = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
    out = []
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2]:
            zp = vals.get(n.input[2])
            if zp is None or np.any(zp != 0):
                out.append(n.name)
    return out


def _ort_check(path: Path, model) -> dict[str, Any]:
    """Run the ONNX with ONNX Runtime CPU on two example inputs and compare with eager (TensorRT is not here).

    Graph optimisations off: QDQ then runs as dequantize -> float op, the arithmetic TensorRT computes exactly;
    ORT's fused x86 int8 kernels saturate on full-range symmetric weights without VNNI (see edgeseg/targets/onnx/session.py)."""
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    agree = total = 0
    diff = 0.0
    for seed in (0, 1):
        x = model.example_input(seed=seed)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        if model.output == "argmax":
            agree += int((got == ref).sum())
            total += ref.size
        else:
            agree += int((got.argmax(1) == ref.argmax(1)).sum())
            total += ref.shape[0] * ref.shape[2] * ref.shape[3]
            diff = max(diff, float(np.abs(got - ref).max()))
    return {"runtime": "onnxruntime CPU, reference QDQ arithmetic (graph optimisations off)", "inputs": "2 random example inputs", "argmax_agreement": agree / total,
            "max_abs_logit_diff": None if model.output == "argmax" else diff}


def _build_and_run_here(out_dir: Path, model, precision: str, workspace_mb: int) -> dict[str, Any]:
    """Build the engine with TensorRT's Python API here and compare one output with eager (GPU hosts only)."""
    import runpy

    ns = runpy.run_path(str(out_dir / SCRIPT_FILE), run_name="edgeseg_trt")
    t = time.perf_counter()
    ns["build"](out_dir / MODEL_FILE, out_dir / ENGINE_FILE, workspace_mb)
    info = {"built": True, "build_seconds": round(time.perf_counter() - t, 1)}
    (out_dir / ENGINE_FILE).unlink(missing_ok=True)  # device-specific: never shipped
    return info


EXPORTER = TensorrtExporter
