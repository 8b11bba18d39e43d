"""Core ML session: `MLModel.predict` on macOS; on other hosts the artifact opens (inspection works) but running it
raises a clear ArtifactError, because the Core ML framework exists only on Apple platforms."""
from __future__ import annotations

import platform
import sys
from typing import Any

import numpy as np

from edgeseg.errors import ArtifactError
from edgeseg.runtime.base import Session


class CoreMLSession(Session):
    """Opens `model.mlpackage`. `executed` is True only where Core ML can run it (macOS).

    kwargs: `compute_units` (a ct.ComputeUnit name; default the manifest's options.compute_units). `num_threads` is
    ignored (Core ML schedules its own threads).
    """

    executed: bool = False

    def _load(self) -> None:
        self.executed = sys.platform == "darwin"
        self.compute_units = self.kwargs.get("compute_units") or (self.manifest.options or {}).get(
            "compute_units", "ALL")
        self._model = None
        if not self.model_path.is_dir():
            raise ArtifactError(f"{self.model_path}: missing .mlpackage folder")
        if not self.executed:
            return
        import coremltools as ct

        try:
            self._model = ct.models.MLModel(str(self.model_path),
                                            compute_units=getattr(ct.ComputeUnit, self.compute_units))
        except Exception as e:  # noqa: BLE001 - runtime failures become one line naming the file
            msg = str(e).strip()
            raise ArtifactError(f"{self.model_path}: Core ML could not load it ({type(e).__name__}: "
                                f"{msg.splitlines()[0] if msg else ''})") from e

    def inspect(self) -> dict[str, Any]:
        """The program's structure (op histogram, weight dtypes, quantized ops); works on every host."""
        from edgeseg.export.coreml import inspect_mlpackage

        return inspect_mlpackage(self.model_path)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if not self.executed:
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
