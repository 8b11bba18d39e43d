"""Model families. Importing this package registers every variant.

Must not import export/ or runtime/.
"""
import importlib as _importlib

import torch.nn as _nn

from edgeseg.models.registry import create_model, get_entry, list_models, register_model

# One line per family module; each registers its variants on import.
_FAMILIES = ("offseg", "segnext", "afm_variants", "offseg_lite")

for _mod in _FAMILIES:
    _importlib.import_module(f"edgeseg.models.{_mod}")


def prepare_for_export(model: _nn.Module, input_hw: tuple[int, int], **forms: str) -> _nn.Module:
    """Freeze a model for a static input size: every submodule that defines `prepare_for_export(input_hw)`
    bakes its size-dependent constants (attention-bias table, DFT matrices, fixed NMF bases).

    `forms` pick among a module's exact export forms where the runtimes differ (a target's profile `[export_form]`,
    e.g. `carafe="channels_last"`); each goes to the modules whose `prepare_for_export` takes that keyword.
    The model is switched to eval; outputs must not change (tested per variant). Returns the same model.
    """
    import inspect
    h, w = int(input_hw[0]), int(input_hw[1])
    if h % 32 or w % 32:
        from edgeseg.errors import UsageError

        raise UsageError(f"--input-size {h}x{w}: height and width must be multiples of 32")
    model.eval()
    for m in model.modules():
        fn = getattr(m, "prepare_for_export", None)
        if callable(fn) and m is not model:
            params = inspect.signature(fn).parameters
            fn((h, w), **{k: v for k, v in forms.items() if k in params})
    return model


__all__ = ["create_model", "list_models", "register_model", "get_entry", "prepare_for_export"]
