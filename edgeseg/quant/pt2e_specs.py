"""Backend-neutral pieces of PT2E quantization configs, used by the targets' quantizers (each exporter's
`quantizer(options, is_qat)`, edgeseg.export): fake quants that compute what convert freezes, symmetric
activations, 7-bit weights, and which inputs torchao's observers cannot take.

Must not import export runtimes at module level (torchao is imported inside functions).
"""
from __future__ import annotations

import dataclasses

import torch

# 7-bit int8 weights: u8 x s8 kernels on x86 CPUs without VNNI (VPMADDUBSW) saturate their int16 sums with full
# 8-bit weights (ONNX Runtime and OpenVINO on this machine); the exporters' PTQ uses reduce_range / NNCF's
# overflow fix for the same reason
WEIGHT_7BIT = {"quant_min": -64, "quant_max": 63}

_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


def unobservable(node, spec) -> bool:
    """True where torchao's observers cannot take the input: a value that is not a tensor (the dynamic batch
    size, a SymInt, which NNCF annotates as an input of offseg_t's shape arithmetic: "'int' object has no
    attribute 'detach'" at the first QAT step), or a per-channel spec on a tensor of fewer than 2 dims (a
    normalisation's bias)."""
    val = getattr(node, "meta", {}).get("val")
    if val is None:
        return False
    if not isinstance(val, torch.Tensor):
        return True
    return getattr(spec, "qscheme", None) in _PER_CHANNEL and val.dim() < 2


def fake_quant_spec(spec, reduce_weight_range: bool = False):
    """A QuantizationSpec whose observer is wrapped in a FakeQuantize (moving-average min/max); other specs
    (None, shared, derived, already fake-quant) unchanged. `reduce_weight_range`: per-channel int8 specs get
    WEIGHT_7BIT."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize, FakeQuantizeBase
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    if not isinstance(spec, QuantizationSpec):
        return spec
    ctr = spec.observer_or_fake_quant_ctr
    cls = getattr(getattr(ctr, "p", None), "func", ctr)
    if isinstance(cls, type) and issubclass(cls, FakeQuantizeBase):
        return spec
    extra = {}
    if spec.qscheme in _PER_CHANNEL:
        obs = MovingAveragePerChannelMinMaxObserver.with_args(ch_axis=spec.ch_axis or 0)
        if reduce_weight_range and spec.dtype == torch.int8:
            extra = WEIGHT_7BIT  # as the openvino exporter's NNCF overflow fix ("enable") does for PTQ
    else:
        obs = MovingAverageMinMaxObserver
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=obs), **extra)


def unfused_fake_quant(cfg):
    """A copy of a PT2E QuantizationConfig whose fused fake quants (FusedMovingAvgObsFakeQuantize) are plain
    FakeQuantize modules over the same moving-average observers.

    Why: the fused kernel picks symmetric scales with ATen's choose_qparams, max(|min| / 128, max / 127) for int8
    (|min| / 64, max / 63 for 7 bits), while convert_pt2e freezes the observer's max(|min|, max) / 127.5: training
    then fake-quantized every symmetric weight on a grid up to 0.8 % (7-bit: 1.6 %) off the one exported. The
    plain FakeQuantize asks its observer, so training and the converted program use the same scales."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    def plain(spec):
        if not isinstance(spec, QuantizationSpec):
            return spec
        ctr = spec.observer_or_fake_quant_ctr
        partial = getattr(ctr, "p", None)
        cls = getattr(partial, "func", ctr)
        if not (isinstance(cls, type) and issubclass(cls, FusedMovingAvgObsFakeQuantize)):
            return spec
        kw = dict(getattr(partial, "keywords", None) or {})  # eps
        kw.pop("observer", None)
        obs = MovingAveragePerChannelMinMaxObserver if spec.qscheme in _PER_CHANNEL else MovingAverageMinMaxObserver
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=obs, **kw))

    return dataclasses.replace(cfg, input_activation=plain(cfg.input_activation),
                               output_activation=plain(cfg.output_activation), weight=plain(cfg.weight),
                               bias=plain(cfg.bias))


def symmetric_activations(cfg):
    """A copy of a PT2E QuantizationConfig with symmetric per-tensor int8 activations (zero point 0), as
    TensorRT's explicit quantization requires."""
    def sym(spec):
        if spec is None:
            return None
        return dataclasses.replace(spec, qscheme=torch.per_tensor_symmetric)

    return dataclasses.replace(cfg, input_activation=sym(cfg.input_activation),
                               output_activation=sym(cfg.output_activation))


def weight_7bit(cfg):
    """A copy of a PT2E QuantizationConfig whose weights use the 7-bit range (WEIGHT_7BIT)."""
    return dataclasses.replace(cfg, weight=dataclasses.replace(cfg.weight, **WEIGHT_7BIT))


_symmetric_activations, _weight_7bit = symmetric_activations, weight_7bit  # (the parameters below shadow them)


def xnnpack_quantizer(per_channel: bool = True, is_qat: bool = False, weight_7bit: bool = False,
                      symmetric_activations: bool = False):
    """The XNNPACKQuantizer (from the executorch distribution: the one PT2E quantizer of this scheme; three
    targets' schemes start from it) with its symmetric int8 config: symmetric weights (per-channel unless
    `per_channel` is False), asymmetric per-tensor activations. Variants for the targets whose QAT scheme
    starts from it (their graphs export as ONNX QDQ): `weight_7bit` (ONNX Runtime's reduce_range, 7-bit weights)
    and `symmetric_activations` (TensorRT's explicit quantization, zero points of 0).

    For QAT (`is_qat`) the fused fake quants become plain ones that ask their observers for the scales
    (unfused_fake_quant), so training rounds like the converted program."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    cfg = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=is_qat)
    if symmetric_activations:
        cfg = _symmetric_activations(cfg)
    if weight_7bit:
        # with 8-bit weights, segnext_t_offset's QAT ONNX agreed 84.5 % with fp32 while its fake-quant
        # model scored within 0.4 mIoU
        cfg = _weight_7bit(cfg)
    if is_qat:
        cfg = unfused_fake_quant(cfg)
    return XNNPACKQuantizer().set_global(cfg)


__all__ = ["WEIGHT_7BIT", "unobservable", "fake_quant_spec", "unfused_fake_quant", "symmetric_activations",
           "weight_7bit", "xnnpack_quantizer"]
