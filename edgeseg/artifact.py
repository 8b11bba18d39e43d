"""The artifact format: an artifact folder holds the exported files and `manifest.json`, which says what the files
are, how to feed and read them, how they were made and their sha256. Everything that reads or writes an artifact
(export, runtime sessions, validate, bench, demo) uses this module, so none of them needs the exporters.

Loading never trusts the manifest: `read_manifest` checks types and that every path stays inside the folder,
`verify_manifest` also checks every file against its sha256.
"""
from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from edgeseg.errors import ArtifactError
from edgeseg.fileio import sha256_file, write_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT_VERSION = 1


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
