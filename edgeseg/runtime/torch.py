"""Eager PyTorch session: the reference every artifact is compared with. Wraps a checkpoint folder (model.json +
model.safetensors) behind the same `Session` interface as the artifacts (float32 NCHW normalised in, logits out).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.runtime.base import Session


class TorchSession(Session):
    """Runs a checkpoint (or an in-memory model) in eager PyTorch on `device` ("cpu" default).

    Build with `TorchSession.from_checkpoint(path, input_hw=None, device="cpu")` or `TorchSession.from_model(...)`.
    The synthesised manifest has target "torch", float32 NCHW input at input_hw and logits output.
    """

    @classmethod
    def from_checkpoint(cls, path: str | Path, input_hw: tuple[int, int] | None = None,
                        num_threads: int | None = None, device: str = "cpu", **kwargs: Any) -> "TorchSession":
        from edgeseg.checkpoint import load_checkpoint

        model, spec = load_checkpoint(path)
        return cls.from_model(model, spec, path=path, input_hw=input_hw, num_threads=num_threads, device=device)

    @classmethod
    def from_model(cls, model, spec, path: str | Path = ".", input_hw: tuple[int, int] | None = None,
                   num_threads: int | None = None, device: str = "cpu") -> "TorchSession":
        from edgeseg.artifact import Manifest
        from edgeseg.models.wrapper import ExportWrapper

        hw = tuple(int(v) for v in (input_hw or spec.input_hw))
        wrapper = ExportWrapper(model.eval(), hw, spec.mean, spec.std)
        manifest = Manifest(
            target="torch", precision="fp32", model=spec.model, model_file="model.safetensors",
            input=wrapper.input_contract(), output=wrapper.output_contract(spec.num_classes),
            mean=list(spec.mean), std=list(spec.std), class_names=list(spec.class_names),
            palette=[list(c) for c in spec.palette], ignore_index=spec.ignore_index, input_hw=list(hw),
            executed_here=True)
        return cls(path, manifest, num_threads=num_threads, model=wrapper, device=device)

    def _load(self) -> None:
        import torch

        self._model = self.kwargs["model"].to(self.kwargs.get("device", "cpu")).eval()
        self._device = self.kwargs.get("device", "cpu")
        if self.num_threads:
            torch.set_num_threads(int(self.num_threads))

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            y = self._model(torch.from_numpy(x).to(self._device))
        return y.float().cpu().numpy()


SESSION = TorchSession
