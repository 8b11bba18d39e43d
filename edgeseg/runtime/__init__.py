"""Runtimes: `open_session(path)` opens a checkpoint folder (eager PyTorch, the reference) or an artifact folder
(checks every file's sha256 against manifest.json first, then opens the target's runtime).

The runtime module of each target is its profile's `runtime` (edgeseg.targets); each module in edgeseg/runtime/
sets `SESSION = <its Session subclass>`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeseg.errors import ArtifactError
from edgeseg.runtime.base import Session


def open_session(path: str | Path, num_threads: int | None = None, **kwargs: Any) -> Session:
    """Open a checkpoint folder (has model.json) or an artifact folder (has manifest.json).

    Args:
        path: checkpoint or artifact folder.
        num_threads: CPU threads for the runtime (None = its default).
        **kwargs: runtime-specific (e.g. device="cuda" for torch).
    Raises:
        ArtifactError: not a checkpoint/artifact, a file missing or changed since export, unknown target.
    """
    from edgeseg.artifact import MANIFEST, verify_manifest
    from edgeseg.targets import artifact_runtime, session_module

    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest = verify_manifest(path)
        try:
            runtime = artifact_runtime(manifest)
        except ArtifactError as e:
            raise ArtifactError(f"{path / MANIFEST}: {e}") from None
        mod = session_module(runtime["package"])
        return mod.SESSION(path, manifest, num_threads=num_threads, **kwargs)
    if (path / "model.json").is_file():
        from edgeseg.runtime.torch import TorchSession

        return TorchSession.from_checkpoint(path, num_threads=num_threads, **kwargs)
    raise ArtifactError(f"{path}: neither an artifact folder ({MANIFEST}) nor a checkpoint folder (model.json)")


__all__ = ["open_session", "Session"]
