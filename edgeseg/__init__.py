"""edgeseg: lightweight semantic segmentation from training to int8 on edge targets.

Public API only; heavy runtimes (executorch, coremltools, openvino, onnxruntime) are imported lazily inside
`edgeseg.export.<target>` and `edgeseg.runtime.<target>` so that `import edgeseg` stays cheap.
"""
from edgeseg.errors import EdgesegError

__version__ = "0.1.0"


def create_model(name, **kwargs):
    from edgeseg.models import create_model as _create

    return _create(name, **kwargs)


def list_models(pattern="*"):
    from edgeseg.models import list_models as _list

    return _list(pattern)


__all__ = ["EdgesegError", "create_model", "list_models", "__version__"]
