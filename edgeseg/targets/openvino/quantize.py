"""OpenVINO int8: NNCF post-training quantization of the converted OpenVINO model (edgeseg.targets.openvino.exporter), with
the float policy as an IgnoredScope. Heavy imports stay inside functions.

int8 (NNCF 3.4 on the OV model, the simplest PTQ: no FX graph, no re-export): FakeQuantize nodes are inserted on
activations and weights; `ov.save_model` stores quantized weights as int8 constants. Overflow fix: x86 CPUs with
AVX2 but without VNNI (this CI host: AMD EPYC, avx2, no avx_vnni/avx512_vnni) run u8 x s8 convolutions with
VPMADDUBSW, whose int16 pair sums saturate when full 8-bit weights meet large activations (measured: a conv net with
same-sign weights on full-range data had 35 % relative error with NNCF's default `FIRST_LAYER` fix, 1.6 % with
`ENABLE`, which quantizes every weight to 7 bits). The default `overflow_fix = "auto"` therefore resolves from the
exporting CPU's flags (`edgeseg.cpu`): "enable" where u8 x s8 saturates (AVX2 without VNNI), "disable" (full 8-bit
weights) on VNNI/AMX CPUs, which accumulate in int32; the manifest records the choice, the CPU and why. An IR meant
for a different CPU than the exporting one sets the option explicitly.

Float policy (edgeseg.quant.policy, options `keep_float` / `float_defaults`): NNCF gets an `IgnoredScope` of the
exact OpenVINO node names that come from the float modules (NMF2D, OffsetLearning, AFM by default). On the
torch.export route the OpenVINO PyTorch frontend names every node `<fx node name>/<aten op>/<OV op>`; the FX graph
it converts (the ExportedProgram after openvino's own `run_decompositions`) is built by `convert`
(edgeseg.targets.openvino.exporter) with `TorchFXPythonDecoder.from_exported_program`, so the float FX nodes (their
`nn_module_stack`) map to OV nodes exactly. NNCF validates the names (`validate=True`), and a non-empty policy that
matches no OV node is an error, never a silent all-int8 model.

QAT for openvino (`openvino_qat_quantizer`, the exporter's `quantizer`) trains with executorch's OpenVINOQuantizer,
NNCF's INT8_SYM placement on the PT2E graph; the exporter converts the resulting q/dq graph without NNCF.
"""
from __future__ import annotations

import re
from typing import Any

from edgeseg.errors import ArtifactError, UsageError, one_line
from edgeseg.quant.calibration import CalibrationData

_NOT_QUANTIZABLE_TYPES = ("Parameter", "Result", "Constant")


def fx_node_names(policy, graph_module) -> list[str]:
    """FX node names inside the policy's float modules (the torch.export route: OV node names start with them)."""
    return [n.name for n in graph_module.graph.nodes if n.op == "call_function" and policy.node_is_float(n)]


def nncf_patterns(policy) -> list[str]:
    """Regex patterns over OpenVINO node names (`__module.<fqn>/aten::op/Op`, the TorchScript route) of the
    policy's float modules."""
    return [rf"^__module\.{re.escape(n)}(\.|/).*" for n in policy.names]


def float_node_names(converted, policy) -> list[str]:
    """Names of the OV nodes that come from the policy's float modules (for `nncf.IgnoredScope(names=...)`).

    torch.export route: OV node friendly names are `<fx node name>/<aten op>/<OV op>` (decomposed GroupNorm:
    `<fx name>/.../decomposed/<step>`), matched against the FX nodes whose `nn_module_stack` lies in a float module.
    Module route (TorchScript): the policy's `__module.<fqn>` regex patterns, resolved against the OV names here.
    Raises ArtifactError when the policy names modules but no OV node matches (the mapping broke)."""
    if not len(policy):
        return []
    ops = [op for op in converted.model.get_ops() if op.get_type_name() not in _NOT_QUANTIZABLE_TYPES]
    if converted.fx_graph is not None:
        fx_float = set(fx_node_names(policy, converted.fx_graph))
        names = sorted(op.get_friendly_name() for op in ops if op.get_friendly_name().split("/", 1)[0] in fx_float)
    else:
        pats = [re.compile(p) for p in nncf_patterns(policy)]
        names = sorted(op.get_friendly_name() for op in ops if any(p.match(op.get_friendly_name()) for p in pats))
    if not names:
        raise ArtifactError(f"openvino: the float policy ({', '.join(policy.names)}) matches no node of the "
                            f"OpenVINO model ({converted.route} route); refusing to quantize them to int8")
    return names


def resolve_overflow_fix(requested: str) -> tuple[str, str]:
    """(NNCF overflow fix, why) for `requested`; "auto" decides from the host CPU (edgeseg.cpu)."""
    from edgeseg.cpu import EXACT_WHY, SATURATES_WHY, resolve_auto

    return resolve_auto(requested, lambda cpu: cpu.int8_saturates, "enable", "disable", SATURATES_WHY, EXACT_WHY)


def quantize(ov_model, calib: CalibrationData, options, ignored: list[str] | None = None):
    """NNCF PTQ of an OV model with the overflow fix of `options`, leaving the nodes named in `ignored` in float
    (NNCF validates that each exists); returns (quantized ov.Model, manifest record)."""
    import nncf

    if calib is None or not calib.inputs:
        raise UsageError("--precision int8: openvino needs calibration images")
    data = calib.numpy()
    kwargs: dict[str, Any] = {}
    if options.model_type == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if ignored:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(ignored), validate=True)
    overflow_fix, why = resolve_overflow_fix(options.overflow_fix)
    adv = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix(overflow_fix))
    try:
        q = nncf.quantize(ov_model, nncf.Dataset(data), preset=nncf.QuantizationPreset(options.preset),
                          subset_size=len(data), fast_bias_correction=options.fast_bias_correction,
                          advanced_parameters=adv, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"openvino: nncf.quantize failed: {one_line(e, with_type=True)}") from e
    record = {"scheme": "NNCF post-training quantization (OpenVINO FakeQuantize)",
              "activations": "int8 per-tensor " + ("symmetric" if options.preset == "performance" else
                                                   "asymmetric"),
              "weights": "int8 symmetric per-channel" + (", 7-bit range (overflow fix)" if overflow_fix ==
                                                         "enable" else ""),
              "overflow_fix": overflow_fix, "overflow_fix_reason": why, "preset": options.preset,
              "model_type": options.model_type or "default", "fast_bias_correction": options.fast_bias_correction,
              "calibration_images": len(data), "float_nodes": len(ignored or [])}
    return q, record


def quantized_float_nodes(ov_model, names) -> list[str]:
    """Nodes among `names` (the float policy's) that still read a FakeQuantize output (should be none)."""
    wanted = set(names)
    return sorted(op.get_friendly_name() for op in ov_model.get_ops() if op.get_friendly_name() in wanted and any(
        i.get_source_output().get_node().get_type_name() == "FakeQuantize" for i in op.inputs()))


def openvino_qat_quantizer():
    """executorch's OpenVINOQuantizer (NNCF's INT8_SYM scheme) made usable for PT2E QAT and the float policy.

    * It annotates activations on the producer's output, so a conv's `input_qspec_map` holds only its weight;
      torchao 0.18's conv-BN QAT fusion maps that dict by position (input, weight, bias) and failed with
      IndexError on every conv+BN (measured on qat_tiny). An explicit `None` input entry (no extra observer:
      the producer's output observer still quantizes it) restores the positions.
    * Its specs name plain observers (HistogramObserver, PerChannelMinMaxObserver), which prepare_qat_pt2e would
      insert as is: training would then see float activations and weights, not int8. `fake_quant_spec`
      (edgeseg.quant.pt2e_specs) swaps in FakeQuantize modules with moving-average observers of the same
      dtype/range/qscheme (the XNNPACK QAT configuration's choice), so the forward pass rounds like the OpenVINO
      int8 model will.
    * `set_filter_function(keep)`: nodes with `keep(node)` False go to NNCF's ignored scope by FX node name
      (OpenVINOQuantizer has no module-name hook).
    * It gives LayerNorm/GroupNorm biases (1-D) a per-channel weight spec; torchao's per-channel observer
      flattens from dim 1 and fails on them (IndexError at the first QAT step of segnext_t_offset), so those stay
      float; so do non-tensor inputs such as the dynamic batch size (`unobservable`).
    """
    import torch
    from executorch.backends.openvino.quantizer import OpenVINOQuantizer
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    from edgeseg.quant.pt2e_specs import fake_quant_spec, unobservable

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
                qa.input_qspec_map = {k: fake_quant_spec(v, reduce_weight_range=True)
                                      for k, v in qa.input_qspec_map.items() if not unobservable(k, v)}
                own = n.meta.get("val")
                qa.output_qspec = (None if own is not None and not isinstance(own, torch.Tensor)
                                   else fake_quant_spec(qa.output_qspec))
                if (n.op == "call_function" and n.args and "conv" in str(n.target)
                        and n.args[0] not in qa.input_qspec_map):
                    qa.input_qspec_map = {n.args[0]: None, **qa.input_qspec_map}
            return model

    return QatOpenVINOQuantizer()


__all__ = ["fx_node_names", "nncf_patterns", "float_node_names", "resolve_overflow_fix", "quantize",
           "quantized_float_nodes", "openvino_qat_quantizer"]
