"""Checkpoints: a folder with `model.safetensors` (weights) and `model.json` (ModelSpec).

Loading never unpickles: weights come from safetensors; official `.pth` files go through
`torch.load(weights_only=True)` in `load_state_dict_file`; a QAT checkpoint's fake-quant state (`quant.params`) is a
safetensors file read by `edgeseg.export.qat_checkpoint` (format: edgeseg.quant.qat_program). Every path in
`model.json` must stay inside the checkpoint folder.
"""
from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn

from edgeseg.errors import ArtifactError, one_line
from edgeseg.fileio import atomic_dir, write_json
from edgeseg.types import ModelSpec

WEIGHTS = "model.safetensors"
SPEC = "model.json"


def save_checkpoint(path: str | Path, model: nn.Module, spec: ModelSpec, force: bool = True,
                    dtype: torch.dtype | None = None,
                    extra: Mapping[str, Callable[[Path], None]] | None = None) -> Path:
    """Write `path/` atomically. `dtype=torch.float16` stores float weights in fp16 (the shipped defaults).

    `extra` = {file name: writer}: each writer gets the file's path inside the temporary folder (a QAT program),
    so the folder appears complete or not at all. Raises UsageError if `path` exists and `force` is false.
    """
    from safetensors.torch import save_file

    state, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        # safetensors refuses tensors that share memory; a QAT graph's shared observers (one observer module
        # under several names: concat/add inputs) have them. Each name gets its own copy; loading fills both.
        key = v.untyped_storage().data_ptr() if v.numel() else None
        if key in seen:
            v = v.clone()
        elif key is not None:
            seen.add(key)
        state[k] = v
    with atomic_dir(path, force=force) as tmp:
        save_file(state, str(tmp / WEIGHTS))
        for name, write in (extra or {}).items():
            write(tmp / name)
        write_json(tmp / SPEC, spec.to_json())
    return Path(path)


def contained_file(folder: str | Path, rel, key: str, where: str | Path) -> Path:
    """`folder / rel` for a path `rel` read from a file (`where`, its field `key`); ArtifactError (one line naming
    both) unless `rel` is a non-empty relative string without `..` that resolves inside `folder` (symlinks
    followed): a downloaded checkpoint must not make us read files elsewhere."""
    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{where}: {key} {rel!r:.200} {why}; it must be a file name inside {folder}")

    if not isinstance(rel, str) or not rel or any(ord(c) < 32 for c in rel):  # control characters: no file of ours
        raise bad("is not a file path")
    if Path(rel).is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise bad("is an absolute path")
    if ".." in rel.replace("\\", "/").split("/"):
        raise bad("climbs out with '..'")
    try:
        base = Path(folder).resolve()
        full = (Path(folder) / rel).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise bad(f"cannot be resolved ({e})") from None
    if full == base or not full.is_relative_to(base):
        raise bad("resolves outside the folder")
    return Path(folder) / rel


def load_spec(path: str | Path) -> ModelSpec:
    path = Path(path)
    spec_file = path / SPEC if path.is_dir() else path.with_name(SPEC)
    if not spec_file.is_file():
        raise ArtifactError(f"{spec_file}: missing; a checkpoint is a folder with {WEIGHTS} and {SPEC}")
    try:
        d = json.loads(spec_file.read_text())
        if not isinstance(d, dict):
            raise TypeError(f"a JSON object expected, got {type(d).__name__}")
        why = _value_problem(d)
        spec = None if why else ModelSpec.from_json(d)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{spec_file}: not a valid edgeseg model.json ({type(e).__name__}: "
                            f"{one_line(e)})") from None
    why = why or _spec_problem(spec)
    if why:
        raise ArtifactError(f"{spec_file}: not a valid edgeseg model.json ({why})")
    if spec.quant is not None and "params" in spec.quant:
        contained_file(spec_file.parent, spec.quant["params"], "quant.params", spec_file)
    return spec


def _value_problem(d: dict) -> str | None:
    """What is wrong with the numbers of a raw model.json (before ModelSpec.from_json rounds or converts them):
    mean/std must be 3 finite numbers (std > 0), palette RGB integers in 0..255, input_hw two positive integers.
    None if nothing; the message starts with the key."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_finite(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key in ("mean", "std"):
        v = d.get(key, (1.0, 1.0, 1.0))
        if not isinstance(v, list | tuple) or len(v) != 3 or not all(is_finite(x) for x in v):
            return f"{key}: expected 3 finite numbers, got {str(v)[:80]}"
        if key == "std" and not all(x > 0 for x in v):
            return f"std: expected positive values, got {list(v)}"
    palette = d.get("palette")
    if isinstance(palette, list | tuple):
        for i, c in enumerate(palette):
            if not isinstance(c, list | tuple) or len(c) != 3 or not all(is_int(x) and 0 <= x <= 255 for x in c):
                return f"palette[{i}]: expected an RGB triple of integers in 0..255, got {str(c)[:80]}"
    hw = d.get("input_hw")
    if not isinstance(hw, list | tuple) or len(hw) != 2 or not all(is_int(x) and x > 0 for x in hw):
        return f"input_hw: expected [H, W] with positive integers, got {str(hw)[:80]}"
    return None


def _spec_problem(spec: ModelSpec) -> str | None:
    """What is wrong with the field types of a parsed model.json (None if nothing)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(spec.model, str) or not spec.model:
        return f"model: expected a model name, got {spec.model!r}"
    if not is_int(spec.num_classes) or spec.num_classes < 1:
        return f"num_classes: expected a positive integer, got {spec.num_classes!r}"
    if len(spec.class_names) != spec.num_classes or not all(isinstance(n, str) for n in spec.class_names):
        return f"class_names: expected {spec.num_classes} names"
    if len(spec.palette) != spec.num_classes or any(len(c) != 3 for c in spec.palette):
        return f"palette: expected {spec.num_classes} RGB triples"
    if not is_int(spec.ignore_index):
        return f"ignore_index: expected an integer, got {spec.ignore_index!r}"
    if len(spec.input_hw) != 2 or min(spec.input_hw) < 1:
        return f"input_hw: expected [H, W] with positive integers, got {list(spec.input_hw)}"
    if len(spec.mean) != 3 or len(spec.std) != 3 or not all(v > 0 for v in spec.std):
        return "mean/std: expected 3 values each (std > 0)"
    for name in ("model_kwargs", "metrics", "provenance"):
        if not isinstance(getattr(spec, name), dict):
            return f"{name}: expected a JSON object"
    if spec.quant is not None and not isinstance(spec.quant, dict):
        return "quant: expected a JSON object or null"
    return None


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model from `model.json` and load `model.safetensors` strictly. Returns (model in eval, spec)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from edgeseg.models import create_model

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: checkpoint not found")
    spec = load_spec(path)
    wfile = path / WEIGHTS if path.is_dir() else path
    if not wfile.is_file():
        raise ArtifactError(f"{wfile}: missing weights file")
    try:
        state = load_file(str(wfile), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{wfile}: corrupted or not a safetensors file ({e})") from None
    from edgeseg.models import list_models

    if spec.model not in list_models():
        raise ArtifactError(f"{path / SPEC if path.is_dir() else path.with_name(SPEC)}: unknown model "
                            f"{spec.model!r} (not registered in this edgeseg; see `edgeseg models`)")
    try:
        model = create_model(spec.model, num_classes=spec.num_classes, **spec.model_kwargs)
    except (TypeError, ValueError) as e:  # model_kwargs that the model does not take
        raise ArtifactError(f"{path}: cannot build model {spec.model!r} from {SPEC} "
                            f"({type(e).__name__}: {one_line(e)})") from None
    _refuse_non_finite(state, wfile)
    ref = model.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
    bad = [k for k, v in state.items() if k in ref and tuple(v.shape) != tuple(ref[k].shape)]
    if bad:  # torch's own message is many lines that name neither the file nor, in its first line, the key
        raise ArtifactError(f"{wfile}: {bad[0]} has shape {list(state[bad[0]].shape)} but model {spec.model!r} "
                            f"with {spec.num_classes} classes expects {list(ref[bad[0]].shape)}"
                            + (f" ({len(bad) - 1} more tensor(s) differ)" if len(bad) > 1 else ""))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"{wfile}: does not match model {spec.model!r} (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    model.eval()
    return model, spec


def _refuse_non_finite(state: Mapping[str, torch.Tensor], wfile: Path) -> None:
    """ArtifactError (one line naming the file and the first tensor) if a floating-point weight holds NaN or
    infinity: such a model outputs garbage that every comparison with itself would call a perfect match."""
    for k, v in state.items():
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            what = "NaN" if bool(torch.isnan(v).any()) else "infinite values"
            raise ArtifactError(f"{wfile}: tensor {k!r} holds {what}; refusing non-finite weights")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official mmseg/mmengine checkpoint safely: `{'state_dict': ...}` or a bare state dict.

    Raises ArtifactError for a pickle that carries code (weights_only refuses it) or a non-tensor payload.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ArtifactError(f"{path}: corrupted or not a safetensors file ({one_line(e)})") from None
    try:
        with warnings.catch_warnings():  # a plain pickle (protocol > 2) makes torch warn before it refuses it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's first line advises weights_only=False; the reason ("unsupported GLOBAL posix.system") follows
        why = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()
               and not ln.startswith(("Please file an issue", "Check the documentation"))]
        raise ArtifactError(f"{path}: refused to load: the pickle holds code or objects other than tensors "
                            f"(loaded with weights_only=True; {why[0] if why else one_line(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ArtifactError(f"{path}: truncated or not a PyTorch checkpoint ({one_line(e)})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ArtifactError(f"{path}: expected a state dict of tensors")
    return obj


def ship_half(src: str | Path, dst: str | Path, note: str | None = None, force: bool = False) -> Path:
    """Re-save a checkpoint with fp16 weights (how the embedded defaults are shipped: half the size).

    `note` (e.g. a data licence) is written as LICENSE.md beside the weights, inside the same atomic folder.
    Raises UsageError if `dst` exists and `force` is false.
    Usage: `python -m edgeseg.checkpoint SRC DST [LICENSE.md] [--force]`.
    """
    from edgeseg.outputs import Output, check_outputs

    check_outputs(force, [Output("DST", dst, "dir")], [("SRC", src)])
    model, spec = load_checkpoint(src)
    extra = {"LICENSE.md": lambda p: p.write_text(note)} if note else None
    return save_checkpoint(dst, model, spec, force=force, dtype=torch.float16, extra=extra)


def _main(argv: list[str]) -> int:
    import sys

    from edgeseg.errors import EdgesegError

    force = "--force" in argv
    args = [a for a in argv if a != "--force"]
    if not 2 <= len(args) <= 3 or any(a.startswith("-") for a in args):
        print("usage: python -m edgeseg.checkpoint SRC DST [LICENSE.md] [--force]", file=sys.stderr)
        return 2
    try:
        note = Path(args[2]).read_text() if len(args) > 2 else None
    except (OSError, UnicodeDecodeError) as e:
        print(f"edgeseg: error: {args[2]}: cannot read the licence note ({type(e).__name__})", file=sys.stderr)
        return 1
    try:
        print(ship_half(args[0], args[1], note, force=force))
    except EdgesegError as e:
        print(f"edgeseg: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":  # python -m edgeseg.checkpoint SRC DST [LICENSE.md] [--force]
    import sys

    raise SystemExit(_main(sys.argv[1:]))
