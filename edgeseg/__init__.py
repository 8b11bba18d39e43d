"""edgeseg: lightweight semantic segmentation from training to int8 on edge targets.

Public API only; heavy runtimes are imported lazily inside the target packages (`edgeseg.targets.<name>`) so
that `import edgeseg` stays cheap. The Python API
(`edgeseg.api`: `load`, `export`, `validate`, `Predictor`, `Prediction`) is re-exported here on first use::

    import edgeseg
    seg = edgeseg.load("edgeseg/assets/checkpoints/offseg_t_camvid")
    class_map = seg.predict(image)  # (H, W, 3) uint8 RGB -> (H, W) class map
"""
from __future__ import annotations

import types as _types
from typing import TYPE_CHECKING

from edgeseg.errors import EdgesegError

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and IDEs
    from edgeseg.api import Prediction, Predictor, export, load, validate

_API = ("load", "validate", "Predictor", "Prediction")


def create_model(name, **kwargs):
    from edgeseg.models import create_model as _create

    return _create(name, **kwargs)


def list_models(pattern="*"):
    from edgeseg.models import list_models as _list

    return _list(pattern)


class _ExportPackage(_types.ModuleType):
    """The class of the `edgeseg.export` package: the package (`from edgeseg.export import export_checkpoint`,
    `edgeseg.export.budget`) that, called, is the function `edgeseg.api.export`. `edgeseg.export` cannot be a plain
    function here: importing the package sets the attribute `edgeseg.export` to it."""

    def __call__(self, *args, **kwargs):
        from edgeseg.api import export as _export

        return _export(*args, **kwargs)


def _callable_package(module: _types.ModuleType) -> None:
    """Called by edgeseg/export/__init__.py when it is imported: make the package callable (see _ExportPackage)."""
    module.__class__ = _ExportPackage


def __getattr__(name: str):
    if name in _API:
        from edgeseg import api

        return getattr(api, name)
    if name == "export":  # the package, callable as edgeseg.api.export
        import importlib

        return importlib.import_module("edgeseg.export")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | {"export", "api"})


__all__ = ["EdgesegError", "create_model", "list_models", "__version__", "load", "export", "validate", "Predictor",
           "Prediction"]
