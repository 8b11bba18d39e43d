"""Target profiles: one declarative TOML per deployable target in `export_targets/` (installed as the package
`edgeseg.export_targets`), parsed and checked here. Loading never imports a heavy runtime.

A profile (`export_targets/<name>.toml`):

    name = "onnx"                      # (str) target name; equals the file stem
    exporter = "onnx"                  # (str) module in edgeseg/export/ that converts it
    description = "..."                # (str) one line for --list-targets
    precisions = ["fp32", "int8"]      # (list[str]) precisions this target supports
    default_precision = "fp32"         # (str) used when --precision is not given; one of precisions
    input_dtype = "float32"            # (str) "float32" normalised input, or "uint8" with normalisation in graph
    input_layout = "NCHW"              # (str) "NCHW" | "NHWC"
    output = "logits"                  # (str) "logits" (stride-s logits) | "argmax" (uint8 map at input size)
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
_IO_KEYS = ("input_dtype", "input_layout", "output")
_KEYS = {"name", "exporter", "description", "precisions", "default_precision", *_IO_KEYS, "options"}


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
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def io_options(self) -> dict[str, Any]:
        return {"input_dtype": self.input_dtype, "input_layout": self.input_layout, "output": self.output}

    def exporter_class(self):
        """The exporter module's `EXPORTER` class (imports the light module, not the vendor tool)."""
        mod = importlib.import_module(f"edgeseg.export.{self.exporter}")
        return mod.EXPORTER


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
    """Check a profile dict (see the module docstring) and build a TargetProfile."""
    from edgeseg.export.base import PRECISIONS, ExportOptions

    def need(key: str, typ: type):
        if key not in data:
            raise UsageError(f"{where}: missing key {key!r}")
        v = data[key]
        if not isinstance(v, typ):
            raise UsageError(f"{where}: {key}: expected {typ.__name__}, got {v!r}")
        return v

    for k in data:
        if k not in _KEYS:
            raise UsageError(f"{where}: {k}: unknown key; known: {', '.join(sorted(_KEYS))}")
    name = need("name", str)
    if name != stem:
        raise UsageError(f"{where}: name: {name!r} must equal the file stem {stem!r}")
    exporter = need("exporter", str)
    if not exporter.isidentifier() or importlib.util.find_spec(f"edgeseg.export.{exporter}") is None:
        raise UsageError(f"{where}: exporter: {exporter!r} is not a module in edgeseg/export/")
    precisions = need("precisions", list)
    if not precisions or any(p not in PRECISIONS for p in precisions) or len(set(precisions)) != len(precisions):
        raise UsageError(f"{where}: precisions: {precisions!r}; expected distinct values from {list(PRECISIONS)}")
    default = need("default_precision", str)
    if default not in precisions:
        raise UsageError(f"{where}: default_precision: {default!r} is not in precisions {precisions}")
    io = {k: data.get(k, getattr(ExportOptions, k)) for k in _IO_KEYS}
    for k, choices in ExportOptions._CHOICES.items():
        if io[k] not in choices:
            raise UsageError(f"{where}: {k}: {io[k]!r} is not one of {', '.join(choices)}")
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise UsageError(f"{where}: options: expected a table")
    for k in _IO_KEYS:
        if k in options:
            raise UsageError(f"{where}: options.{k}: set it as the top-level key {k!r}, not under [options]")
    profile = TargetProfile(name=name, exporter=exporter, description=str(data.get("description", "")),
                            precisions=tuple(precisions), default_precision=default, options=dict(options),
                            source=where, **io)
    cls = profile.exporter_class()
    unsupported = [p for p in precisions if p not in cls.precisions]
    if unsupported:
        raise UsageError(f"{where}: precisions: exporter {exporter!r} cannot produce {unsupported}")
    cls.Options.from_dict({**profile.io_options(), **options}, where=f"{where}: options")
    return profile
