"""Model families. Importing this package registers every variant."""
from edgeseg.models.registry import create_model, get_entry, list_models, register_model

# One import line per family module; each registers its variants.
import importlib as _importlib

for _mod in ("offseg", "segnext", "afm_variants"):
    try:
        _importlib.import_module(f"edgeseg.models.{_mod}")
    except ModuleNotFoundError as _e:  # families land one by one during development
        if _e.name != f"edgeseg.models.{_mod}":
            raise

__all__ = ["create_model", "list_models", "register_model", "get_entry"]
