"""Artifacts on disk and the references they are judged against: manifest reading, size, the choice of reference
(explicit, recorded source checkpoint, or fp32 sibling artifact) and the reference label maps, computed once per
(reference, input size) and shared by every artifact.

Must not import heavy runtimes (they come in through `edgeseg.runtime`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from edgeseg.errors import ArtifactError, UsageError

if TYPE_CHECKING:
    from edgeseg.artifact import Manifest

from edgeseg.artifact import MANIFEST  # noqa: E402  (the one name of the manifest file)


def read_manifest_dict(artifact_dir: str | Path) -> dict[str, Any]:
    """The artifact's manifest as a dict, parsed and checked by `edgeseg.artifact.read_manifest` (one parser,
    one set of checks: types, paths inside the folder, model_file hashed); no hash check (`open_session` does
    that). Fields the file omits hold the Manifest defaults, as the runtimes see them.

    Raises:
        ArtifactError (one line naming the manifest) for a missing, unparsable or malformed manifest.
    """
    from edgeseg.artifact import read_manifest

    return read_manifest(artifact_dir).to_json()


def as_manifest(manifest: "Manifest | dict[str, Any]") -> "Manifest":
    """`manifest` as a Manifest (callers may still hand over the manifest's JSON dict)."""
    from edgeseg.artifact import Manifest

    return Manifest.from_json(manifest) if isinstance(manifest, dict) else manifest


def artifact_size_bytes(artifact_dir: str | Path, manifest: "Manifest") -> int:
    """Bytes of the artifact's files (those hashed in the manifest; every file but manifest.json otherwise)."""
    root = Path(artifact_dir)
    files = list((manifest.sha256 or {}).keys())
    if files:
        return int(sum((root / f).stat().st_size for f in files if (root / f).is_file()))
    return int(sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != MANIFEST))


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "model.json").is_file()


def find_fp32_sibling(artifact_dir: Path, manifest: "Manifest") -> Path | None:
    """An fp32 artifact next to `artifact_dir` with the same target, model and input size (None if none)."""
    from edgeseg.artifact import read_manifest

    for cand in sorted(Path(artifact_dir).parent.iterdir()):
        if cand.resolve() == Path(artifact_dir).resolve() or not is_artifact(cand):
            continue
        try:
            m = read_manifest(cand)
        except ArtifactError:
            continue
        if (m.precision == "fp32" and m.target == manifest.target and m.model == manifest.model
                and list(m.input_hw or []) == list(manifest.input_hw or [])):
            return cand
    return None


def resolve_reference(artifact_dir: Path, manifest: "Manifest | dict[str, Any]", reference: str | Path | None
                      ) -> tuple[str, Path] | None:
    """Which reference an artifact is judged against: ("checkpoint"|"artifact", path), or None.

    Order: the explicit `reference`; else the source checkpoint recorded in the manifest (if it still exists; it
    must still match the sha256 export recorded, see `edgeseg.artifact.source_checkpoint`); else the fp32 sibling
    artifact (same target, model, input size) for a non-fp32 artifact.

    Raises:
        UsageError for a bad `reference`; ArtifactError (one line) when the recorded source checkpoint changed
        since export ("the reference checkpoint changed") or its record is not what export writes.
    """
    if reference is not None:
        ref = Path(reference)
        if is_artifact(ref):
            return "artifact", ref
        if is_checkpoint(ref):
            return "checkpoint", ref
        raise UsageError(f"--reference {ref}: neither an artifact folder (manifest.json) nor a checkpoint "
                         "folder (model.json)")
    from edgeseg.artifact import source_checkpoint

    manifest = as_manifest(manifest)
    src = source_checkpoint(artifact_dir, manifest)
    if src is not None:
        return "checkpoint", src
    if manifest.precision != "fp32":
        sib = find_fp32_sibling(artifact_dir, manifest)
        if sib is not None:
            return "artifact", sib
    return None


def progress_bar(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="img", leave=False, dynamic_ncols=True)


class CheckpointReference:
    """Eager PyTorch reference: the checkpoint's model at the artifact's input size, through the same
    `Session.segment` preprocessing as the artifacts but with the checkpoint's own mean/std (never the artifact's,
    so a wrong manifest shows up as disagreement)."""

    def __init__(self, path: Path):
        self.path = path
        self._sessions: dict[tuple[int, int], Any] = {}

    def segment(self, image: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
        if input_hw not in self._sessions:
            from edgeseg.runtime.torch import TorchSession

            self._sessions[input_hw] = TorchSession.from_checkpoint(self.path, input_hw=input_hw)
        return np.asarray(self._sessions[input_hw].segment(image))


class ArtifactReference:
    """An fp32 artifact as the reference, in its own runtime; one this host cannot execute is refused."""

    def __init__(self, path: Path, opener: Callable):
        self.session = opener(path)
        self.path = path
        if not self.session.executes_here:
            raise ArtifactError(f"reference {path}: cannot be executed on this host")

    def segment(self, image: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
        return np.asarray(self.session.segment(image))


class ReferenceCache:
    """Reference label maps, computed once per (reference, input size) and shared by every artifact."""

    def __init__(self, opener: Callable):
        self.opener = opener
        self._refs: dict[Path, Any] = {}
        self._maps: dict[tuple, list[np.ndarray]] = {}
        self._metrics: dict[tuple, dict] = {}

    def maps(self, kind: str, path: Path, input_hw: tuple[int, int], dataset, indices: Sequence[int],
             num_classes: int, ignore_index: int, progress: bool) -> tuple[list[np.ndarray], dict]:
        from edgeseg.eval.metrics import SegMetrics

        key = (kind, path.resolve(), tuple(input_hw), tuple(indices))
        if key not in self._maps:
            ref = self._reference(kind, path)
            metrics = SegMetrics(num_classes, ignore_index)
            maps = []
            for i in progress_bar(indices, progress, f"reference {path.name}"):
                image, label = dataset[i]
                m = ref.segment(image, tuple(input_hw))
                metrics.update(m, label)
                maps.append(m)
            self._maps[key] = maps
            self._metrics[key] = metrics.compute()
        return self._maps[key], self._metrics[key]

    def _reference(self, kind: str, path: Path):
        rp = path.resolve()
        if rp not in self._refs:
            self._refs[rp] = CheckpointReference(path) if kind == "checkpoint" else \
                ArtifactReference(path, self.opener)
        return self._refs[rp]
