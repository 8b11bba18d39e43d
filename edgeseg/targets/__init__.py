"""Targets: one declarative TOML per deployable target in `export_targets/` (installed as the package
`edgeseg.export_targets`) is the single record of a target, parsed and checked here. Loading never imports a heavy
runtime. Everything else asks this module: which exporter converts a target and which runtime runs it, how bench
pins its threads, which QAT scheme it trains for and which QAT checkpoints it exports, how long an export takes.

Adding a target: its profile and its package `edgeseg/targets/<package>/` (exporter.py, session.py, and what else
it needs: quantize.py, passes.py, inspection.py); `exporter_module` / `session_module` import them.

A profile (`export_targets/<name>.toml`):

    name = "onnx"                      # (str) target name; equals the file stem
    exporter = "onnx"                  # (str) package in edgeseg/targets/ whose exporter.py converts it
    description = "..."                # (str) one line for --list-targets
    precisions = ["fp32", "int8"]      # (list[str]) precisions this target supports
    default_precision = "fp32"         # (str) used when --precision is not given; one of precisions
    input_dtype = "float32"            # (str) "float32" normalised input, or "uint8" with normalisation in graph
    input_layout = "NCHW"              # (str) "NCHW" | "NHWC"
    output = "logits"                  # (str) "logits" (stride-s logits) | "argmax" (uint8 map at input size)
    runtime = "onnx"                   # (str) package in edgeseg/targets/ whose session.py runs it here
    thread_control = "..."             # (str) how bench pins the runtime's threads (said beside every latency)
    export_cost = 1.5                  # (float) relative export time; the pipeline starts costly exports first
    int8_runtime_optimize = true       # (bool) run int8 artifacts with the runtime's graph optimisations
    host_run_note = "..."              # (str) optional: what running the artifact here stands for
    [qat]                              # optional: the int8 scheme `edgeseg qat --target NAME` trains for
    scheme = "xnnpack-7bit"            # (str) the scheme's name, recorded by its QAT checkpoints; its quantizer
                                       #   is the exporter's `quantizer(options, is_qat=True)`
    about = "..."                      # (str) the scheme in one line, for manifests
    exports_from = ["xnnpack"]         # (list[str]) QAT schemes whose checkpoints this target exports
    fold_quantize = true               # (bool) optional: QAT convert folds weight quantize ops into constants
    [pipeline]                         # optional: export options of `edgeseg pipeline`'s rows, per precision
    int8 = { int8_mode = "weights" }   # (dict) e.g. a faster int8 mode for the main job
    [export_form]                      # optional: the models' exact export forms this runtime runs fastest
    carafe = "channels_last"           # (str) FreqFusion's CARAFE: "conv_bmm" (default) | "channels_last"
    sampler = "gather"                 # (str) FreqFusion's resampling: "grid_sample" (default) | "gather"
    [options]                          # target options, checked against the exporter's Options dataclass
    opset = 18

A profile that contradicts itself (default precision it does not list, an unknown option, an exporter that
does not exist or cannot produce a listed precision, name != file stem) is a UsageError at load naming the key.
"""
from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import tomllib
from dataclasses import dataclass, field
from typing import Any

from edgeseg.errors import UsageError

PACKAGE = "edgeseg.export_targets"
PRECISIONS = ("fp32", "fp16", "int8")
# the artifact's I/O contract choices (edgeseg.models.wrapper.ExportWrapper); the first is the default
IO_CHOICES: dict[str, tuple[str, ...]] = {
    "input_dtype": ("float32", "uint8"),
    "input_layout": ("NCHW", "NHWC"),
    "output": ("logits", "argmax"),
}
_IO_KEYS = ("input_dtype", "input_layout", "output")
_KEYS = {"name", "exporter", "description", "precisions", "default_precision", *_IO_KEYS, "options", "runtime",
         "thread_control", "export_cost", "int8_runtime_optimize", "host_run_note", "qat", "pipeline",
         "export_form"}
_QAT_KEYS = {"scheme", "about", "exports_from", "fold_quantize"}


@dataclass(frozen=True)
class QatScheme:
    """A profile's `[qat]` table."""

    scheme: str
    about: str
    exports_from: tuple[str, ...]
    fold_quantize: bool = True   # QAT convert folds weight quantize ops into int8 constants


@dataclass(frozen=True)
class TargetProfile:
    """A parsed `export_targets/<name>.toml`. `io_options()` + `options` feed the exporter's Options."""

    name: str
    exporter: str
    description: str
    precisions: tuple[str, ...]
    default_precision: str
    input_dtype: str
    input_layout: str
    output: str
    runtime: str = ""
    thread_control: str = ""
    export_cost: float = 1.0
    int8_runtime_optimize: bool = True
    host_run_note: str = ""
    qat: QatScheme | None = None
    pipeline_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # precision -> export options
    export_form: dict[str, str] = field(default_factory=dict)  # model export forms (edgeseg.models.prepare_for_export)
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def io_options(self) -> dict[str, Any]:
        return {"input_dtype": self.input_dtype, "input_layout": self.input_layout, "output": self.output}



def _profile_files() -> dict[str, Any]:
    root = importlib.resources.files(PACKAGE)
    return {p.name[:-5]: p for p in root.iterdir() if p.name.endswith(".toml")}


def list_profiles() -> list[str]:
    """Names of every profile shipped in export_targets/ (sorted)."""
    return sorted(_profile_files())


def load_profile(name: str) -> TargetProfile:
    """Load and check `export_targets/<name>.toml`.

    Raises:
        UsageError: unknown target, or a profile that contradicts itself (the message names the key).
    """
    files = _profile_files()
    if name not in files:
        raise UsageError(f"--target: unknown target {name!r}; known: {', '.join(sorted(files))}")
    res = files[name]
    where = f"export_targets/{name}.toml"
    try:
        data = tomllib.loads(res.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{where}: not valid TOML ({e})") from None
    return parse_profile(data, stem=name, where=where)


def parse_profile(data: dict[str, Any], stem: str, where: str) -> TargetProfile:
    """Check a profile dict (see the module docstring) and build a TargetProfile. This checks the record itself;
    `edgeseg.export.profiles.check_profile` checks it against its exporter (precisions, options)."""

    def need(key: str, typ: type):
        if key not in data:
            raise UsageError(f"{where}: missing key {key!r}")
        v = data[key]
        if not isinstance(v, typ):
            raise UsageError(f"{where}: {key}: expected {getattr(typ, '__name__', 'number')}, got {v!r}")
        return v

    for k in data:
        if k not in _KEYS:
            raise UsageError(f"{where}: {k}: unknown key; known: {', '.join(sorted(_KEYS))}")
    name = need("name", str)
    if name != stem:
        raise UsageError(f"{where}: name: {name!r} must equal the file stem {stem!r}")
    exporter = need("exporter", str)
    if not exporter.isidentifier() or not _has_part(exporter, "exporter"):
        raise UsageError(f"{where}: exporter: {exporter!r} is not a target package with an exporter "
                         f"(edgeseg/targets/{exporter}/exporter.py)")
    precisions = need("precisions", list)
    if not precisions or any(p not in PRECISIONS for p in precisions) or len(set(precisions)) != len(precisions):
        raise UsageError(f"{where}: precisions: {precisions!r}; expected distinct values from {list(PRECISIONS)}")
    default = need("default_precision", str)
    if default not in precisions:
        raise UsageError(f"{where}: default_precision: {default!r} is not in precisions {precisions}")
    io = {k: data.get(k, IO_CHOICES[k][0]) for k in _IO_KEYS}
    for k, choices in IO_CHOICES.items():
        if io[k] not in choices:
            raise UsageError(f"{where}: {k}: {io[k]!r} is not one of {', '.join(choices)}")
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise UsageError(f"{where}: options: expected a table")
    for k in _IO_KEYS:
        if k in options:
            raise UsageError(f"{where}: options.{k}: set it as the top-level key {k!r}, not under [options]")
    runtime = need("runtime", str)
    if not runtime.isidentifier() or not _has_part(runtime, "session"):
        raise UsageError(f"{where}: runtime: {runtime!r} is not a target package with a session "
                         f"(edgeseg/targets/{runtime}/session.py)")
    cost = need("export_cost", (int, float))
    if isinstance(cost, bool) or cost <= 0:
        raise UsageError(f"{where}: export_cost: expected a positive number, got {cost!r}")
    optimize = data.get("int8_runtime_optimize", True)
    if not isinstance(optimize, bool):
        raise UsageError(f"{where}: int8_runtime_optimize: expected true or false, got {optimize!r}")
    profile = TargetProfile(name=name, exporter=exporter, description=str(data.get("description", "")),
                            precisions=tuple(precisions), default_precision=default, runtime=runtime,
                            thread_control=need("thread_control", str), export_cost=float(cost),
                            int8_runtime_optimize=optimize, host_run_note=str(data.get("host_run_note", "")),
                            qat=_parse_qat(data.get("qat"), where), options=dict(options), source=where,
                            pipeline_options=_parse_pipeline(data.get("pipeline", {}), precisions, where),
                            export_form=_parse_export_form(data.get("export_form", {}), where), **io)
    return profile


def _parse_pipeline(table: Any, precisions: list, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(table, dict) or any(p not in precisions or not isinstance(v, dict) for p, v in table.items()):
        raise UsageError(f"{where}: pipeline: expected a table of {{precision = {{option = value}}}} for precisions "
                         f"in {precisions}, got {table!r}")
    return {p: dict(v) for p, v in table.items()}


# export forms a profile may pick, and their choices (the models' prepare_for_export keywords); kept here so that
# reading a profile imports no model code; equal to edgeseg.models.carafe.CARAFE_FORMS and
# edgeseg.models.freqfusion.SAMPLER_FORMS (tests/test_offseg.py)
EXPORT_FORMS = {"carafe": ("conv_bmm", "channels_last", "gather"), "sampler": ("grid_sample", "gather")}


def _parse_export_form(table: Any, where: str) -> dict[str, str]:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: export_form: expected a table")
    for k, v in table.items():
        if k not in EXPORT_FORMS or v not in EXPORT_FORMS[k]:
            known = "; ".join(f"{n}: {', '.join(c)}" for n, c in EXPORT_FORMS.items())
            raise UsageError(f"{where}: export_form.{k}: {v!r} is not a known form ({known})")
    return dict(table)


def _has_part(package: str, part: str) -> bool:
    """Whether edgeseg/targets/<package>/<part>.py exists, found without importing it."""
    return (importlib.resources.files("edgeseg") / "targets" / package / f"{part}.py").is_file()


def exporter_module(package: str):
    """The exporter module of a target package, `edgeseg.targets.<package>.exporter` (light: no vendor tool)."""
    return importlib.import_module(f"edgeseg.targets.{package}.exporter")


def session_module(package: str):
    """The runtime module of a target package, `edgeseg.targets.<package>.session`: its `SESSION` class, and where
    it has them `RUN_SCRIPT` (the device kit's runner), `profile_ops` / `NO_PROFILE` (`edgeseg bench --profile`)."""
    return importlib.import_module(f"edgeseg.targets.{package}.session")


def _parse_qat(table: Any, where: str) -> QatScheme | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UsageError(f"{where}: qat: expected a table")
    for k in table:
        if k not in _QAT_KEYS:
            raise UsageError(f"{where}: qat.{k}: unknown key; known: {', '.join(sorted(_QAT_KEYS))}")
    scheme, about, accepts = table.get("scheme"), table.get("about", ""), table.get("exports_from")
    if not isinstance(scheme, str) or not scheme:
        raise UsageError(f"{where}: qat.scheme: expected a non-empty string, got {scheme!r}")
    if not isinstance(accepts, list) or not all(isinstance(a, str) for a in accepts) or scheme not in accepts:
        raise UsageError(f"{where}: qat.exports_from: expected a list of scheme names that includes {scheme!r}")
    fold = table.get("fold_quantize", True)
    if not isinstance(fold, bool):
        raise UsageError(f"{where}: qat.fold_quantize: expected true or false, got {fold!r}")
    return QatScheme(scheme=scheme, about=str(about), exports_from=tuple(accepts), fold_quantize=fold)


@dataclass
class Flow:
    """How the test suite exercises a target, declared in its package as `FLOW` (as each ExecuTorch backend declares
    its TestFlow), so that no test file keeps a table of targets: tests/ read `flows()`.

    extra: the pip extra that brings the target's tools (None: the core install); without it, an export is one
        line naming `pip install 'edgeseg[<extra>]'`.
    contract_models: the registered tiny variants (`test_*`, plus tests/_tiny.py's `tiny_ops`) its fp32 round trip
        runs in tests/test_export.py (export, manifest, proof, session against eager): None = every one; a tuple
        = those (say why in `contract_note`); () = none (`contract_note` says which test file covers it).
    contract_note: why `contract_models` is not every variant.
    contract_options: exporter options of every contract export (fp32 and int8), e.g. OpenVINO's strict f32
        compute, so that the floors below do not depend on the CPU the suite runs on.
    known_broken: {model: reason} of the contract round trip, run as strict xfails so that a fix shows up.
    int8: {model: argmax-agreement floor} of the contract's int8 round trip (export calibrated on the tiny set,
        manifest, the export's proof against eager, the session): the random-weight tiny variants measured on one
        CPU, minus a margin (each package says what it measured); {} = no int8 contract.
    quiet: {precision: extra CLI arguments} that tests/test_quiet_output.py exports through the CLI, checking
        that only edgeseg's lines reach the terminal and the converter's go to the vendor log.
    vendor_says: a line the target's converter writes on tiny_ops, which the vendor log must then hold.
    device_kit: (precision, exporter options) of tiny_ops whose device kit tests/test_artifact_scripts.py runs in a
        clean venv holding only the runtime's PACKAGES, numpy and Pillow (self-test and an image through the run
        script); () = none here.
    """

    extra: str | None = None
    contract_models: tuple[str, ...] | None = None
    contract_note: str = ""
    contract_options: dict[str, Any] = field(default_factory=dict)
    known_broken: dict[str, str] = field(default_factory=dict)
    int8: dict[str, float] = field(default_factory=dict)
    quiet: dict[str, tuple[str, ...]] = field(default_factory=dict)
    vendor_says: str | None = None
    device_kit: tuple[tuple[str, dict[str, Any]], ...] = ()


def flows() -> dict[str, Flow]:
    """Target name -> the `FLOW` its exporter's package declares (`Flow()` where it declares none)."""
    return {name: getattr(importlib.import_module(f"edgeseg.targets.{load_profile(name).exporter}"), "FLOW", Flow())
            for name in list_profiles()}


def runtime_record(profile: TargetProfile) -> dict[str, Any]:
    """How the artifacts of `profile`'s target run, as the manifest records it (`Manifest.runtime`): the runtime
    package whose session opens them, how bench pins its threads, whether int8 runs with the runtime's graph
    optimisations."""
    return {"package": profile.runtime, "thread_control": profile.thread_control,
            "int8_runtime_optimize": profile.int8_runtime_optimize}


def artifact_runtime(manifest) -> dict[str, Any]:
    """An artifact's runtime record (`runtime_record`): the one its manifest carries, or, for an artifact exported
    before manifests carried it, the same record from its target's profile.

    Raises:
        ArtifactError: neither (a target this edgeseg does not know), or a record naming a runtime package this
            edgeseg does not have (a manifest from elsewhere or edited: only a shipped package is ever imported).
    """
    from edgeseg.errors import ArtifactError

    if manifest.runtime:
        known = sorted({p.runtime for p in all_profiles().values()})
        if manifest.runtime.get("package") not in known:
            raise ArtifactError(f"runtime.package {str(manifest.runtime.get('package'))[:60]!r}: not a runtime this "
                                f"edgeseg has; known: {', '.join(known)}")
        return manifest.runtime
    if manifest.target not in list_profiles():
        raise ArtifactError(f"{manifest.target!r}: unknown target; known: {', '.join(list_profiles())}")
    return runtime_record(load_profile(manifest.target))


def all_profiles() -> dict[str, TargetProfile]:
    """Every profile by name (each checked; the first bad one raises UsageError naming its key)."""
    return {name: load_profile(name) for name in list_profiles()}


def qat_targets() -> dict[str, QatScheme]:
    """Target -> its QAT scheme, for the targets that have one."""
    return {n: p.qat for n, p in all_profiles().items() if p.qat is not None}


def targets_exporting(scheme: str) -> tuple[str, ...]:
    """Targets whose exporter takes a QAT checkpoint trained for `scheme`, in profile order."""
    return tuple(n for n, p in all_profiles().items() if p.qat is not None and scheme in p.qat.exports_from)
