"""ONNX Runtime session (CPU execution provider): runs `model.onnx` of the onnx and jetson-tensorrt targets."""
from __future__ import annotations

import numpy as np

from edgeseg.errors import ArtifactError
from edgeseg.runtime.base import Session


class OnnxSession(Session):
    """ORT CPU session. `num_threads` sets intra_op_num_threads; kwargs: `optimize=False` disables graph
    optimisations (QDQ then runs as dequantize -> float op -> quantize, the reference arithmetic)."""

    def _load(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.num_threads:
            so.intra_op_num_threads = int(self.num_threads)
            so.inter_op_num_threads = 1
        if self.kwargs.get("optimize", True) is False:
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
