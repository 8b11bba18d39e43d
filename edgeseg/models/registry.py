"""Model registry: `@register_model` on one small builder function per variant; lookups by name or pattern.

Must not import export/ or runtime/.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from edgeseg.errors import UsageError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn(num_classes: int, **kwargs) -> nn.Module` under its function name.

    The first line of its docstring is the description `edgeseg models` prints.
    """
    name = fn.__name__
    if name in _REGISTRY:
        raise RuntimeError(f"model {name!r} registered twice")
    doc = (fn.__doc__ or "").strip().splitlines()
    _REGISTRY[name] = ModelEntry(name, fn, doc[0] if doc else "")
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern (`test_*` are the tiny CI variants)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise UsageError(f"--model: unknown model {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model. Its forward maps (N, 3, H, W) normalised float to (N, K, H/s, W/s) logits,
    with s = `model.output_stride`."""
    return get_entry(name).builder(num_classes=num_classes, **kwargs)
