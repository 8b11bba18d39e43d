"""Parameter and multiply-accumulate counts with PyTorch's own `torch.utils.flop_counter`.

MACs = FLOPs / 2 (the counter counts a multiply-add as two FLOPs). One forward of a 1×3×H×W zero input in
eval mode under `no_grad`, on the CPU. Buckets (aten ops seen by the dispatcher; composite ops such as
`matmul`, `linear`, `einsum` reach it as the ops below):

- `gmac_conv`: `aten.convolution`, `aten._convolution`, `aten.cudnn_convolution`,
  `aten.convolution_overrideable`, `aten._slow_conv2d_forward` (every convolution, transposed included;
  depth-wise and grouped convolutions count their real, grouped work).
- `gmac_matmul`: `aten.mm`, `aten.addmm`, `aten.bmm`, `aten.baddbmm`, `aten._scaled_mm` and the fused
  scaled-dot-product-attention kernels (flash / efficient / cudnn and the CPU flash kernel, which PyTorch's
  table lacks and is added here with the same formula: the two batched matmuls Q·Kᵀ and A·V).
- `gmac_total`: everything the counter saw (the two buckets above; element-wise ops, norms, resizes,
  softmax and FFTs are not counted by torch's counter and appear in no bucket).

`count_registered` builds a registered variant on the meta device (no weight initialisation, no arithmetic:
the counter only needs shapes) and falls back to a real CPU forward for a model that needs data. The counts are
the same either way (tested).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.utils import flop_counter as _fc

log = logging.getLogger(__name__)

_CONV_OPS = ("convolution", "_convolution", "cudnn_convolution", "convolution_overrideable",
             "_slow_conv2d_forward")


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in _fc.flop_registry:
        mapping[op] = _cpu_sdpa_flop
    return mapping


def _op_name(op) -> str:
    # aten.convolution.default -> "convolution"
    name = str(op)
    if name.startswith("aten."):
        name = name[5:]
    return name.split(".")[0]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count(model: nn.Module, input_hw: tuple[int, int] | int = (512, 512)) -> dict:
    """Count one forward at 1×3×H×W: `dict(params, gmac_total, gmac_conv, gmac_matmul, input_hw)`.

    GMAC = 1e9 multiply-accumulates. The model's train/eval mode is restored afterwards.
    """
    if isinstance(input_hw, int):
        input_hw = (input_hw, input_hw)
    h, w = int(input_hw[0]), int(input_hw[1])
    was_training = model.training
    model.eval()
    try:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        x = torch.zeros(1, 3, h, w, device=device, dtype=dtype)
        counter = _fc.FlopCounterMode(display=False, custom_mapping=_custom_mapping())
        with counter:
            model(x)
        per_op = counter.get_flop_counts().get("Global", {})
    finally:
        model.train(was_training)
    conv = matmul = total = 0
    for op, flops in per_op.items():
        total += flops
        if _op_name(op) in _CONV_OPS:
            conv += flops
        else:
            matmul += flops
    return {
        "params": count_params(model),
        "gmac_total": total / 2 / 1e9,
        "gmac_conv": conv / 2 / 1e9,
        "gmac_matmul": matmul / 2 / 1e9,
        "input_hw": [h, w],
    }


def count_registered(name: str, num_classes: int, sizes, **model_kwargs) -> list[dict]:
    """`count` of the registered model `name` at each of `sizes` ((H, W) pairs); one model is built.

    Built and run on the meta device where the model allows it (its __init__ and forward need no tensor data);
    otherwise (any error on meta) built with seed 0 and run on the CPU, where a real error surfaces again.
    """
    from edgeseg.models import create_model

    try:
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes, **model_kwargs)
        return [count(model, hw) for hw in sizes]
    except Exception as e:  # noqa: BLE001  (the CPU path below re-raises whatever is a real error)
        log.debug("%s: counting on the CPU (meta device: %s: %s)", name, type(e).__name__, e)
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, **model_kwargs)
    return [count(model, hw) for hw in sizes]
