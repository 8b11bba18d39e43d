"""Each target's int8 scheme as its exporter applies it on this host (ranges, symmetry, 7-bit weights where the CPU
needs them), for the sensitivity simulation (`edgeseg quant-report --target`, the mIoU budget's ranking)."""
from __future__ import annotations

from typing import Any

from edgeseg.quant.sensitivity import Int8Scheme


def scheme_for_target(target: str, options: dict[str, Any] | None = None) -> Int8Scheme:
    """The int8 scheme `target`'s exporter uses with its profile options (overridden by `options`), resolved as
    the exporter resolves them on this host ("auto" reduce_range / overflow fix from this CPU's flags).

    Raises:
        UsageError (one line) for an unknown target, an int8-less target, or a scheme this simulation cannot
        reproduce (a calibration method other than MinMax).
    """
    from edgeseg.errors import UsageError
    from edgeseg.export import get_exporter
    from edgeseg.export.profiles import load_profile

    exporter = get_exporter(target)  # UsageError naming the known targets
    profile = load_profile(target)
    if "int8" not in profile.precisions:
        raise UsageError(f"--target {target}: has no int8 precision ({', '.join(profile.precisions)})")
    opts = exporter.Options.from_dict({**profile.io_options(), **profile.options, **(options or {})},
                                      where="options")
    kind = profile.exporter
    calib = getattr(opts, "calibrate_method", "MinMax")
    if calib != "MinMax":
        raise UsageError(f"--target {target}: calibrate_method {calib!r} cannot be simulated (quant-report "
                         "simulates MinMax ranges only)")
    per_channel = bool(getattr(opts, "per_channel", True))
    chan = "per-channel" if per_channel else "per-tensor"
    if kind == "onnx":
        from edgeseg.export.onnx_quant import resolve_reduce_range

        reduce, why = resolve_reduce_range(opts.reduce_range)
        act = opts.activation_type
        lo, hi = (0, 255) if act == "uint8" else (-128, 127)
        return Int8Scheme(target, f"ONNX Runtime QDQ: int8 symmetric {chan} weights"
                          + (" 7-bit (reduce_range)" if reduce else "") + f", {act} asymmetric per-tensor activations",
                          w_qmin=-64 if reduce else -127, w_qmax=64 if reduce else 127, w_div=64.0 if reduce else 127.0,
                          per_channel=per_channel, activations="asymmetric", a_qmin=lo, a_qmax=hi,
                          options={"activation_type": act, "reduce_range": reduce, "reduce_range_reason": why,
                                   "per_channel": per_channel, "calibrate_method": calib})
    if kind == "tensorrt":
        return Int8Scheme(target, f"TensorRT explicit QDQ: int8 symmetric {chan} weights, int8 symmetric per-tensor "
                          "activations", w_qmin=-127, w_qmax=127, w_div=127.0, per_channel=per_channel,
                          activations="symmetric", a_qmin=-127, a_qmax=127, a_div=127.0,
                          options={"per_channel": per_channel, "calibrate_method": calib})
    if kind == "openvino":
        from edgeseg.export.openvino_quant import resolve_overflow_fix

        fix, why = resolve_overflow_fix(opts.overflow_fix)
        # NNCF's overflow fix: 7-bit weights everywhere ("enable") or in the first layer only
        seven = {"w_qmin": -63, "w_qmax": 63, "w_div": 63.0}
        weights = seven if fix == "enable" else {"w_qmin": -127, "w_qmax": 127, "w_div": 127.0}
        first = {"first_w_qmin": -63, "first_w_qmax": 63, "first_w_div": 63.0} if fix == "first_layer_only" else {}
        acts = ({"activations": "signed_by_range"} if opts.preset == "performance" else
                {"activations": "asymmetric", "a_qmin": 0, "a_qmax": 255})
        return Int8Scheme(target, "NNCF: int8 symmetric per-channel weights"
                          + {"enable": " 7-bit (overflow fix)", "first_layer_only": " (7-bit in the first layer)"}
                          .get(fix, "") + ", int8 per-tensor activations "
                          + ("symmetric" if opts.preset == "performance" else "asymmetric"), per_channel=True,
                          **weights, **first, **acts,
                          options={"overflow_fix": fix, "overflow_fix_reason": why, "preset": opts.preset})
    if kind == "executorch":
        return Int8Scheme(target, f"XNNPACKQuantizer symmetric config: int8 symmetric {chan} weights, int8 "
                          "asymmetric per-tensor activations", w_qmin=-127, w_qmax=127, w_div=127.0,
                          per_channel=per_channel, activations="asymmetric", a_qmin=-128, a_qmax=127,
                          options={"per_channel": per_channel})
    if kind == "coreml":
        if opts.int8_mode == "weights":
            return Int8Scheme(target, "Core ML weight-only int8: symmetric per-channel weights, float activations",
                              w_qmin=-127, w_qmax=127, w_div=127.0, per_channel=True, activations="none",
                              options={"int8_mode": opts.int8_mode})
        return Int8Scheme(target, "Core ML W8A8 (CoreMLQuantizer symmetric): int8 symmetric per-channel weights, "
                          "uint8 symmetric per-tensor activations (zero point 128)", w_qmin=-128, w_qmax=127,
                          w_div=127.5, per_channel=True, activations="symmetric", a_qmin=0, a_qmax=255, a_div=127.5,
                          a_zero=128, options={"int8_mode": opts.int8_mode})
    if kind == "litert":
        # ai-edge-quantizer static_wi8_ai8: symmetric narrow-range weights (scale = absmax / 127), asymmetric
        # min/max activations over -128..127 (ai_edge_quantizer/algorithms/uniform_quantize)
        return Int8Scheme(target, "ai-edge-quantizer static_wi8_ai8: int8 symmetric per-channel weights, int8 "
                          "asymmetric per-tensor activations", w_qmin=-127, w_qmax=127, w_div=127.0, per_channel=True,
                          activations="asymmetric", a_qmin=-128, a_qmax=127, options={"recipe": opts.recipe})
    raise UsageError(f"--target {target}: its int8 scheme ({kind} exporter) cannot be simulated; simulated "
                     "targets use the onnx, tensorrt, openvino, executorch, coreml or litert exporters")
