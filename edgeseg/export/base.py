"""What every target exporter shares: the `Exporter` ABC, `ExportOptions`, the export wrapper model, the
`Manifest` written as `manifest.json` beside an artifact, and `verify_manifest`.

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
import json
import logging
import platform
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeseg.errors import ArtifactError, UsageError
from edgeseg.fileio import sha256_file, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
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


# ----------------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """`manifest.json`: everything needed to run an artifact without guessing from file suffixes.

    `input` = {name, shape, dtype ("float32"|"uint8"), layout ("NCHW"|"NHWC"), normalisation};
    `output` = {name, kind ("logits"|"argmax"), shape, dtype, stride, meaning};
    `sha256` = {relative path: hex digest} for every artifact file except manifest.json;
    `proof` = {images, source, argmax_agreement, max_abs_logit_diff, ...} or None when not run here.
    """

    target: str
    precision: str
    model: str
    model_file: str
    input: dict[str, Any]
    output: dict[str, Any]
    mean: list[float]
    std: list[float]
    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int
    input_hw: list[int]
    files: list[str] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)
    fallback_ops: list[str] | None = None
    calibration: dict[str, Any] | None = None
    quantization: dict[str, Any] = field(default_factory=dict)
    executed_here: bool = False
    not_executed_reason: str | None = None
    proof: dict[str, Any] | None = None
    source_checkpoint: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    inspection: dict[str, Any] = field(default_factory=dict)
    export_seconds: float | None = None
    host: dict[str, str] = field(default_factory=lambda: {"system": platform.system(),
                                                           "machine": platform.machine()})
    format_version: int = MANIFEST_FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = MANIFEST) -> "Manifest":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise ArtifactError(f"{where}: not an edgeseg manifest (missing {', '.join(missing)})")
        return cls(**{k: v for k, v in d.items() if k in names})


def hash_files(out_dir: Path, files: Sequence[str]) -> dict[str, str]:
    """sha256 of every file under each entry of `files` (a file or a folder such as .mlpackage), keyed by path
    relative to out_dir."""
    out_dir = Path(out_dir)
    digests: dict[str, str] = {}
    for rel in files:
        p = out_dir / rel
        if p.is_dir():
            for q in sorted(p.rglob("*")):
                if q.is_file():
                    digests[str(q.relative_to(out_dir))] = sha256_file(q)
        elif p.is_file():
            digests[str(p.relative_to(out_dir))] = sha256_file(p)
        else:
            raise ArtifactError(f"{p}: the exporter listed it but did not write it")
    return digests


def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    """Hash `manifest.files` into `manifest.sha256` and write `out_dir/manifest.json` atomically."""
    manifest.sha256 = hash_files(out_dir, manifest.files)
    path = Path(out_dir) / MANIFEST
    write_json(path, manifest.to_json())
    return path


_INPUT_DTYPES = ("float32", "float16", "uint8")
_LAYOUTS = ("NCHW", "NHWC")
_OUTPUT_KINDS = ("logits", "argmax")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v: Any, n: int = 80) -> str:
    """repr(v) cut to n characters for a one-line message (a deeply nested value does not raise)."""
    try:
        r = repr(v)
    except RecursionError:
        return "<deeply nested value>"
    return r if len(r) <= n else r[:n - 3] + "..."


def _contained_path(root: Path, rel: Any, what: str, where: Path) -> Path:
    """`root / rel` for a manifest path `rel`; ArtifactError (one line) unless it is a non-empty relative str that
    resolves inside `root` (symlinks followed)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ArtifactError(f"{where}: {what} {_short(rel)} is not a file path")
    if Path(rel).is_absolute() or rel.startswith(("/", "\\")):
        raise ArtifactError(f"{where}: {what} {_short(rel)} is an absolute path; paths must be relative to the "
                            "artifact folder")
    try:
        base = root.resolve()
        full = (root / rel).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"{where}: {what} {_short(rel)} cannot be resolved ({e})") from None
    if full == base:
        raise ArtifactError(f"{where}: {what} {_short(rel)} names the artifact folder itself, not a file in it")
    if not full.is_relative_to(base):
        raise ArtifactError(f"{where}: {what} {_short(rel)} resolves outside the artifact folder {root}")
    return root / rel


def _check_manifest(m: Manifest, artifact_dir: Path, where: Path) -> None:
    """Types and paths of the fields the runtime uses; ArtifactError (one line naming `where`) on the first
    problem. Every path must stay inside `artifact_dir`, and `model_file` must be covered by `sha256` so that
    open_session never loads an unhashed file."""
    def bad(msg: str) -> ArtifactError:
        return ArtifactError(f"{where}: {msg}")

    for k in ("target", "precision", "model"):
        if not isinstance(getattr(m, k), str) or not getattr(m, k):
            raise bad(f"{k} must be a non-empty string, got {_short(getattr(m, k))}")
    if not isinstance(m.sha256, dict) or not m.sha256:
        raise bad(f"sha256 must be a non-empty {{path: hex digest}} object, got {_short(m.sha256)}")
    for rel, digest in m.sha256.items():
        _contained_path(artifact_dir, rel, "sha256 path", where)
        if not isinstance(digest, str) or not digest:
            raise bad(f"sha256[{_short(rel)}] must be a hex digest string, got {_short(digest)}")
    if not isinstance(m.model_file, str):
        raise bad(f"model_file must be a string, got {_short(m.model_file)}")
    _contained_path(artifact_dir, m.model_file, "model_file", where)
    folder = m.model_file.rstrip("/") + "/"
    if m.model_file not in m.sha256 and not any(k.startswith(folder) for k in m.sha256):
        raise bad(f"model_file {_short(m.model_file)} is not covered by sha256 (neither a hashed file nor a "
                  "folder of hashed files)")
    for name, contract, keys in (("input", m.input, ("name", "shape", "dtype", "layout")),
                                 ("output", m.output, ("name", "kind", "shape", "dtype"))):
        if not isinstance(contract, dict):
            raise bad(f"{name} must be an object, got {_short(contract)}")
        missing = [k for k in keys if k not in contract]
        if missing:
            raise bad(f"{name} lacks {', '.join(missing)}")
        if not isinstance(contract["name"], str):
            raise bad(f"{name}.name must be a string, got {_short(contract['name'])}")
        shape = contract["shape"]
        if not isinstance(shape, list) or not shape or not all(_is_int(v) and v >= 0 for v in shape):
            raise bad(f"{name}.shape must be a list of non-negative integers, got {_short(shape)}")
        if contract["dtype"] not in _INPUT_DTYPES:
            raise bad(f"{name}.dtype {_short(contract['dtype'])} is not one of {', '.join(_INPUT_DTYPES)}")
    if m.input["layout"] not in _LAYOUTS:
        raise bad(f"input.layout {_short(m.input['layout'])} is not one of {', '.join(_LAYOUTS)}")
    if m.output["kind"] not in _OUTPUT_KINDS:
        raise bad(f"output.kind {_short(m.output['kind'])} is not one of {', '.join(_OUTPUT_KINDS)}")
    if not isinstance(m.input_hw, list) or len(m.input_hw) != 2 or not all(_is_int(v) and v > 0 for v in m.input_hw):
        raise bad(f"input_hw must be [height, width] (positive integers), got {_short(m.input_hw)}")
    for k in ("mean", "std"):
        v = getattr(m, k)
        if not isinstance(v, list) or len(v) != 3 or not all(_is_number(x) for x in v):
            raise bad(f"{k} must be a list of 3 numbers, got {_short(v)}")
    if not isinstance(m.class_names, list) or not all(isinstance(c, str) for c in m.class_names):
        raise bad(f"class_names must be a list of strings, got {_short(m.class_names)}")
    if not isinstance(m.palette, list):
        raise bad(f"palette must be a list of RGB triples, got {_short(m.palette)}")
    if not _is_int(m.ignore_index):
        raise bad(f"ignore_index must be an integer, got {_short(m.ignore_index)}")
    if not isinstance(m.executed_here, bool):
        raise bad(f"executed_here must be true/false, got {_short(m.executed_here)}")


def read_manifest(artifact_dir: str | Path) -> Manifest:
    """Parse `artifact_dir/manifest.json` and check its fields' types and paths (no hash check; see
    verify_manifest).

    Raises:
        ArtifactError (one line naming the manifest) for a missing, unparsable or malformed manifest: fields of
        the wrong type, a path that is absolute or resolves outside the folder, a model_file sha256 does not cover.
    """
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; not an edgeseg artifact folder")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ArtifactError(f"{path}: not an edgeseg manifest (JSON nested too deeply)") from None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise ArtifactError(f"{path}: not an edgeseg manifest")
    m = Manifest.from_json(d, str(path))
    _check_manifest(m, artifact_dir, path)
    return m


def verify_manifest(artifact_dir: str | Path) -> Manifest:
    """Read the manifest (read_manifest: types and paths checked) and check every listed file exists and matches
    its sha256.

    Raises:
        ArtifactError naming the malformed manifest or the first missing or changed file.
    """
    artifact_dir = Path(artifact_dir)
    m = read_manifest(artifact_dir)
    for rel, digest in m.sha256.items():
        p = artifact_dir / rel
        if not p.is_file():
            raise ArtifactError(f"{p}: listed in {MANIFEST} but missing")
        if sha256_file(p) != digest:
            raise ArtifactError(f"{p}: sha256 does not match {MANIFEST} (file changed or corrupted)")
    return m
