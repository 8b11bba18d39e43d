"""A nested state (dicts, lists, tuples, tensors, numbers, strings, None) as one safetensors file: the tensors as
its tensors, the structure as JSON in its metadata. Data only: loading builds dicts, lists, tuples, plain scalars
and tensors, never an object of any other type, and runs no code (what `torch.save` / `torch.load` cannot promise).

Used for the training resume point (edgeseg.train.state). Encoding of the structure:
    tensor -> {"$t": name}          dict -> {"$d": [[key, value], ...]} (keys: str, int, float, bool or None)
    list -> {"$l": [...]}          tuple -> {"$u": [...]}          float inf/nan -> {"$f": "inf" | "-inf" | "nan"}
    str, int, finite float, bool, None -> themselves
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from edgeseg.errors import ArtifactError, one_line

_META_KEY = "edgeseg-tree"
_MAX_DEPTH = 64


def _encode(obj: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError("nested deeper than 64 levels")
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().clone().contiguous()
        return {"$t": name}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$f": repr(obj)}
    if isinstance(obj, dict):
        for k in obj:
            if not (k is None or isinstance(k, (str, int, float, bool))):
                raise TypeError(f"a dict key of type {type(k).__name__}")
        return {"$d": [[k, _encode(v, tensors, depth + 1)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"$l" if isinstance(obj, list) else "$u": [_encode(v, tensors, depth + 1) for v in obj]}
    raise TypeError(f"{type(obj).__name__} is not data (dict, list, tuple, tensor, number, string, None)")


def save_tree(path: str | Path, obj: Any) -> None:
    """Write `obj` to `path` (a safetensors file). TypeError for anything that is not plain data."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(tree, allow_nan=False)})


_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _decode(node: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError("nested deeper than 64 levels")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and len(node) == 1:
        (tag, val), = node.items()
        if tag == "$t" and isinstance(val, str) and val in tensors:
            return tensors[val]
        if tag == "$f" and val in _FLOATS:
            return _FLOATS[val]
        if tag in ("$l", "$u") and isinstance(val, list):
            items = [_decode(v, tensors, depth + 1) for v in val]
            return items if tag == "$l" else tuple(items)
        if tag == "$d" and isinstance(val, list):
            out = {}
            for pair in val:
                if not (isinstance(pair, list) and len(pair) == 2
                        and (pair[0] is None or isinstance(pair[0], (str, int, float, bool)))):
                    raise ValueError("a dict entry is not a [key, value] pair")
                out[pair[0]] = _decode(pair[1], tensors, depth + 1)
            return out
    raise ValueError(f"unknown node {str(node)[:60]!r}")


def load_tree(path: str | Path) -> Any:
    """The state `save_tree` wrote. ArtifactError (one line naming `path`) for anything else."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        if _META_KEY not in meta:
            raise ValueError("no edgeseg structure in its metadata")
        return _decode(json.loads(meta[_META_KEY]), tensors)
    except (SafetensorError, OSError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{path}: not an edgeseg data file ({type(e).__name__}: {one_line(e)})") from None


__all__ = ["save_tree", "load_tree"]
