"""LiteRT session: runs `model.tflite` of the litert target with the LiteRT Interpreter (ai_edge_litert), whose
default op resolver applies the XNNPACK delegate to every op it supports (the rest run on TFLite's builtin kernels).

The model is handed to the Interpreter as the bytes checked against the manifest's sha256 (`model_content`), never
as a path. `num_threads` pins the Interpreter's and the XNNPACK delegate's threads. An artifact with int8 I/O tensors
(exported with `float_io = false`) is fed and read through the tensors' own quantization parameters, so `run` keeps
the manifest's contract (float32 in, float logits out) either way.
"""
from __future__ import annotations

import numpy as np

from edgeseg.errors import ArtifactError, one_line
from edgeseg.runtime.base import Session


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.rint(x / scale) + zero, info.min, info.max).astype(detail["dtype"])


class LiteRTSession(Session):
    """ai_edge_litert Interpreter(model_content=..., num_threads=N), one signature, static batch 1 (a batch runs
    image by image)."""

    def _load(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        from edgeseg.artifact import read_hashed

        self._data = read_hashed(self.path, self.manifest, self.manifest.model_file)  # the Interpreter reads it
        try:
            self._interp = Interpreter(model_content=self._data,
                                       num_threads=int(self.num_threads) if self.num_threads else None)
            self._interp.allocate_tensors()
        except Exception as e:  # noqa: BLE001 - runtime failures become one line naming the file
            raise ArtifactError(f"{self.model_path}: the LiteRT Interpreter could not load it ({type(e).__name__}: "
                                f"{one_line(e)})") from e
        ins, outs = self._interp.get_input_details(), self._interp.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise ArtifactError(f"{self.model_path}: expected one input and one output, found {len(ins)} and "
                                f"{len(outs)}")
        self._in, self._out = ins[0], outs[0]
        self.threads_in_use = int(self.num_threads) if self.num_threads else None

    def _run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] != 1:  # the model is static (batch 1)
            return np.concatenate([self._run(x[i:i + 1]) for i in range(x.shape[0])], 0)
        want = self._in["dtype"]
        if want != x.dtype and np.issubdtype(want, np.integer) and self._in["quantization"][0]:
            x = _quantize(x.astype(np.float32), self._in)
        self._interp.set_tensor(self._in["index"], np.ascontiguousarray(x))
        self._interp.invoke()
        y = self._interp.get_tensor(self._out["index"])
        scale, zero = self._out["quantization"]
        if np.issubdtype(y.dtype, np.integer) and scale and self.output_kind == "logits":
            return (y.astype(np.float32) - zero) * scale
        return np.array(y, copy=True)

    def close(self) -> None:
        self._interp = None
        self._data = None  # after the Interpreter that reads it


SESSION = LiteRTSession


# The device kit's runner (edgeseg/export/device_kit.py): the same Interpreter settings, with only ai-edge-litert
# and numpy (on Android, the same .tflite goes to the LiteRT Interpreter / CompiledModel API with XNNPACK).
RUN_SCRIPT = '''
RUNTIME = "LiteRT"
PACKAGES = ["ai-edge-litert"]  # pip distributions (pinned to the versions in manifest.json's tool_versions)


class Runner:
    """The LiteRT Interpreter (its default XNNPACK delegate), `threads` threads; int8 I/O tensors, if any, are
    fed and read through their own scale and zero point."""

    def __init__(self, here, manifest, threads):
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_path=str(here / manifest["model_file"]), num_threads=threads)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        self.logits = manifest["output"]["kind"] == "logits"

    def __call__(self, x):
        import numpy as np

        scale, zero = self.inp["quantization"]
        if np.issubdtype(self.inp["dtype"], np.integer) and x.dtype != self.inp["dtype"] and scale:
            info = np.iinfo(self.inp["dtype"])
            x = np.clip(np.rint(x / scale) + zero, info.min, info.max).astype(self.inp["dtype"])
        self.interp.set_tensor(self.inp["index"], np.ascontiguousarray(x))
        self.interp.invoke()
        y = self.interp.get_tensor(self.out["index"])
        scale, zero = self.out["quantization"]
        if np.issubdtype(y.dtype, np.integer) and scale and self.logits:
            return (y.astype(np.float32) - zero) * scale
        return np.array(y, copy=True)
'''
