"""The artifact format: an artifact folder holds the exported files and `manifest.json`, which says what the files
are, how to feed and read them, how they were made and their sha256. Everything that reads or writes an artifact
(export, runtime sessions, validate, bench, demo) uses this module, so none of them needs the exporters.

Loading never trusts the manifest: `read_manifest` checks types and that every path stays inside the folder,
`verify_manifest` also checks every file against its sha256 (regular files only, no links). A runtime reads the
files it loads through `read_hashed`, which checks the very bytes it hands over, so what was hashed is what runs.
`source_checkpoint` checks the checkpoint an artifact records against the sha256 export recorded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from edgeseg.errors import ArtifactError
from edgeseg.fileio import sha256_file, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT_VERSION = 1


@dataclass
class Manifest:
    """`manifest.json`: everything needed to run an artifact without guessing from file suffixes.

    `input` = {name, shape, dtype ("float32"|"uint8"), layout ("NCHW"|"NHWC"), normalisation};
    `output` = {name, kind ("logits"|"argmax"), shape, dtype, stride, meaning};
    `sha256` = {relative path: hex digest} for every artifact file except manifest.json;
    `proof` = {images, source, argmax_agreement, max_abs_logit_diff, ...} or None when not run here;
    `device_kit` = {runtime, script, files, sha256, cpu, self_test}: the README, run script and self-test files
    written for the device (edgeseg.export.device_kit), hashed in their own `sha256` (checked by verify_manifest
    like the model's; `files`/`sha256` stay the model's, what runs and what its size is); {} for older artifacts.
    `runtime` = {package, thread_control, int8_runtime_optimize}: how the artifact runs, from its target's profile
    at export (edgeseg.targets.runtime_record), so opening, benching and profiling it never re-read the profile;
    {} for older artifacts (edgeseg.targets.artifact_runtime then reads the profile).
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
    device_kit: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
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
    if m.runtime:  # {} for artifacts from before the record; the package itself is checked by artifact_runtime
        rt = m.runtime
        if (not isinstance(rt, dict) or not isinstance(rt.get("package"), str)
                or not isinstance(rt.get("thread_control"), str)
                or not isinstance(rt.get("int8_runtime_optimize"), bool)):
            raise bad("runtime must be {package: str, thread_control: str, int8_runtime_optimize: bool}, got "
                      f"{_short(rt)}")
    if m.input["layout"] not in _LAYOUTS:
        raise bad(f"input.layout {_short(m.input['layout'])} is not one of {', '.join(_LAYOUTS)}")
    if m.output["kind"] not in _OUTPUT_KINDS:
        raise bad(f"output.kind {_short(m.output['kind'])} is not one of {', '.join(_OUTPUT_KINDS)}")
    if not isinstance(m.input_hw, list) or len(m.input_hw) != 2 or not all(_is_int(v) and v > 0 for v in m.input_hw):
        raise bad(f"input_hw must be [height, width] (positive integers), got {_short(m.input_hw)}")
    for k in ("mean", "std"):
        v = getattr(m, k)
        if not isinstance(v, list) or len(v) != 3 or not all(_is_number(x) and math.isfinite(x) for x in v):
            raise bad(f"{k} must be a list of 3 finite numbers, got {_short(v)}")
    if not all(x > 0 for x in m.std):
        raise bad(f"std must be positive, got {_short(m.std)}")
    if not isinstance(m.class_names, list) or not all(isinstance(c, str) for c in m.class_names):
        raise bad(f"class_names must be a list of strings, got {_short(m.class_names)}")
    if not isinstance(m.palette, list):
        raise bad(f"palette must be a list of RGB triples, got {_short(m.palette)}")
    if not _is_int(m.ignore_index):
        raise bad(f"ignore_index must be an integer, got {_short(m.ignore_index)}")
    if not isinstance(m.executed_here, bool):
        raise bad(f"executed_here must be true/false, got {_short(m.executed_here)}")
    kit_sha = m.device_kit.get("sha256", {}) if isinstance(m.device_kit, dict) else None
    if not isinstance(kit_sha, dict):
        raise bad(f"device_kit must be an object with a {{path: hex digest}} sha256, got {_short(m.device_kit)}")
    for rel, digest in kit_sha.items():
        _contained_path(artifact_dir, rel, "device_kit.sha256 path", where)
        if not isinstance(digest, str) or not digest:
            raise bad(f"device_kit.sha256[{_short(rel)}] must be a hex digest string, got {_short(digest)}")


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
    """Read the manifest (read_manifest: types and paths checked) and check every listed file (the model's and the
    device kit's) exists and matches its sha256.

    Raises:
        ArtifactError naming the malformed manifest or the first missing or changed file.
    """
    artifact_dir = Path(artifact_dir)
    m = read_manifest(artifact_dir)
    for rel, digest in [*m.sha256.items(), *m.device_kit.get("sha256", {}).items()]:
        p = _regular_file(artifact_dir, rel)
        if sha256_file(p) != digest:
            raise ArtifactError(f"{p}: sha256 does not match {MANIFEST} (file changed or corrupted)")
    folder = artifact_dir / m.model_file
    if folder.is_dir():  # a runtime loads every file of a model folder (.mlpackage): each one must be hashed
        for q in sorted(folder.rglob("*")):
            if (q.is_symlink() or q.is_file()) and str(q.relative_to(artifact_dir)) not in m.sha256:
                raise ArtifactError(f"{q}: inside model_file {m.model_file} but not listed in {MANIFEST}; the "
                                    "runtime would load it unhashed")
    return m


def _regular_file(root: Path, rel: str) -> Path:
    """`root / rel` for a listed path: ArtifactError (one line) if it is missing, not a regular file, or reached
    through a symbolic link (a link could lead out of the folder, or change after the check)."""
    link = _first_link(root, rel)
    if link is not None:
        raise ArtifactError(f"{link}: a symbolic link; an artifact holds regular files only (listed in {MANIFEST} "
                            f"as {rel!r})")
    p = root / rel
    if not p.is_file():
        raise ArtifactError(f"{p}: listed in {MANIFEST} but missing")
    return p


def _first_link(root: Path, rel: str) -> Path | None:
    """The first symbolic link on the way from `root` to `root / rel` (None if there is none)."""
    p = root
    for part in Path(rel).parts:
        p = p / part
        if p.is_symlink():
            return p
    return None


def read_hashed(artifact_dir: str | Path, manifest: Manifest, rel: str) -> bytes:
    """The bytes of the artifact file `rel`, read once and checked against its sha256 in the manifest: a runtime
    loads these bytes, so what was hashed is what runs (a file changed after `verify_manifest` is refused too).

    Raises:
        ArtifactError (one line naming the file): `rel` not listed in the manifest's sha256 (the runtime would load
        an unhashed file), a symbolic link or not a regular file, unreadable, or its bytes do not match.
    """
    root = Path(artifact_dir)
    digest = manifest.sha256.get(rel) if isinstance(manifest.sha256, dict) else None
    if not isinstance(digest, str):
        raise ArtifactError(f"{root / rel}: the runtime would load it but it is not listed in {MANIFEST} with its "
                            "sha256; refusing an unhashed file")
    _contained_path(root, rel, "file", root / MANIFEST)
    p = _regular_file(root, rel)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with open(fd, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ArtifactError(f"{p}: cannot be read ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise ArtifactError(f"{p}: sha256 does not match {MANIFEST} (file changed or corrupted)")
    return data


def source_checkpoint(artifact_dir: str | Path, manifest: Manifest) -> Path | None:
    """The checkpoint the artifact was exported from (validate's default reference), checked against what export
    recorded: its absolute, resolved folder (`path`) and the sha256 of its files (`sha256`, keyed
    `<folder name>/<file>`). None when there is nothing to follow: no record, a record unlike export's (a relative
    or unnormalised path, no sha256: never followed), or a folder that is gone.

    Raises:
        ArtifactError (one line naming the manifest, "the reference checkpoint changed"): a file the reference
        loads (model.json, model.safetensors) is not covered by the record, or any recorded file is missing, a
        link, or differs from its sha256; or the path now leads through a symbolic link.
    """
    where = Path(artifact_dir) / MANIFEST
    rec = manifest.source_checkpoint if isinstance(manifest.source_checkpoint, dict) else {}
    src, digests = rec.get("path"), rec.get("sha256")
    if not src:
        return None
    if (not isinstance(src, str) or "\x00" in src or not os.path.isabs(src) or os.path.normpath(src) != src
            or not isinstance(digests, dict) or not digests or not all(isinstance(v, str) for v in digests.values())):
        log.info("%s: source_checkpoint %s is not an absolute path with its sha256 as export records it: not "
                 "followed", where, _short(src))
        return None
    path = Path(src)
    if not (path / "model.json").is_file():
        return None  # moved or deleted: the caller looks for another reference

    def changed(why: str) -> ArtifactError:
        return ArtifactError(f"{where}: the reference checkpoint changed since export: {why}")

    if path.resolve() != path:
        raise changed(f"source_checkpoint.path {src} now leads through a symbolic link to {path.resolve()}")
    files = {}
    for key, digest in digests.items():
        rel = key.split("/", 1)[1] if "/" in key else key  # keyed by the folder's name as export was given it
        if not rel or os.path.isabs(rel) or ".." in rel.split("/") or "\x00" in rel:
            raise changed(f"source_checkpoint.sha256 key {_short(key)} leaves the checkpoint folder")
        files[rel] = digest
    for needed in ("model.json", "model.safetensors"):  # what the reference loads (edgeseg.checkpoint)
        if needed not in files:
            raise changed(f"source_checkpoint.sha256 does not cover {path / needed}")
    for rel, digest in files.items():
        p, link = path / rel, _first_link(path, rel)
        if link is not None or not p.is_file():
            raise changed(f"{link} is a symbolic link now" if link is not None else f"{p} is missing")
        if sha256_file(p) != digest:
            raise changed(f"{p} differs from its sha256 recorded at export")
    return path
