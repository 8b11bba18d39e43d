"""The embedded default: a dozen CamVid val pairs and (once trained) the default checkpoint, shipped inside
the installed package under `edgeseg/assets/` so that the main job and the demo run with nothing else present.

Both are found relative to this file (`edgeseg/assets/`), which works for editable and non-editable installs
(pyproject maps `edgeseg.assets` package data `**/*`).
"""
from __future__ import annotations

from pathlib import Path

from edgeseg.artifact import MANIFEST
from edgeseg.errors import ArtifactError, DataError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_DATA = "camvid_mini"
DEFAULT_MODEL = "offseg_t_camvid"


def assets_dir() -> Path:
    """The package's `assets/` folder."""
    return ASSETS


def default_data_dir() -> Path:
    """`edgeseg/assets/camvid_mini`: 12 CamVid val pairs (CamVid SegNet layout: `val/`, `valannot/`), CC BY-NC 4.0
    (see its LICENSE.md). Open it with `open_dataset(default_data_dir(), split="val")`."""
    p = ASSETS / DEFAULT_DATA
    if not (p / "val").is_dir() or not (p / "valannot").is_dir():
        raise DataError(f"{p}: the embedded default data is missing from this installation "
                        "(reinstall edgeseg or pass --data DIR)")
    return p


def default_checkpoint() -> Path:
    """`edgeseg/assets/checkpoints/offseg_t_camvid/` (model.safetensors + model.json).

    Raises ArtifactError if this installation does not ship it."""
    p = ASSETS / "checkpoints" / DEFAULT_MODEL
    if not (p / "model.safetensors").is_file() or not (p / "model.json").is_file():
        raise ArtifactError(f"{p}: the default checkpoint is not shipped in this installation "
                            "(pass --checkpoint DIR, or train one with `edgeseg train`)")
    return p


def shipped_artifacts() -> list[Path]:
    """Export artifacts shipped ready to run (`edgeseg/assets/artifacts/<name>/`, each an export folder with its
    manifest.json): the QAT int8 variants of the shipped checkpoints, for `edgeseg demo --artifact` / `validate`."""
    root = ASSETS / "artifacts"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / MANIFEST).is_file())
