"""LiteRT exporter (`.tflite` for Android phones, run by the LiteRT Interpreter with its default XNNPACK delegate):
fp32 through `litert_torch.convert` of the ExportWrapper at the static export size (torch.export -> litert-torch's
FX passes, incl. its NCHW->NHWC layout pass -> TFLite flatbuffer); int8 full-integer through ai-edge-quantizer on
the fp32 flatbuffer (`quantize.py`), with float32 I/O kept in graph. What the manifest reports (op histogram,
XNNPACK partitions and the ops left off XNNPACK): `inspection.py`.

Measured (litert-torch 0.10.0, ai-edge-litert 2.3.0, 384x480, 1 thread, Intel Xeon with AVX-512):
offseg_lite0, segnext_t_offset and offseg_t convert exactly (max |dlogit| <= 4.2e-5, argmax agreement 1.0) in the
forms of the profile's [export_form] (sampler="gather": litert-torch lowers grid_sample to GATHER_ND + masks on
builtin kernels, 3x slower; carafe="channels_last": 281 vs 350 ms on offseg_t), and the Interpreter runs them at
0.85-1.06x ExecuTorch's 1-thread latency.

int8 recipe "xnnpack" (default) on segnext_t_offset_camvid at 384x480, camvid-train-16 calibration (Intel Xeon with
AVX-512/VNNI/AMX, shared with a training job; 1 thread): `edgeseg validate` on CamVid val (101 images) 98.31 % argmax
agreement with the fp32 checkpoint, mIoU drop 0.39 points; 4 XNNPACK partitions (as fp32; off XNNPACK only
OffsetLearning's 3 dynamic-weight FULLY_CONNECTED); `bench/interleaved.py` p50 88.8 ms against 134.1 ms fp32
(0.66x), 105.3 ms for "static_wi8_ai8" (94.33 %, -2.63 mIoU, 49 partitions) and 99.2 ms for ExecuTorch int8.

`import litert_torch` takes ~5 s (it imports jax, torchao, scipy) and sets environment variables (TF_CPP_MIN_LOG_LEVEL,
TPU_SKIP_MDS_QUERY, TORCHINDUCTOR_CACHE_DIR); it is imported only inside `export`, and the environment is restored
when the export ends. Its progress tree and logs go to stderr (the vendor log under the CLI).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from edgeseg.errors import ArtifactError, UsageError, one_line
from edgeseg.export.base import Exporter, ExportJob, ExportOptions, ExportResult, export_float_policy

log = logging.getLogger(__name__)

MODEL_FILE = "model.tflite"


@dataclass
class LiteRTOptions(ExportOptions):
    """litert options.

    Attributes:
        recipe: int8: the ai-edge-quantizer recipe. "xnnpack" (default): int8 (per-channel weights, per-tensor
            activations) only for the ops XNNPACK runs in int8 -- conv, depthwise conv, FC, batch matmul and the
            add/mul/concat/pad/resize/reshape/transpose/pool/mean between them -- with GELU, softmax, division,
            rsqrt/sqrt/squared-difference and every op of a LayerNorm/GroupNorm module left float (see
            `quantize.py`). "static_wi8_ai8": ai-edge-quantizer's own recipe, every op it supports int8 (GELU and
            normalisation arithmetic included: segnext_t_offset 94.3 % agreement, -2.63 mIoU, 49 XNNPACK partitions).
        float_io: int8: keep float32 input/output (quantize/dequantize in graph), the contract of every target;
            false gives int8 I/O tensors, which the session quantizes/dequantizes with the tensors' own parameters.
    """

    recipe: str = "xnnpack"
    float_io: bool = True

    def validate(self, where: str = "options") -> None:
        super().validate(where)
        from edgeseg.targets.litert.quantize import RECIPES

        if self.recipe not in RECIPES:
            raise UsageError(f"{where}.recipe: {self.recipe!r} is not one of {', '.join(repr(r) for r in RECIPES)}")


@contextlib.contextmanager
def _restored_environ() -> Iterator[None]:
    """Undo what importing/running litert-torch does to os.environ (added or changed keys), once the export ends."""
    before = dict(os.environ)
    try:
        yield
    finally:
        changed = {k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k)}
        for k in changed:
            if k in before:
                os.environ[k] = before[k]
            else:
                os.environ.pop(k, None)
        if changed:
            log.debug("litert: restored environment variables %s", sorted(changed))


def convert(model) -> bytes:
    """fp32 `.tflite` bytes of an ExportWrapper (eval) at its static example size."""
    import tempfile

    import litert_torch

    try:
        edge = litert_torch.convert(model.eval(), (model.example_input(),))
        with tempfile.TemporaryDirectory(prefix="edgeseg-litert-") as tmp:
            path = Path(tmp) / MODEL_FILE
            edge.export(str(path))
            return path.read_bytes()
    except Exception as e:  # noqa: BLE001 - the vendor tool's failure becomes one line
        raise ArtifactError(f"litert: litert_torch.convert failed: {type(e).__name__}: {one_line(e)}") from e


class LiteRTExporter(Exporter):
    """`.tflite` for the LiteRT Interpreter (XNNPACK CPU delegate): fp32, or int8 through ai-edge-quantizer."""

    name = "litert"
    precisions = ("fp32", "int8")
    Options = LiteRTOptions
    tools = ("litert_torch", "ai_edge_litert", "ai_edge_quantizer", "torch")

    def int8_scheme(self, target: str, options: ExportOptions):
        """ai-edge-quantizer's static int8 arithmetic (either recipe: the recipe picks which ops are int8, not how)."""
        from edgeseg.quant.sensitivity import Int8Scheme

        # ai-edge-quantizer static_wi8_ai8: symmetric narrow-range weights (scale = absmax / 127), asymmetric
        # min/max activations over -128..127 (ai_edge_quantizer/algorithms/uniform_quantize)
        return Int8Scheme(target, "ai-edge-quantizer static_wi8_ai8: int8 symmetric per-channel weights, int8 "
                          "asymmetric per-tensor activations", w_qmin=-127, w_qmax=127, w_div=127.0, per_channel=True,
                          activations="asymmetric", a_qmin=-128, a_qmax=127, options={"recipe": options.recipe})

    def export(self, job: ExportJob) -> ExportResult:
        if job.qat:
            raise UsageError("--target litert: QAT checkpoints are not supported (no QAT scheme); export the float "
                             "checkpoint for post-training int8")
        with _restored_environ():
            return self._export(job)

    def _export(self, job: ExportJob) -> ExportResult:
        from edgeseg.targets.litert.inspection import io_dtypes, op_histogram, op_output_dtypes, read_model, \
            tensor_dtypes, xnnpack_split
        from edgeseg.targets.litert.quantize import quantize

        options = job.options
        with job.stage("litert_torch_convert", "litert_torch.convert"):
            data = convert(job.model)
        quant: dict[str, Any] = {}
        if job.precision == "int8":
            if job.calib is None or not job.calib.inputs:
                raise UsageError("--precision int8: litert needs calibration images")
            policy = export_float_policy(job.model, options)
            with job.stage("ai_edge_quantizer", "ai-edge-quantizer"):
                data, quant = quantize(data, job.calib.numpy(), options.recipe, policy.names,
                                       float_io=options.float_io)
            quant["float_modules"] = policy.to_json()
        (Path(job.out_dir) / MODEL_FILE).write_bytes(data)

        model = read_model(data)
        hist = op_histogram(model)
        inspection: dict[str, Any] = {"converter": "litert_torch.convert (default flags)", "op_histogram": hist,
                                      "tensor_dtypes": tensor_dtypes(model), "io_dtypes": io_dtypes(model)}
        if job.precision == "int8":
            inspection["op_output_dtypes"] = op_output_dtypes(model)
        if job.precision == "int8" and not inspection["tensor_dtypes"].get("INT8"):
            raise ArtifactError(f"{Path(job.out_dir) / MODEL_FILE}: int8 export holds no int8 tensor")
        with job.stage("interpreter_load", "loading the converted model in the LiteRT Interpreter"):
            split = xnnpack_split(data, num_threads=max(1, options.num_threads))
        inspection["xnnpack"] = split
        log.info("litert: timings %s; %d XNNPACK partition(s); off XNNPACK: %s", job.timings,
                 split["partitions"], split["not_delegated"] or "none")
        return ExportResult(files=[MODEL_FILE], fallback_ops=sorted(split["not_delegated"]), executed_here=True,
                            quantization=quant, inspection=inspection)


EXPORTER = LiteRTExporter
