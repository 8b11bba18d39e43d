"""What every target exporter shares: the `Exporter` ABC, `ExportOptions`, the export wrapper model. The
`Manifest` written as `manifest.json` beside an artifact lives in `edgeseg.artifact` (re-exported here).

Adding a target (see docs/DESIGN.md): `edgeseg/export/<module>.py` defines an `Exporter` subclass and sets the
module attribute `EXPORTER = <that class>`; `edgeseg/runtime/<module>.py` defines a `Session` subclass and sets
`SESSION = <that class>`; one row in `edgeseg.export.TARGETS`; one profile `export_targets/<name>.toml`.

Contract of `Exporter.export` (called by `edgeseg.export.export_checkpoint`, never by the CLI directly):
  * `model` is an `ExportWrapper` in eval mode, already passed through `edgeseg.models.prepare_for_export`.
    Its forward takes exactly the manifest's input (`model.example_input()` gives one, a torch tensor) and
    returns the manifest's output. Export `model` as is; do not unwrap it.
  * `calib_data` is `None` for fp32/fp16, and for int8 a `CalibrationData` whose `.inputs` are torch tensors
    already in the wrapper's input contract (feed them to the model/quantizer as they are).
  * Write every artifact file into `out_dir` (a temporary folder that is renamed into place only when the whole
    export, manifest and proof succeeded; do not write anywhere else). Return an `ExportResult`.
  * Raise `edgeseg.errors.UsageError` for an unsupported precision/option and `ArtifactError` when the
    vendor tool fails, with one line naming the target and the cause.

Must not import heavy runtimes (executorch, onnxruntime, openvino, coremltools, tensorrt) at module level.
"""
from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# the artifact format (edgeseg.artifact); re-exported here for the exporters that write it
from edgeseg.artifact import (MANIFEST, MANIFEST_FORMAT_VERSION, Manifest, hash_files,  # noqa: F401
                              read_manifest, verify_manifest, write_manifest)
from edgeseg.errors import UsageError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
INPUT_NAME = "image"
OUTPUT_LOGITS = "logits"
OUTPUT_ARGMAX = "class_map"


# ----------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ExportOptions:
    """Options every exporter understands. A target subclasses this (`@dataclass class Options(ExportOptions)`)
    to add its own fields; the profile's `[options]` table and `export_checkpoint(**options)` are checked against
    the fields, and an unknown key is a UsageError that names it.

    Attributes:
        input_dtype: "float32" (normalised (N,3,H,W) input) or "uint8" (raw RGB 0..255, normalisation in graph).
        input_layout: "NCHW" or "NHWC" (layout of the artifact's input tensor).
        output: "logits" ((N,K,H/s,W/s) float logits) or "argmax" ((N,H,W) uint8 class map at input size).
        calib_count: how many calibration images an int8 export uses (at most).
        proof_images: how many images the fp32 proof runs through the artifact.
        num_threads: CPU threads a runtime may use when the proof runs the artifact here.
        keep_float: int8: module-name patterns (fnmatch over the model's module names, "!pattern" removes a
            default) kept in float on top of the float policy's defaults (edgeseg.quant.policy).
        float_defaults: int8: keep the policy's default float modules (NMF2D, OffsetLearning, AFM) in float.
    """

    input_dtype: str = "float32"
    input_layout: str = "NCHW"
    output: str = "logits"
    calib_count: int = 16
    proof_images: int = 4
    num_threads: int = 1
    keep_float: list = dataclasses.field(default_factory=list)
    float_defaults: bool = True

    _CHOICES: ClassVar[dict[str, tuple]] = {
        "input_dtype": ("float32", "uint8"),
        "input_layout": ("NCHW", "NHWC"),
        "output": ("logits", "argmax"),
    }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "options") -> "ExportOptions":
        """Build from a dict (profile `[options]` merged with overrides). Unknown keys and bad values raise
        UsageError naming `where.key`."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        for k in d:
            if k not in names:
                raise UsageError(f"{where}.{k}: unknown option for {cls.__module__}.{cls.__qualname__}; "
                                 f"known: {', '.join(sorted(names))}")
        opts = cls(**d)
        opts.validate(where)
        return opts

    def validate(self, where: str = "options") -> None:
        for k, choices in self._CHOICES.items():
            v = getattr(self, k, None)
            if v is not None and v not in choices:
                raise UsageError(f"{where}.{k}: {v!r} is not one of {', '.join(map(str, choices))}")
        for f in dataclasses.fields(self):
            default = f.default if f.default is not dataclasses.MISSING else None
            v = getattr(self, f.name)
            if isinstance(default, bool) and not isinstance(v, bool):
                raise UsageError(f"{where}.{f.name}: expected true/false, got {v!r}")
            if isinstance(default, int) and not isinstance(default, bool) and (
                    not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise UsageError(f"{where}.{f.name}: expected a non-negative integer, got {v!r}")
        kf = getattr(self, "keep_float", [])
        if isinstance(kf, str) or not all(isinstance(p, str) for p in kf):
            raise UsageError(f"{where}.keep_float: expected a list of module-name patterns, got {kf!r}")
        self.keep_float = list(kf)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def export_float_policy(wrapper: nn.Module, options: ExportOptions):
    """The int8 float policy (edgeseg.quant.policy.FloatPolicy) of an ExportWrapper's model, with module names as
    the wrapper sees them ("model.<name>"), from the options' `keep_float` / `float_defaults`."""
    from edgeseg.quant.policy import float_policy

    inner = getattr(wrapper, "model", wrapper)
    prefix = "model." if inner is not wrapper else ""
    return float_policy(inner, tuple(getattr(options, "keep_float", ()) or ()),
                        defaults=getattr(options, "float_defaults", True), prefix=prefix)


# ----------------------------------------------------------------------------------------------------------------
# Export wrapper: optional in-graph pre/post-processing around a model
# ----------------------------------------------------------------------------------------------------------------
class ExportWrapper(nn.Module):
    """The module that is exported: the model plus optional in-graph pre/post-processing.

    Input (manifest `input`):
        input_dtype "float32": normalised float32 image, NCHW (N,3,H,W) or NHWC (N,H,W,3).
        input_dtype "uint8": raw RGB uint8 0..255, NCHW or NHWC; `(x - mean) / std` happens in the graph.
    Output (manifest `output`):
        "logits": (N,K,H/s,W/s) float32 logits, s = model.output_stride.
        "argmax": (N,H,W) uint8 class map at the input resolution (bilinear upsample of logits, then argmax).
    """

    def __init__(self, model: nn.Module, input_hw: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 input_dtype: str = "float32", input_layout: str = "NCHW", output: str = "logits"):
        super().__init__()
        self.model = model
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.input_dtype = input_dtype
        self.input_layout = input_layout
        self.output = output
        self.output_stride = int(getattr(model, "output_stride", 1))
        # 1/std folded into a multiply: one Sub + one Mul in the graph.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        if self.input_dtype == "uint8":
            x = (x.to(torch.float32) - self.mean) * self.inv_std
        y = self.model(x)
        if self.output == "argmax":
            if tuple(y.shape[-2:]) != self.input_hw:
                y = F.interpolate(y, size=self.input_hw, mode="bilinear", align_corners=False)
            y = y.argmax(dim=1).to(torch.uint8)
        return y

    # -- the input/output contract, as recorded in the manifest --------------------------------------------------
    def input_shape(self, batch: int = 1) -> list[int]:
        h, w = self.input_hw
        return [batch, 3, h, w] if self.input_layout == "NCHW" else [batch, h, w, 3]

    def input_contract(self) -> dict[str, Any]:
        return {"name": INPUT_NAME, "shape": self.input_shape(1), "dtype": self.input_dtype,
                "layout": self.input_layout,
                "normalisation": "in graph: (x - mean) / std" if self.input_dtype == "uint8" else
                "by the caller: (x - mean) / std on the 0..255 RGB scale"}

    def output_contract(self, num_classes: int) -> dict[str, Any]:
        h, w = self.input_hw
        if self.output == "argmax":
            return {"name": OUTPUT_ARGMAX, "kind": "argmax", "shape": [1, h, w], "dtype": "uint8", "stride": 1,
                    "meaning": "class index per pixel at input resolution (argmax of bilinearly upsampled logits)"}
        s = self.output_stride
        return {"name": OUTPUT_LOGITS, "kind": "logits", "shape": [1, num_classes, h // s, w // s],
                "dtype": "float32", "stride": s, "meaning": f"class logits at stride {s}"}

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A deterministic input in the contract (normalised-like floats, or uint8 pixels)."""
        g = torch.Generator().manual_seed(seed)
        shape = self.input_shape(batch)
        if self.input_dtype == "uint8":
            return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        return torch.randn(shape, generator=g, dtype=torch.float32)

    def make_input(self, images_uint8: np.ndarray) -> torch.Tensor:
        """Turn a batch of RGB uint8 images (N,H,W,3) already at input_hw into the wrapper's input tensor."""
        x = torch.from_numpy(np.ascontiguousarray(images_uint8))
        if x.ndim == 3:
            x = x[None]
        if tuple(x.shape[1:3]) != self.input_hw:
            raise UsageError(f"calibration/proof image of size {tuple(x.shape[1:3])}; expected {self.input_hw}")
        x = x.permute(0, 3, 1, 2).contiguous()  # NCHW uint8
        if self.input_dtype == "float32":
            x = (x.to(torch.float32) - self.mean) * self.inv_std
        if self.input_layout == "NHWC":
            x = x.permute(0, 2, 3, 1).contiguous()
        return x


# ----------------------------------------------------------------------------------------------------------------
# Calibration data and the exporter's result
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CalibrationData:
    """Calibration inputs for an int8 export.

    Attributes:
        inputs: list of torch tensors, each (1, ...) in the ExportWrapper's input contract.
        info: what goes into the manifest's `calibration` entry (source, count, class coverage, ...).
    """

    inputs: list[torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    def numpy(self) -> list[np.ndarray]:
        return [t.detach().cpu().numpy() for t in self.inputs]


@dataclass
class ExportResult:
    """What an exporter returns.

    Attributes:
        files: artifact files/folders written, relative to out_dir (e.g. ["model.pte"]). The first one is the
            model file the runtime opens (manifest `model_file`).
        fallback_ops: ops that stay off the target's accelerator (e.g. ["aten.grid_sampler_2d.default"]);
            an empty list means everything was delegated; None means the exporter cannot tell.
        executed_here: whether this host can run the artifact (the proof then runs it).
        not_executed_reason: when executed_here is False, one line saying why (e.g. "Core ML needs macOS").
        quantization: how int8 was done (scheme, quantizer, per-channel, ...); empty for float.
        inspection: target-specific facts about the artifact (op histogram, delegated node count, timings...).
        tool_versions: versions of the tools this exporter used, name -> version.
    """

    files: list[str]
    fallback_ops: list[str] | None = None
    executed_here: bool = True
    not_executed_reason: str | None = None
    quantization: dict[str, Any] = field(default_factory=dict)
    inspection: dict[str, Any] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Exporter ABC
# ----------------------------------------------------------------------------------------------------------------
class Exporter(ABC):
    """One deployable target's conversion. Subclass per target; set `name`, `precisions`, `Options`.

    Class attributes:
        name: the exporter module name (== the profile's `exporter` key), e.g. "executorch".
        precisions: precisions this exporter can produce; a profile may list a subset.
        Options: the ExportOptions subclass holding this target's options.
        tools: python distribution names whose versions go into the manifest (e.g. ("executorch", "torch")).
    """

    name: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    Options: ClassVar[type[ExportOptions]] = ExportOptions
    tools: ClassVar[tuple[str, ...]] = ("torch",)

    def check_environment(self) -> list[str]:
        """Return what is missing to export (and run) this target here, one human-readable item each, e.g.
        ["python package 'onnxruntime'"]. An empty list means ready. Tests skip with this as the reason."""
        from edgeseg.extras import extra_for

        return [f"python package {m!r}" + (f" (pip install 'edgeseg[{extra_for(m)}]')" if extra_for(m) else "")
                for m in self.tools if not _has_distribution(m)]

    @abstractmethod
    def export(self, model: "ExportWrapper", spec, precision: str, input_hw: tuple[int, int],
               calib_data: CalibrationData | None, out_dir: Path, options: ExportOptions) -> ExportResult:
        """Convert `model` (an ExportWrapper, eval mode) to the target's artifact files in `out_dir`.

        Args:
            model: the wrapper to export; `model.example_input()` is a valid input.
            spec: the checkpoint's ModelSpec (class names, mean/std...).
            precision: one of `self.precisions` ("fp32" | "fp16" | "int8").
            input_hw: static (H, W) of the export.
            calib_data: CalibrationData for int8, else None.
            out_dir: temporary artifact folder (exists, empty).
            options: an instance of `self.Options`.
        Returns:
            ExportResult.
        """

    def quantizer(self, options: ExportOptions | None = None) -> Any:
        """The target's int8 quantizer object for PT2E flows (PTQ and QAT), or None if the target quantizes
        some other way (e.g. ONNX Runtime's quantize_static) or has no int8."""
        return None

    def fallback_ops(self, lowered: Any) -> list[str] | None:
        """Ops of a converted program that do not run on the target's accelerator; None if unknown."""
        return None

    def tool_versions(self) -> dict[str, str]:
        return {m: _distribution_version(m) for m in self.tools}


def _has_distribution(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a broken or blocked install counts as missing
        return False


def _distribution_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
