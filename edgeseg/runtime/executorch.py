"""ExecuTorch session: runs a `.pte` through the ExecuTorch Python runtime (Runtime -> Program -> Method.execute),
with the XNNPACK delegate built into the installed executorch wheel."""
from __future__ import annotations

import numpy as np

from edgeseg.errors import ArtifactError, one_line
from edgeseg.runtime.base import Session

# no per-op profile: the Python runtime times whole XNNPACK delegate calls (executorch 1.5.1)
NO_PROFILE = "ExecuTorch's Python runtime times whole XNNPACK delegate calls, not ops"


class ExecutorchSession(Session):
    """Runs `manifest.model_file` (a .pte). `num_threads` is not settable per session in executorch 1.5.1's
    Python runtime (XNNPACK uses the process-wide threadpool); it is recorded only."""

    def _load(self) -> None:
        from executorch.runtime import Runtime

        try:
            self._runtime = Runtime.get()
            self._program = self._runtime.load_program(str(self.model_path))
            self._method = self._program.load_method("forward")
        except Exception as e:  # noqa: BLE001 - runtime failures become one line naming the file
            raise ArtifactError(f"{self.model_path}: ExecuTorch could not load it ({type(e).__name__}: "
                                f"{one_line(e)})") from e

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        out = self._method.execute([torch.from_numpy(x)])
        return out[0].numpy().copy()

    def close(self) -> None:
        self._method = self._program = None


SESSION = ExecutorchSession
