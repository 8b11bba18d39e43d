"""Core ML lowering: torch.export with the export-time rewrites coremltools 9.0 needs (bicubic resize as two
matmuls with constant matrices), the convertibility check that names the op and the fix, and `ct.convert`."""
from __future__ import annotations

import collections
import contextlib
import sys
from typing import Any, Iterator

import numpy as np

from edgeseg.errors import ArtifactError, UsageError, one_line
from edgeseg.models.wrapper import INPUT_NAME

# aten ops without a coremltools 9.0 converter, and what removes them.
_NO_CONVERTER = {
    "fft": "use the matmul-DFT back-end (edgeseg.models.prepare_for_export does this for AFM)",
    "complex": "use the matmul-DFT back-end (edgeseg.models.prepare_for_export does this for AFM)",
    "angle": "use the portable atan2 of the AFM module (prepare_for_export)",
    "view_as_real": "use the matmul-DFT back-end (prepare_for_export)",
}
# MIL op types that mean "quantized" in a program.


def deployment_target(name: str):
    import coremltools as ct

    t = getattr(ct.target, name, None)
    if t is None:
        known = [n for n in dir(ct.target) if not n.startswith("_")]
        raise UsageError(f"options.minimum_deployment_target: {name!r} is not a ct.target in coremltools "
                         f"{ct.__version__}; known: {', '.join(known)}")
    return t


# ----------------------------------------------------------------------------------------------------------------
# Export-time rewrite: bicubic resize as two matmuls (coremltools 9.0 has no upsample_bicubic2d converter)
# ----------------------------------------------------------------------------------------------------------------


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """PyTorch's cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor(src); t = src - floor."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def bicubic_matrix(n_in: int, n_out: int, align_corners: bool, scale_factor: float | None = None) -> np.ndarray:
    """(n_out, n_in) matrix M with `M @ x` == PyTorch's 1-D bicubic resize of x (upsample_bicubic2d along one axis).

    Source index as in aten's area_pixel_compute_source_index(cubic=True): align_corners -> dst*(in-1)/(out-1);
    else (dst+0.5)*scale-0.5 with scale = 1/scale_factor when given else in/out, not clamped; taps clamped.
    """
    dst = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = dst * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        scale = (1.0 / scale_factor) if scale_factor else n_in / n_out
        src = (dst + 0.5) * scale - 0.5
    i0 = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - i0)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for k in range(4):
        idx = np.clip(i0 - 1 + k, 0, n_in - 1)
        np.add.at(m, (np.arange(n_out), idx), w[:, k])
    return m.astype(np.float32)


@contextlib.contextmanager
def bicubic_as_matmul() -> Iterator[list]:
    """While active, `F.interpolate(..., mode="bicubic")` on a static 4-D shape becomes `Mh @ x @ Mw^T` with constant
    matrices (exact up to float rounding). Yields a list that records each rewrite ((in_hw, out_hw)).

    Needed with coremltools 9.0 (no upsample_bicubic2d converter); applied only around torch.export in this module.
    """
    import torch
    import torch.nn.functional as F

    original = F.interpolate
    rewrites: list = []

    def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                    recompute_scale_factor=None, antialias=False):
        if mode != "bicubic" or antialias or input.dim() != 4:
            return original(input, size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners,
                            recompute_scale_factor=recompute_scale_factor, antialias=antialias)
        h, w = int(input.shape[-2]), int(input.shape[-1])
        sf = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
        if size is not None:
            oh, ow = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
            sh = sw = None
        else:
            oh, ow = int(np.floor(h * sf[0])), int(np.floor(w * sf[1]))
            sh, sw = (None, None) if recompute_scale_factor else (float(sf[0]), float(sf[1]))
        ac = bool(align_corners)
        mh = torch.from_numpy(bicubic_matrix(h, oh, ac, sh)).to(input.dtype)
        mw = torch.from_numpy(bicubic_matrix(w, ow, ac, sw)).to(input.dtype)
        rewrites.append(((h, w), (oh, ow)))
        return torch.matmul(torch.matmul(mh, input), mw.transpose(0, 1))

    F.interpolate = interpolate
    try:
        yield rewrites
    finally:
        F.interpolate = original


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------


def export_program(model, example):
    """torch.export with the export-time rewrites, then `run_decompositions({})` (core ATen, as ct.convert needs).
    Returns (ExportedProgram, rewrites record)."""
    import torch

    with bicubic_as_matmul() as rewrites:
        ep = torch.export.export(model, (example,))
    ep = ep.run_decompositions({})
    check_convertible(ep)
    return ep, {"bicubic_as_matmul": [list(map(list, r)) for r in rewrites]} if rewrites else {}


def aten_ops(ep) -> dict[str, int]:
    c: collections.Counter = collections.Counter()
    for n in ep.graph.nodes:
        if n.op == "call_function":
            c[str(n.target)] += 1
    return dict(sorted(c.items()))


def check_convertible(ep) -> None:
    """Fail early, naming the op and the fix, for aten ops that coremltools 9.0 cannot convert."""
    for op in aten_ops(ep):
        for key, fix in _NO_CONVERTER.items():
            if key in op:
                raise ArtifactError(f"coreml: {op} has no Core ML converter (coremltools 9.0); {fix}")


def _convert(ep, precision_fp16: bool, options, input_shape, output_name: str):
    import coremltools as ct

    kwargs: dict[str, Any] = dict(
        convert_to="mlprogram", minimum_deployment_target=deployment_target(options.minimum_deployment_target),
        compute_precision=ct.precision.FLOAT16 if precision_fp16 else ct.precision.FLOAT32,
        compute_units=getattr(ct.ComputeUnit, options.compute_units),
        inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(input_shape), dtype=np.float32)],
        outputs=[ct.TensorType(name=output_name)],
        skip_model_load=sys.platform != "darwin")
    try:
        return ct.convert(ep, **kwargs)
    except NotImplementedError as e:
        raise ArtifactError(f"coreml: ct.convert failed: {one_line(e, with_type=True)} (coremltools {ct.__version__} has no "
                            "converter for it; lower it at export time in edgeseg/targets/coreml/lowering.py)") from e
    # any other failure: the exporter's stage ("ct.convert") makes it one line
