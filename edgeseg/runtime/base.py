"""The `Session` ABC: run an artifact (or a checkpoint, for the eager reference) through its manifest's contract.

A target package's runtime module `edgeseg/targets/<package>/session.py` subclasses `Session`, implements `_load()` and `_run()`, and sets
the module attribute `SESSION = <its class>`. `edgeseg.runtime.open_session` picks it by the manifest's target.
Heavy runtimes are imported inside `_load`, never at module level.
"""
from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.errors import ArtifactError, UsageError

log = logging.getLogger(__name__)

_NP_DTYPES = {"float32": np.float32, "uint8": np.uint8, "float16": np.float16}


# op-profile markers (edgeseg.eval.profile): time of ops a runtime inserted itself, and of ops without a module path
INSERTED = "(runtime-inserted)"
UNKNOWN = "(no module path)"
RT_INFO_KEY = "edgeseg_module"  # the module path an exporter stores on each op (OpenVINO rt_info)


class Session(ABC):
    """An opened artifact. Use as a context manager (`with open_session(path) as s: ...`).

    Subclasses implement:
        _load(self): open the model file `self.model_path` (called once by __init__).
        _run(self, x: np.ndarray) -> np.ndarray: run one batch already in the manifest's input contract and return
            the single output as numpy (logits (N,K,h,w) float32, or (N,H,W) uint8 class map).
        close(self): optional, free the runtime.

    Attributes:
        manifest: the artifact's Manifest (for a checkpoint, a Manifest synthesised from model.json).
        path: the artifact (or checkpoint) folder.
        num_threads: CPU threads the runtime may use (None = runtime default).
        notes: lines for the validation record about how this host runs the artifact (set by `_load`).
        executes_here: whether this host runs the model (property; False only where the runtime cannot).
        float_compute: what the runtime computes the float parts in here, "fp32" unless `_load` says otherwise
            (OpenVINO's bf16 inference precision): the proof's agreement floor and the bench records follow it.
    """

    float_compute = "fp32"

    def __init__(self, path: str | Path, manifest, num_threads: int | None = None, **kwargs: Any):
        self.path = Path(path)
        self.manifest = manifest
        self.num_threads = num_threads
        self.kwargs = kwargs
        self.notes: list[str] = []
        self._load()
        if threading.current_thread() is threading.main_thread():
            from edgeseg.sigstack import ensure_signal_stack

            ensure_signal_stack()  # a runtime may have installed a stack it later frees (edgeseg/sigstack.py)
        self.notes += full_range_int8_notes(getattr(manifest, "quantization", None) or {})

    # -- to implement ------------------------------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Open the runtime on `self.model_path`."""

    @abstractmethod
    def _run(self, x: np.ndarray) -> np.ndarray:
        """Run one input batch (already checked) and return the output array."""

    def close(self) -> None:
        """Release the runtime (optional)."""

    # -- shared ------------------------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.manifest.input_hw[0]), int(self.manifest.input_hw[1])

    @property
    def executes_here(self) -> bool:
        """Whether this session really runs the model on this host: the runtime's own ability here (a Core ML
        session off macOS overrides this to False and raises from `_run`). The manifest's `executed_here` is what
        the exporting host could do; validate and bench read it only to decide whether to open the artifact."""
        return True

    @property
    def why_not_here(self) -> str | None:
        """Why this host cannot execute the model, in one line (None where it can): what a command says instead of
        running it."""
        if self.executes_here:
            return None
        import platform

        return f"{self.manifest.target} artifacts cannot run on {platform.system()}"

    @property
    def output_kind(self) -> str:
        """"logits" or "argmax"."""
        return self.manifest.output["kind"]

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Check `x` against the manifest's input (shape except batch, dtype); raise UsageError naming both."""
        inp = self.manifest.input
        want_dtype = _NP_DTYPES[inp["dtype"]]
        want = tuple(inp["shape"])
        x = np.asarray(x)
        if x.ndim != len(want) or tuple(x.shape[1:]) != want[1:] or x.dtype != want_dtype:
            raise UsageError(
                f"{self.path}: input must be {inp['dtype']} {inp['layout']} shape (N,{','.join(map(str, want[1:]))}),"
                f" got {x.dtype} shape {tuple(x.shape)}")
        return np.ascontiguousarray(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Feed `x` exactly as the manifest's input contract says; return the output as numpy."""
        return np.asarray(self._run(self.check_input(x)))

    def to_input(self, x_normalised: np.ndarray) -> np.ndarray:
        """Turn normalised float32 NCHW into the artifact's input (transpose; de-normalise and round to uint8 for
        artifacts that normalise in graph, which is lossy by up to half a grey level)."""
        inp = self.manifest.input
        x = np.asarray(x_normalised, dtype=np.float32)
        if inp["dtype"] == "uint8":
            mean = np.asarray(self.manifest.mean, np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(self.manifest.std, np.float32).reshape(1, 3, 1, 1)
            x = np.clip(np.rint(x * std + mean), 0, 255).astype(np.uint8)
        if inp["layout"] == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x)

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        """(N,3,H,W) float32 normalised -> (N,K,h,w) float32 logits. For logits artifacts only."""
        if self.output_kind != "logits":
            raise ArtifactError(f"{self.path}: this artifact outputs an argmax class map, not logits "
                                "(export with output = \"logits\" to evaluate logits)")
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1] != 3:
            raise UsageError(f"{self.path}: predict_logits expects float32 (N,3,H,W), got shape {x.shape}")
        return np.asarray(self.run(self.to_input(x)), dtype=np.float32)

    def input_for(self, image_rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 (H,W,3) image of any size -> the batch of one that `run` takes, as the manifest says: bilinear
        resize to input_hw, then normalised on the host (float32 input) or raw uint8 for an in-graph normaliser,
        in the manifest's layout."""
        import cv2

        img = np.asarray(image_rgb)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise UsageError(f"segment: expected an RGB uint8 (H,W,3) image, got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        ih, iw = self.input_hw
        small = img if (h, w) == (ih, iw) else cv2.resize(img, (iw, ih), interpolation=cv2.INTER_LINEAR)
        inp = self.manifest.input
        if inp["dtype"] == "uint8":
            x = small[None]
            x = x if inp["layout"] == "NHWC" else x.transpose(0, 3, 1, 2)
        else:
            mean = np.asarray(self.manifest.mean, np.float32)
            std = np.asarray(self.manifest.std, np.float32)
            x = ((small.astype(np.float32) - mean) / std)[None]
            x = x if inp["layout"] == "NHWC" else x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=_NP_DTYPES[inp["dtype"]])

    def segment(self, image_rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 (H,W,3) image of any size -> (H,W) uint8 class map at the image's size.

        Preprocessing follows the manifest (`input_for`): bilinear resize to input_hw, then normalise on the host or
        feed uint8 to an in-graph normaliser; logits are bilinearly upsampled to the image size before argmax.
        """
        import cv2

        x = self.input_for(image_rgb)
        h, w = np.asarray(image_rgb).shape[:2]
        y = self.run(x)[0]
        if self.output_kind == "argmax":
            cmap = y.astype(np.uint8)
            if cmap.shape != (h, w):
                cmap = cv2.resize(cmap, (w, h), interpolation=cv2.INTER_NEAREST)
            return cmap
        import torch
        import torch.nn.functional as F

        logits = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))[None]
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits[0].argmax(0).numpy().astype(np.uint8)


def artifact_of(model_path: str | Path) -> tuple[Path, Any]:
    """(artifact folder, its checked manifest) for the model file of an artifact (the per-op profilers take the
    model file's path, then read it through `edgeseg.artifact.read_hashed` like a session does).

    Raises:
        ArtifactError: `model_path` is not the model file of the artifact folder it is in.
    """
    from edgeseg.artifact import MANIFEST, read_manifest

    model_path = Path(model_path)
    root = model_path.parent
    if not (root / MANIFEST).is_file():
        raise ArtifactError(f"{model_path}: not in an artifact folder ({MANIFEST} beside it); only artifacts run")
    manifest = read_manifest(root)
    if manifest.model_file != model_path.name:
        raise ArtifactError(f"{model_path}: not the model file of {root / MANIFEST} ({manifest.model_file!r})")
    return root, manifest


def full_range_int8_notes(quant: dict[str, Any]) -> list[str]:
    """A note when an int8 artifact with full 8-bit weights (exported on a VNNI/AMX CPU, or set so explicitly) runs
    on a CPU whose u8 x s8 kernels saturate with them (x86 AVX2 without VNNI): its accuracy here is not the
    exporting host's."""
    from edgeseg.cpu import host_cpu

    full_range = quant.get("reduce_range") is False or quant.get("overflow_fix") in ("disable", "first_layer_only")
    cpu = host_cpu()
    if not (full_range and cpu.int8_saturates):
        return []
    return [f"int8 weights use the full 8-bit range, but this CPU ({cpu.summary()}) saturates u8 x s8 sums with "
            "them; re-export here (reduce_range / overflow_fix \"auto\") for this CPU"]
