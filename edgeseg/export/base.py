"""What every target exporter shares: the `Exporter` ABC, `ExportOptions`, the export wrapper model. The
`Manifest` written as `manifest.json` beside an artifact lives in `edgeseg.artifact` (re-exported here).

Adding a target: its profile `export_targets/<name>.toml` (the single record of the target: exporter, runtime, thread
control, QAT scheme, options; read by edgeseg.targets) and its package `edgeseg/targets/<package>/`: `exporter.py`
defining an `Exporter` subclass and `EXPORTER = <that class>`, `session.py` defining a `Session` subclass and
`SESSION = <that class>`, plus what else the target needs (quantize.py, passes.py, inspection.py). Tests are
parametrised over the profiles that can run here.

Contract of `Exporter.export(job)` (called by `edgeseg.export.export_checkpoint`, never by the CLI directly):
  * `job.model` is an `ExportWrapper` in eval mode, already passed through `edgeseg.models.prepare_for_export`
    (or, when `job.qat` is set, the converted int8 graph of a QAT checkpoint with its learned scales: export it
    without PTQ; `job.qat` is that checkpoint's `quant` record). Its forward takes exactly the manifest's input
    (`model.example_input()` gives one, a torch tensor) and returns the manifest's output. Export it as is.
  * `job.calib` is `None` for fp32/fp16 and QAT, and for int8 PTQ a `CalibrationData` whose `.inputs` are torch
    tensors already in the wrapper's input contract (feed them to the model/quantizer as they are).
  * Write every artifact file into `job.out_dir` (a temporary folder that is renamed into place only when the whole
    export, manifest and proof succeeded; do not write anywhere else). Return an `ExportResult`.
  * Run each step of a vendor tool inside `with job.stage(name, tool):` (`ExportJob.stage`): it is timed into the
    manifest's `inspection.timings_s` and the tool's failure becomes one ArtifactError line naming the target and
    the tool. Raise `edgeseg.errors.UsageError` for an unsupported precision/option and `ArtifactError` for an
    artifact that is not what was asked (e.g. an int8 export with no quantize op), one line each.

Must not import heavy runtimes (the vendor tools) at module level.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn as nn

# the artifact format (edgeseg.artifact); re-exported here for the exporters that write it
from edgeseg.artifact import (  # noqa: F401
    MANIFEST,
    MANIFEST_FORMAT_VERSION,
    Manifest,
    hash_files,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from edgeseg.errors import ArtifactError, EdgesegError, UsageError, one_line

# the deployed model's I/O contract and the int8 calibration inputs live beside their users; re-exported here
from edgeseg.models.wrapper import INPUT_NAME, OUTPUT_ARGMAX, OUTPUT_LOGITS, ExportWrapper  # noqa: F401
from edgeseg.quant.calibration import CalibrationData  # noqa: F401
from edgeseg.targets import IO_CHOICES, PRECISIONS  # noqa: F401

if TYPE_CHECKING:
    from edgeseg.quant.sensitivity import Int8Scheme

log = logging.getLogger(__name__)



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

    _CHOICES: ClassVar[dict[str, tuple]] = IO_CHOICES

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
# The exporter's result
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ExportJob:
    """What `Exporter.export` converts (see the module docstring for the contract)."""

    model: nn.Module                      # the ExportWrapper (or a QAT checkpoint's converted int8 graph in one)
    spec: Any                             # the checkpoint's ModelSpec (class names, mean/std, ...)
    precision: str                        # one of the exporter's precisions, allowed by the profile
    input_hw: tuple[int, int]             # static (H, W) of the export
    out_dir: Path                         # temporary artifact folder (exists, empty)
    options: ExportOptions                # an instance of the exporter's `Options`
    calib: CalibrationData | None = None  # int8 PTQ only
    qat: dict[str, Any] | None = None     # int8 from a QAT checkpoint: its `quant` record
    target: str = ""                      # the target's name, for messages
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (`stage`), into the manifest

    @contextlib.contextmanager
    def stage(self, name: str, tool: str | None = None):
        """One named stage of the export, what every exporter wraps its steps in (`with job.stage("convert",
        "ov.convert_model"): ...`): its seconds go to `timings` (the manifest's `inspection.timings_s`), and an
        exception of the tool inside becomes one ArtifactError line naming the target and the tool, "<target>:
        <tool> failed: <Type>: <first line>" (the whole exception stays chained for --debug). edgeseg's own
        errors pass as they are. The tool's chatter already goes to the vendor log: export_checkpoint runs the
        whole export inside it."""
        t = time.perf_counter()
        try:
            yield
        except EdgesegError:
            raise
        except Exception as e:  # noqa: BLE001 - the vendor tool's failure becomes one line
            raise ArtifactError(f"{self.target or 'export'}: {tool or name} failed: "
                                f"{one_line(e, with_type=True)}") from e
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t, 2)


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
    def export(self, job: "ExportJob") -> ExportResult:
        """Convert `job.model` (an ExportWrapper, eval mode) to the target's artifact files in `job.out_dir`.

        The precision and options are already checked against this exporter (profile, `Options`); a target-
        specific impossibility raises UsageError, a vendor failure ArtifactError, each one line."""

    def quantizer(self, options: ExportOptions | None = None, is_qat: bool = False) -> Any:
        """The target's PT2E int8 quantizer: the one source of PT2E quantizers for PTQ and QAT
        (`edgeseg.export.qat_quantizers.target_quantizer` asks it for the scheme of the profile's `[qat]` table).

        Where the exporter's PTQ is PT2E (ExecuTorch, Core ML W8A8) it is the quantizer that PTQ uses; where PTQ
        goes another way (ONNX Runtime's quantize_static, NNCF on the OpenVINO model) it is the scheme QAT trains
        for, whose converted graph the exporter takes as is. `is_qat`: fake quants for training in place of
        observers. `options.per_channel`, where set, picks per-channel weight scales (default True). None: the
        target has no PT2E scheme."""
        return None

    def qat_graph_passes(self) -> list:
        """Rewrites `edgeseg.train.qat.prepare_qat` applies to the exported training graph (a torch.fx.GraphModule)
        before it inserts this target's fake quants, each a callable taking the graph; they must keep its
        outputs exact. Import nothing heavy."""
        return []

    def fallback_ops(self, lowered: Any) -> list[str] | None:
        """Ops of a converted program that do not run on the target's accelerator; None if unknown."""
        return None

    def int8_scheme(self, target: str, options: ExportOptions) -> "Int8Scheme | None":
        """The int8 arithmetic this exporter applies with `options` on this host, as an
        `edgeseg.quant.sensitivity.Int8Scheme` named `target`, for the eager sensitivity simulation
        (`edgeseg.export.schemes.scheme_for_target`: `edgeseg quant-report --target`, the mIoU budget's ranking).
        `options` is an instance of this exporter's `Options` (profile options plus overrides, calibrate_method
        already checked to be MinMax). None: this exporter's int8 cannot be simulated. Import nothing heavy."""
        return None

    def why_not_here(self) -> str | None:
        """Why this host cannot execute this target's artifacts, one line (e.g. "Core ML runs only on macOS
        (this host: linux)"); None where it can. The mIoU budget refuses such a target before exporting."""
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


def module_path(node) -> str | None:
    """The module path of an FX node (the innermost `nn_module_stack` entry, torch.export's `L__self__` prefixes
    dropped), or None for a node traced outside any module. Exporters store it per op so that `edgeseg bench
    --profile` can roll op time up to model parts."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    entry = list(stack.values())[-1]
    fqn = str(entry[0] if isinstance(entry, (tuple, list)) else entry)
    return fqn.replace("L__self__.", "").replace("L['self'].", "")
