"""OpenVINO session: compiles `model.xml` of the openvino target with `ov.Core` (CPU by default)."""
from __future__ import annotations

import numpy as np

from edgeseg.errors import ArtifactError
from edgeseg.runtime.base import Session


class OpenVINOSession(Session):
    """ov.Core compile + one infer request.

    `num_threads` sets the plugin's INFERENCE_NUM_THREADS. kwargs: `device` (default: the manifest's
    options.device, else "CPU"); `inference_precision` (default "f32", so that an fp32/fp16 IR computes in fp32
    even on CPUs whose default would be bf16; pass None to keep the plugin's default); `config` (extra plugin
    properties).
    """

    def _load(self) -> None:
        import openvino as ov

        self.device = self.kwargs.get("device") or (self.manifest.options or {}).get("device") or "CPU"
        config = dict(self.kwargs.get("config") or {})
        if self.num_threads:
            config["INFERENCE_NUM_THREADS"] = int(self.num_threads)
        precision = self.kwargs.get("inference_precision", "f32")
        if precision and self.device == "CPU":
            config["INFERENCE_PRECISION_HINT"] = precision
        core = ov.Core()
        try:
            model = core.read_model(str(self.model_path))
            self._compiled = core.compile_model(model, self.device, config)
        except Exception as e:  # noqa: BLE001 - runtime failures become one line naming the file
            msg = str(e).strip()
            raise ArtifactError(f"{self.model_path}: OpenVINO could not compile it on {self.device} "
                                f"({type(e).__name__}: {msg.splitlines()[0] if msg else ''})") from e
        self._request = self._compiled.create_infer_request()
        self._output = self._compiled.outputs[0]

    def _run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] != 1:  # the IR is static (batch 1): run a batch image by image
            return np.concatenate([self._run(x[i:i + 1]) for i in range(x.shape[0])], 0)
        res = self._request.infer({0: x})
        return np.array(res[self._output], copy=True)

    def close(self) -> None:
        self._request = None
        self._compiled = None


SESSION = OpenVINOSession
