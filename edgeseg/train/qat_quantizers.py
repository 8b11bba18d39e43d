"""The PT2E quantizer of each target's QAT scheme (`target_quantizer`), made usable for training: fake quants that
compute what convert freezes, explicit input specs for torchao's conv-BN fusion, 7-bit weights where a target's
int8 kernels need them. See edgeseg.train.qat for the whole flow.
"""
from __future__ import annotations

import dataclasses

import torch

from edgeseg.errors import UsageError
from edgeseg.quant.qat_program import QAT_TARGETS

# 7-bit int8 weights: u8 x s8 kernels on x86 CPUs without VNNI (VPMADDUBSW) saturate their int16 sums with full
# 8-bit weights (ONNX Runtime and OpenVINO on this machine); the exporters' PTQ uses reduce_range / NNCF's
# overflow fix for the same reason
WEIGHT_7BIT = {"quant_min": -64, "quant_max": 63}

# quantizer family -> export targets that carry its converted graph faithfully (the jetson-tensorrt ONNX needs
# zero points of 0, openvino needs float weights behind q/dq pairs, Core ML its own scheme)


def target_quantizer(target: str, per_channel: bool = True, is_qat: bool = True):
    """The PT2E quantizer matching `target`'s int8 scheme.

    Raises:
        UsageError: unknown target, or its quantizer cannot be imported here (names the package).
    """
    if target not in QAT_TARGETS:
        raise UsageError(f"--target: no QAT scheme for {target!r}; known: {', '.join(QAT_TARGETS)}")
    family = QAT_TARGETS[target][0]
    try:
        if family.startswith("xnnpack"):
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )

            cfg = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=is_qat)
            if family == "xnnpack-symmetric":
                cfg = _symmetric_activations(cfg)
            if family == "xnnpack-7bit":
                # with 8-bit weights, segnext_t_offset's QAT ONNX agreed 84.5 % with fp32 while its fake-quant
                # model scored within 0.4 mIoU
                cfg = dataclasses.replace(cfg, weight=dataclasses.replace(cfg.weight, **WEIGHT_7BIT))
            return XNNPACKQuantizer().set_global(_unfused_fake_quant(cfg))
        if family == "nncf-int8-sym":
            return openvino_qat_quantizer()
        if family == "coreml-w8a8":
            from edgeseg.export.coreml import coreml_quantizer

            # the exporter's quantizer: memoised patterns (one prepare costs ~110 s without) and a node filter
            # for the float policy (executorch 1.5.1's CoreMLQuantizer has neither)
            return coreml_quantizer(per_channel=per_channel)
    except ImportError as e:
        raise UsageError(f"--target {target}: its QAT quantizer is not importable here ({e})") from None
    raise UsageError(f"--target {target}: no quantizer")  # pragma: no cover


def openvino_qat_quantizer():
    """executorch's OpenVINOQuantizer (NNCF's INT8_SYM scheme) made usable for PT2E QAT and the float policy.

    * It annotates activations on the producer's output, so a conv's `input_qspec_map` holds only its weight;
      torchao 0.18's conv-BN QAT fusion maps that dict by position (input, weight, bias) and failed with
      IndexError on every conv+BN (measured on qat_tiny). An explicit `None` input entry (no extra observer:
      the producer's output observer still quantizes it) restores the positions.
    * Its specs name plain observers (HistogramObserver, PerChannelMinMaxObserver), which prepare_qat_pt2e would
      insert as is: training would then see float activations and weights, not int8. `_fake_quant_spec` swaps
      in FakeQuantize modules with moving-average observers of the same dtype/range/qscheme (the XNNPACK QAT
      configuration's choice), so the forward pass rounds like the OpenVINO int8 model will.
    * `set_filter_function(keep)`: nodes with `keep(node)` False go to NNCF's ignored scope by FX node name
      (OpenVINOQuantizer has no module-name hook).
    * It gives LayerNorm/GroupNorm biases (1-D) a per-channel weight spec; torchao's per-channel observer
      flattens from dim 1 and fails on them (IndexError at the first QAT step of segnext_t_offset), so those stay
      float; so do non-tensor inputs such as the dynamic batch size (`_unobservable`).
    """
    from executorch.backends.openvino.quantizer import OpenVINOQuantizer
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    class QatOpenVINOQuantizer(OpenVINOQuantizer):
        filter_fn = None

        def set_filter_function(self, fn):
            self.filter_fn = fn
            return self

        def annotate(self, model):
            if self.filter_fn is not None:
                names = [n.name for n in model.graph.nodes if n.op == "call_function" and not self.filter_fn(n)]
                if names:
                    self.set_ignored_scope(names=names, validate=False)
            model = super().annotate(model)
            for n in model.graph.nodes:
                qa = n.meta.get("quantization_annotation")
                if not isinstance(qa, QuantizationAnnotation):
                    continue
                qa.input_qspec_map = {k: _fake_quant_spec(v, reduce_weight_range=True)
                                      for k, v in qa.input_qspec_map.items() if not _unobservable(k, v)}
                own = n.meta.get("val")
                qa.output_qspec = (None if own is not None and not isinstance(own, torch.Tensor)
                                   else _fake_quant_spec(qa.output_qspec))
                if (n.op == "call_function" and n.args and "conv" in str(n.target)
                        and n.args[0] not in qa.input_qspec_map):
                    qa.input_qspec_map = {n.args[0]: None, **qa.input_qspec_map}
            return model

    return QatOpenVINOQuantizer()


def _unobservable(node, spec) -> bool:
    """True where torchao's observers cannot take the input: a value that is not a tensor (the dynamic batch
    size, a SymInt, which NNCF annotates as an input of offseg_t's shape arithmetic: "'int' object has no
    attribute 'detach'" at the first QAT step), or a per-channel spec on a tensor of fewer than 2 dims (a
    normalisation's bias)."""
    val = getattr(node, "meta", {}).get("val")
    if val is None:
        return False
    if not isinstance(val, torch.Tensor):
        return True
    return (getattr(spec, "qscheme", None) in (torch.per_channel_symmetric, torch.per_channel_affine)
            and val.dim() < 2)


def _fake_quant_spec(spec, reduce_weight_range: bool = False):
    """A QuantizationSpec whose observer is wrapped in a FakeQuantize (moving-average min/max); other specs
    (None, shared, derived, already fake-quant) unchanged."""
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
    if spec.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
        obs = MovingAveragePerChannelMinMaxObserver.with_args(ch_axis=spec.ch_axis or 0)
        if reduce_weight_range and spec.dtype == torch.int8:
            extra = WEIGHT_7BIT  # as the openvino exporter's NNCF overflow fix ("enable") does for PTQ
    else:
        obs = MovingAverageMinMaxObserver
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=obs), **extra)


def _unfused_fake_quant(cfg):
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
        per_channel = spec.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        obs = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=obs, **kw))

    return dataclasses.replace(cfg, input_activation=plain(cfg.input_activation),
                               output_activation=plain(cfg.output_activation), weight=plain(cfg.weight),
                               bias=plain(cfg.bias))


def _symmetric_activations(cfg):
    """A copy of a PT2E QuantizationConfig with symmetric per-tensor int8 activations (zero point 0), as
    TensorRT's explicit quantization requires."""
    def sym(spec):
        if spec is None:
            return None
        return dataclasses.replace(spec, qscheme=torch.per_tensor_symmetric)

    return dataclasses.replace(cfg, input_activation=sym(cfg.input_activation),
                               output_activation=sym(cfg.output_activation))
