"""Per-layer int8 sensitivity: SQNR of each conv/linear layer's int8-simulated output against float, and the
mIoU change when that layer alone is quantized, on a few validation images; sorted most fragile first.

Simulation (eager): the int8 scheme of the target the artifact is for (`scheme_for_target`, from the target's
profile options, resolved as its exporter resolves them): weight range (full 8-bit, or 7-bit where the exporter
picks ONNX Runtime's reduce_range / NNCF's overflow fix for this CPU), per-channel or per-tensor weight scales,
and the activation scheme (asymmetric uint8/int8, symmetric int8, NNCF's signedness-by-range, Core ML's symmetric
uint8, or none for weight-only). Activation ranges are the min/max of the layer input per image (MinMax); a target
whose calibration is not MinMax is refused. Without a scheme (`GENERIC`): symmetric per-channel int8 weights and
symmetric per-tensor int8 activations. Must not import export runtimes.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

log = logging.getLogger(__name__)
LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)


def fake_int8(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Symmetric int8 round trip (per-tensor, or per-channel along `dim`)."""
    if dim is None:
        scale = x.abs().max().clamp_min(1e-12) / 127
    else:
        red = [d for d in range(x.dim()) if d != dim]
        scale = x.abs().amax(dim=red, keepdim=True).clamp_min(1e-12) / 127
    return (x / scale).round().clamp(-128, 127) * scale


@dataclass(frozen=True)
class Int8Scheme:
    """How one target's exporter quantizes a conv/linear layer, as the eager simulation applies it.

    Weights: symmetric, q = clamp(round(w / s), w_qmin, w_qmax), s = absmax / w_div (per output channel or per
    tensor). `first_w_*`: another range for the model's first layer only (NNCF overflow fix "first_layer_only").
    Activations (the layer input, range per image): "asymmetric" (zero point from min/max over [a_qmin, a_qmax]),
    "symmetric" (s = absmax / a_div, zero point a_zero), "signed_by_range" (NNCF symmetric: unsigned 0..255 when
    the input is non-negative, else -128..127), or "none" (weight-only int8).
    """

    target: str
    description: str
    w_qmin: int = -128
    w_qmax: int = 127
    w_div: float = 127.0
    per_channel: bool = True
    first_w_qmin: int | None = None
    first_w_qmax: int | None = None
    first_w_div: float | None = None
    activations: str = "symmetric"
    a_qmin: int = -128
    a_qmax: int = 127
    a_div: float = 127.0
    a_zero: int = 0
    options: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


GENERIC = Int8Scheme(target="generic", description="symmetric per-channel int8 weights, symmetric per-tensor "
                                                   "int8 activations (no target)")


def fake_weight(w: torch.Tensor, dim: int, scheme: Int8Scheme, first: bool = False) -> torch.Tensor:
    """Symmetric int8 round trip of a weight in `scheme`'s range (per-channel along `dim`, or per-tensor)."""
    qmin, qmax, div = scheme.w_qmin, scheme.w_qmax, scheme.w_div
    if first and scheme.first_w_div is not None:
        qmin, qmax, div = scheme.first_w_qmin, scheme.first_w_qmax, scheme.first_w_div
    if scheme.per_channel:
        red = [d for d in range(w.dim()) if d != dim]
        absmax = w.abs().amax(dim=red, keepdim=True)
    else:
        absmax = w.abs().max()
    scale = absmax.clamp_min(1e-12) / div
    return (w / scale).round().clamp(qmin, qmax) * scale


def fake_activation(x: torch.Tensor, scheme: Int8Scheme) -> torch.Tensor:
    """Per-tensor int8 round trip of a layer input in `scheme`'s activation scheme (range: this tensor's)."""
    kind = scheme.activations
    if kind == "none":
        return x
    if kind == "asymmetric":
        lo, hi = x.min().clamp_max(0.0), x.max().clamp_min(0.0)
        scale = ((hi - lo) / (scheme.a_qmax - scheme.a_qmin)).clamp_min(1e-12)
        zero = (scheme.a_qmin - lo / scale).round().clamp(scheme.a_qmin, scheme.a_qmax)
        return ((x / scale).round() + zero).clamp(scheme.a_qmin, scheme.a_qmax).sub(zero) * scale
    if kind == "signed_by_range":
        if float(x.min()) >= 0.0:
            scale = x.max().clamp_min(1e-12) / 255
            return (x / scale).round().clamp(0, 255) * scale
        scale = x.abs().max().clamp_min(1e-12) / 127
        return (x / scale).round().clamp(-128, 127) * scale
    scale = x.abs().max().clamp_min(1e-12) / scheme.a_div
    z = scheme.a_zero
    return ((x / scale).round() + z).clamp(scheme.a_qmin, scheme.a_qmax).sub(z) * scale


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    noise = (ref.double() - test.double()).pow(2).sum().item()
    sig = ref.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)


class _Quantized:
    """Context: layer `mod` runs with int8-simulated weights and input, in `scheme`."""

    def __init__(self, mod: nn.Module, scheme: Int8Scheme = GENERIC, first: bool = False):
        self.mod, self.scheme, self.first = mod, scheme, first

    def __enter__(self):
        self.w = self.mod.weight.data.clone()
        dim = 1 if isinstance(self.mod, nn.ConvTranspose2d) else 0
        self.mod.weight.data = fake_weight(self.w, dim, self.scheme, self.first)
        self.h = self.mod.register_forward_pre_hook(
            lambda m, a: (fake_activation(a[0], self.scheme),) + tuple(a[1:]))
        return self

    def __exit__(self, *exc):
        self.mod.weight.data = self.w
        self.h.remove()


REF_BYTES = 256 << 20  # float reference outputs held at once


def _outputs(model: nn.Module, mods: Sequence[nn.Module], inputs) -> list[list[torch.Tensor]]:
    """Each module's output for each input, from one pass of the model per input."""
    outs: list[list[torch.Tensor]] = [[] for _ in mods]
    hooks = [m.register_forward_hook(lambda _m, _a, y, i=i: outs[i].append(y.detach())) for i, m in enumerate(mods)]
    try:
        with torch.no_grad():
            for x in inputs:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _chunks(model: nn.Module, mods: dict, names: Sequence[str], inputs, budget: int) -> list[list[str]]:
    """`names` split into runs whose float outputs over all inputs fit in `budget` bytes (sizes from one pass on
    the first input; a module called several times counts every call)."""
    sizes = [0] * len(names)
    hooks = [mods[n].register_forward_hook(lambda _m, _a, y, i=i: sizes.__setitem__(i, sizes[i] + y.numel() * 4))
             for i, n in enumerate(names)]
    try:
        with torch.no_grad():
            model(inputs[0])
    finally:
        for h in hooks:
            h.remove()
    chunks, cur, used = [], [], 0
    for name, size in zip(names, sizes):
        need = size * len(inputs)
        if cur and used + need > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += need
    return chunks + ([cur] if cur else [])


def layer_sensitivity(model: nn.Module, inputs: Sequence[torch.Tensor],
                      miou_fn: Callable[[nn.Module], float] | None = None, layers: Sequence[str] | None = None,
                      progress: bool = False, scheme: Int8Scheme | None = None) -> list[dict[str, Any]]:
    """Rows {layer, type, sqnr_db, miou_delta (None without miou_fn)}, sorted most sensitive first (largest mIoU
    drop, then lowest SQNR).

    Args:
        model: eager model in eval mode.
        inputs: normalised float32 (N, 3, H, W) tensors.
        miou_fn: model -> mIoU on the validation images (called once in float, then once per layer).
        layers: module names to test (default: every Conv2d/Linear/ConvTranspose2d).
        scheme: the int8 scheme simulated (`scheme_for_target`); default GENERIC.
    """
    from tqdm import tqdm

    model.eval()
    scheme = scheme or GENERIC
    all_layers = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    names = list(layers) if layers else all_layers
    first_layer = all_layers[0] if all_layers else None  # NNCF's "first layer" (overflow fix first_layer_only)
    mods = dict(model.named_modules())
    base = miou_fn(model) if miou_fn else None
    rows = []
    bar = tqdm(total=len(names), desc="layers", disable=not progress)
    # the float outputs do not depend on which layer is quantized: capture them for a chunk of layers in one
    # pass (chunks bounded in memory), then run one quantized pass per layer
    for chunk in _chunks(model, mods, names, inputs, REF_BYTES):
        ref = _outputs(model, [mods[n] for n in chunk], inputs)
        for name, mod_ref in zip(chunk, ref):
            mod = mods[name]
            with _Quantized(mod, scheme, first=name == first_layer):
                (got,) = _outputs(model, [mod], inputs)
                delta = (miou_fn(model) - base) if miou_fn else None
            s = sqnr_db(torch.cat([r.flatten() for r in mod_ref]), torch.cat([g.flatten() for g in got]))
            rows.append({"layer": name, "type": type(mod).__name__, "sqnr_db": s, "miou_delta": delta})
            bar.update(1)
    bar.close()
    rows.sort(key=lambda r: ((r["miou_delta"] if r["miou_delta"] is not None else 0.0), r["sqnr_db"]))
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'rank':>4}  {'layer':<48} {'type':<16} {'SQNR dB':>8} {'dmIoU':>7}"]
    for i, r in enumerate(rows, 1):
        d = "" if r["miou_delta"] is None else f"{100 * r['miou_delta']:+.2f}"
        lines.append(f"{i:>4}  {r['layer']:<48} {r['type']:<16} {r['sqnr_db']:>8.2f} {d:>7}")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path, top: int = 30) -> None:
    """Horizontal bar plot of SQNR per layer (most sensitive on top) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeseg.fileio import atomic_path

    rows = list(rows)[:top]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    vals = [min(r["sqnr_db"], 80.0) for r in rows]
    ax.barh(range(len(rows)), vals, color="tab:red")
    ax.set_yticks(range(len(rows)), [r["layer"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR of int8 output vs float (dB)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def checkpoint_sensitivity(checkpoint, data, limit: int = 8, split: str = "val", progress: bool = True,
                           scheme: Int8Scheme | None = None) -> list[dict[str, Any]]:
    """`layer_sensitivity` of a checkpoint on the first `limit` images of `data`'s split, in `scheme`."""
    from edgeseg.checkpoint import load_checkpoint
    from edgeseg.data.formats import open_dataset
    from edgeseg.data.transforms import preprocess
    from edgeseg.eval.metrics import SegMetrics

    model, spec = load_checkpoint(checkpoint)
    ds = open_dataset(data, split=split)
    pairs = [ds[i] for i in range(min(limit, len(ds)))]
    inputs = [torch.from_numpy(preprocess(img, spec.input_hw, spec.mean, spec.std))[None] for img, _ in pairs]

    def miou(m: nn.Module) -> float:
        met = SegMetrics(spec.num_classes, spec.ignore_index)
        with torch.no_grad():
            for x, (_, lab) in zip(inputs, pairs):
                y = torch.nn.functional.interpolate(m(x), size=lab.shape, mode="bilinear", align_corners=False)
                met.update(y.argmax(1)[0].numpy(), lab)
        return float(met.compute()["miou"])

    return layer_sensitivity(model, inputs, miou, progress=progress, scheme=scheme)


__all__ = ["fake_int8", "fake_weight", "fake_activation", "Int8Scheme", "GENERIC", "sqnr_db",
           "layer_sensitivity", "checkpoint_sensitivity", "format_table", "plot"]
