"""ONNX Runtime session (CPU execution provider): runs `model.onnx` of the onnx and jetson-tensorrt targets."""
from __future__ import annotations

import numpy as np

from edgeseg.errors import ArtifactError
from edgeseg.runtime.base import Session


class OnnxSession(Session):
    """ORT CPU session. `num_threads` sets intra_op_num_threads; kwargs: `optimize=False` disables graph
    optimisations (QDQ then runs as dequantize -> float op -> quantize, the reference arithmetic).

    The jetson-tensorrt int8 ONNX defaults to `optimize=False`: its symmetric full-range int8 weights are what
    TensorRT computes exactly (int32 accumulation), but ORT's fused x86 kernels on CPUs without VNNI saturate
    u8xs8 pair sums on them (measured on the shipped OffSeg-T: 93.98 % argmax agreement with fused kernels,
    99.07 % with the reference arithmetic). So the host check emulates TensorRT's arithmetic instead of judging
    the artifact by a CPU kernel that the Jetson never runs; the record's notes say so.
    """

    def _default_optimize(self) -> bool:
        return not (self.manifest.target == "jetson-tensorrt" and self.manifest.precision == "int8")

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
        try:
            self._sess = ort.InferenceSession(str(self.model_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - runtime failures become one line naming the file
            raise ArtifactError(f"{self.model_path}: ONNX Runtime could not load it ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        self._input = self._sess.get_inputs()[0].name

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._sess.run(None, {self._input: x})[0]

    def close(self) -> None:
        self._sess = None


SESSION = OnnxSession
