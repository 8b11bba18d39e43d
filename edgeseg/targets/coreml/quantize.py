"""Core ML int8: the PT2E `CoreMLQuantizer` (W8A8; memoised patterns, the float policy's node filter), the PT2E
calibrate-and-convert, and weight-only int8 of a converted program (constants whose channels are all zero or would
underflow get a per-tensor scale or stay float, so no scale is 0)."""
from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np

from edgeseg.errors import ArtifactError, one_line
from edgeseg.targets.coreml.lowering import bicubic_as_matmul
from edgeseg.quant.calibration import CalibrationData

log = logging.getLogger(__name__)


def _cached_patterns() -> None:
    """Speed up executorch 1.5.1's CoreMLQuantizer: every `prepare_pt2e` re-traces ~400 small pattern modules with
    torch.export (measured: 405 traces, ~110 s of CPU per call on this host, whatever the model size). The pattern
    builders take hashable arguments, so they are memoised per process and each call gets a deep copy (the
    matcher rewrites the pattern graph's output in place); and the 1-D/3-D convolution patterns (our models have only 2-D convolutions) are answered with the 2-D pattern, which
    the matcher then skips as already annotated. Patched in place once; annotation results are unchanged."""
    import copy
    import functools

    import executorch.backends.apple.coreml.quantizer._coreml_quantizer_utils as utils

    if getattr(utils, "_edgeseg_cached", False):
        return

    def copying(fn):
        memo = functools.lru_cache(maxsize=None)(fn)

        @functools.wraps(fn)
        def get(*args, **kwargs):
            return copy.deepcopy(memo(*args, **kwargs))

        return get

    for name in ("get_conv_pattern", "get_conv_bn_pattern", "get_linear_pattern", "get_linear_bn_pattern",
                 "get_binary_op_act_pattern"):
        fn = getattr(utils, name, None)
        if fn is None:
            continue
        cached = copying(fn)
        if name in ("get_conv_pattern", "get_conv_bn_pattern"):
            def conv2d_only(conv_dim, *args, _cached=cached, **kwargs):
                return _cached(2, *args, **kwargs)

            setattr(utils, name, conv2d_only)
        else:
            setattr(utils, name, cached)
    utils._edgeseg_cached = True


def coreml_quantizer(per_channel: bool = True):
    """Core ML's W8A8 PT2E quantizer: int8 symmetric per-channel (or per-tensor) weights, uint8 per-tensor
    activations. The same object serves PTQ (prepare_pt2e) and QAT (prepare_qat_pt2e, edgeseg.quant.qat).

    The returned quantizer also takes `set_filter_function(keep)` (nodes for which `keep(node)` is False stay
    unannotated, i.e. float), which `edgeseg.quant.policy.FloatPolicy.apply_pt2e` uses; executorch 1.5.1's
    CoreMLQuantizer has no such hook (its per-module configs would cost one more pattern-matching pass per module)."""
    import torch
    from coremltools.optimize.torch.quantization.quantization_config import LinearQuantizerConfig
    from executorch.backends.apple.coreml.quantizer import CoreMLQuantizer

    _cached_patterns()

    class FilteredCoreMLQuantizer(CoreMLQuantizer):
        filter_fn = None

        def set_filter_function(self, fn):
            self.filter_fn = fn
            return self

        def _annotate_all_patterns(self, model, quantization_config, filter_fn=None):
            keep = self.filter_fn
            if keep is not None:
                inner = filter_fn

                def filter_fn(n, _keep=keep, _inner=inner):  # noqa: E731 - combined: both must accept the node
                    return _keep(n) and (_inner is None or _inner(n))

            return super()._annotate_all_patterns(model, quantization_config, filter_fn)

    cfg = LinearQuantizerConfig.from_dict({"global_config": {
        "quantization_scheme": "symmetric", "activation_dtype": torch.quint8, "weight_dtype": torch.qint8,
        "weight_per_channel": bool(per_channel)}})
    return FilteredCoreMLQuantizer(cfg)


def quantize_w8a8(model, calib: CalibrationData, policy=None):
    """PT2E PTQ with CoreMLQuantizer: returns (the converted (quantize/dequantize) torch GraphModule, number of
    FX ops left in float by `policy`).

    `policy` (edgeseg.quant.policy.FloatPolicy) keeps its modules unannotated. Needed for NMF2D (SegNeXt's
    LightHam): CoreMLQuantizer's observers are FakeQuantize modules that quantize while calibrating, so NMF's
    multiplicative updates divide by int8-rounded denominators; measured on test_segnext (executorch 1.5.1,
    torchao 0.18): the observer after `decode_head.hamburger.ham`'s last division saw inf/NaN and calibration
    failed with "min nan should be less than max nan"."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = model.example_input()
    try:
        with bicubic_as_matmul():
            gm = torch.export.export(model, (example,)).module()
        quantizer = coreml_quantizer()
        if policy is not None:
            quantizer = policy.apply_pt2e(quantizer)
        prepared = prepare_pt2e(gm, quantizer)
        float_ops = 0 if policy is None else sum(
            1 for n in prepared.graph.nodes if n.op == "call_function" and policy.node_is_float(n))
        with torch.no_grad():
            for x in calib.inputs:
                prepared(x)
        return convert_pt2e(prepared), float_ops
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"coreml: W8A8 quantization (PT2E CoreMLQuantizer) failed: {one_line(e, with_type=True)}") from e


def quantize_weights(mlmodel):
    """Weight-only int8 (symmetric, per output channel) of conv/linear/conv_transpose weights."""
    import coremltools.optimize.coreml as cto

    op_cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=0)
    # batch_norm gets the same config: coremltools 9.0 refuses ("compression config conflict detected between
    # ops") a constant shared by a conv and a batch_norm (seen on OffSeg-T) when only one of them is configured.
    types = ("conv", "linear", "conv_transpose", "batch_norm")
    per_tensor = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_tensor",
                                             weight_threshold=0)
    cfg = cto.OptimizationConfig(op_type_configs={t: op_cfg for t in types},
                                 op_name_configs=zero_channel_configs(mlmodel, types, per_tensor))
    try:
        return cto.linear_quantize_weights(mlmodel, cfg)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"coreml: linear_quantize_weights failed: {one_line(e, with_type=True)}") from e


def zero_channel_configs(mlmodel, op_types: tuple[str, ...], per_tensor) -> dict[str, Any]:
    """Per-constant overrides for weights that per-channel symmetric int8 cannot represent: a channel whose scale
    (max |w| / 127, in the weight's fp16/fp32) is zero, either because the channel is all zero (FreqFusion's
    zero-initialised `direct_scale` convs, pruned channels) or because it underflows (fp16 layer-scale-sized
    weights, ~1e-7). coremltools would divide by that zero scale: NaN before the int8 cast (numpy's "invalid value
    encountered in divide / cast"). A constant whose only problem is all-zero channels is quantized per tensor;
    one with an underflowing non-zero channel (or no usable scale at all) stays float.
    Returns {const op name: config or None (float)}."""
    from coremltools.optimize._utils import select_input_output_channel_axis

    prog = getattr(mlmodel, "_mil_program", None)
    if prog is None:
        return {}
    overrides: dict[str, Any] = {}
    for fn in prog.functions.values():
        for op in _walk_mil(fn):
            if op.op_type != "const":
                continue
            val = op.outputs[0].val
            if not isinstance(val, np.ndarray) or val.ndim < 2 or not np.issubdtype(val.dtype, np.floating):
                continue
            if not any(c.op_type in op_types for c in op.outputs[0].child_ops):
                continue
            axis = select_input_output_channel_axis(op)[1]
            axis = 0 if axis is None else axis % val.ndim
            ranges = np.abs(np.moveaxis(val, axis, 0).reshape(val.shape[axis], -1)).max(axis=1).astype(np.float64)
            normal = ranges / 127 >= np.finfo(val.dtype).tiny  # the scale is a normal number in the weight's dtype
            if normal.all():
                continue
            zero_or_normal = normal | (ranges == 0)
            overrides[op.name] = per_tensor if zero_or_normal.all() and normal.any() else None
    if overrides:
        log.debug("coreml: constants kept off per-channel int8 (zero or underflowing scales): %s",
                  ", ".join(f"{k} ({'per tensor' if v is not None else 'float'})"
                            for k, v in sorted(overrides.items())))
    return overrides


def _walk_mil(block) -> Iterator[Any]:
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from _walk_mil(b)


# ----------------------------------------------------------------------------------------------------------------
# Inspection of a saved .mlpackage (works on every host: reads the protobuf spec, runs nothing)
# ----------------------------------------------------------------------------------------------------------------
