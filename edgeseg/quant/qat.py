"""Quantization-aware training: fine-tune a checkpoint with fake quantization that matches a target's int8
scheme, then save a checkpoint whose int8 export carries the learned scales.

Flow (PT2E, torchao 0.18 / executorch 1.5.1):
  1. `torch.export.export(model.train(), (x,), dynamic_shapes={0: batch})`: the batch dimension is dynamic
     (a fixed batch at torch.export bakes the training batch into reshapes, and validation at batch 1 breaks).
  2. `prepare_qat_pt2e(graph, quantizer)` with the target's quantizer (`target_quantizer`) and the model's
     float policy (`edgeseg.quant.policy`); `allow_exported_model_train_eval` so `.train()/.eval()` switch the
     exported graph's BN/dropout the PT2E way.
  2b. `init_observers`: the calibration set (default: up to 64 images of --data's train split, stratified) runs
     through the prepared graph so every activation range starts at the mean of its per-image min/max. Why:
     torchao's moving-average observers otherwise take their first range from the first augmented training batch
     and move 1 % per step; measured on offseg_t (CamVid val, ONNX scheme, no training): calibrated 45.91
     (converted program) vs 45.36 (fake-quant) after 20 uncalibrated QAT iterations (fp32 45.87).
  3. `edgeseg.train.loop.fit` trains the prepared graph (progress, validation mIoU of the fake-quant model,
     exact resume) in `<out>/train/`. Observers run in training only (`set_observers`), and the fake quants ask
     the observers for their scales (`_unfused_fake_quant`), so the validated fake-quant graph computes what
     convert freezes. For ExecuTorch, extra uses of a shared weight read a clone (`unshare_weight_uses`).
  4. `convert_pt2e` -> `torch.export.export` (dynamic batch) -> `torch.export.save` as
     `<out>/checkpoint/qat_int8.pt2`, beside the fine-tuned float weights (`model.safetensors`) and a
     `model.json` whose `quant` records target, scheme, quantizer, float modules and the program file.
     `torch.export.load` reads that file back as a serialized graph + tensors: it does not unpickle arbitrary
     code (the program is a schema'd graph; weights are tensor payloads).
  5. `edgeseg export --checkpoint <out>/checkpoint --target T --precision int8` finds `quant.program` and hands
     the converted graph to the exporter (`load_qat_program`), which exports it without its own PTQ:
     executorch/onnx (QDQ), jetson-tensorrt (ONNX QDQ, symmetric: zero points checked), openvino
     (ov.convert_model: q/dq -> FakeQuantize, no NNCF), coreml (ct.convert: quantize/dequantize + int8
     constexpr weights). `FAMILY_EXPORTS` says which targets take which QAT scheme.

Must not import export runtimes at module level.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import types
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from edgeseg.errors import ArtifactError, UsageError
from edgeseg.quant.passes import requantize_after_zero_pad

log = logging.getLogger(__name__)

PROGRAM_FILE = "qat_int8.pt2"
# target -> (quantizer family, scheme line for the manifest)
QAT_TARGETS: dict[str, tuple[str, str]] = {
    "executorch-xnnpack": ("xnnpack", "PT2E QAT int8: XNNPACKQuantizer symmetric per-channel weights, "
                                      "asymmetric per-tensor activations"),
    "onnx": ("xnnpack-7bit", "PT2E QAT int8 (XNNPACKQuantizer scheme, 7-bit weights as the onnx exporter's "
                             "reduce_range PTQ), exported as ONNX QDQ"),
    "jetson-tensorrt": ("xnnpack-symmetric", "PT2E QAT int8, symmetric per-tensor activations and per-channel "
                                             "weights (TensorRT explicit quantization), exported as ONNX QDQ"),
    "openvino": ("openvino", "PT2E QAT int8 with executorch's OpenVINOQuantizer (NNCF INT8_SYM placement), "
                             "fake-quantized in training; 7-bit weights (NNCF overflow fix)"),
    "coreml": ("coreml", "PT2E QAT W8A8 with executorch's CoreMLQuantizer (coremltools LinearQuantizerConfig)"),
}

# 7-bit int8 weights: u8 x s8 kernels on x86 CPUs without VNNI (VPMADDUBSW) saturate their int16 sums with full
# 8-bit weights (ONNX Runtime and OpenVINO on this machine); the exporters' PTQ uses reduce_range / NNCF's
# overflow fix for the same reason
WEIGHT_7BIT = {"quant_min": -64, "quant_max": 63}

# quantizer family -> export targets that carry its converted graph faithfully (the jetson-tensorrt ONNX needs
# zero points of 0, openvino needs float weights behind q/dq pairs, Core ML its own scheme)
FAMILY_EXPORTS: dict[str, tuple[str, ...]] = {
    "xnnpack": ("executorch-xnnpack", "onnx"),
    "xnnpack-7bit": ("onnx", "executorch-xnnpack"),
    "xnnpack-symmetric": ("jetson-tensorrt", "onnx", "executorch-xnnpack"),
    "openvino": ("openvino",),
    "coreml": ("coreml",),
}


def check_export_target(quant: dict[str, Any], target: str, where: str) -> None:
    """UsageError unless a QAT checkpoint's graph (its `quant` record) can be exported to `target`."""
    family = quant.get("quantizer") or QAT_TARGETS.get(quant.get("target", ""), ("",))[0]
    ok = FAMILY_EXPORTS.get(family, ())
    if target not in ok:
        raise UsageError(f"--target {target}: {where} was fine-tuned for {quant.get('target')}'s int8 scheme "
                         f"({family}), which exports to {', '.join(ok) or 'no target'}; re-run `edgeseg qat "
                         f"--target {target}`, or export the float checkpoint it came from")


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
                XNNPACKQuantizer, get_symmetric_quantization_config)

            cfg = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=is_qat)
            if family == "xnnpack-symmetric":
                cfg = _symmetric_activations(cfg)
            if family == "xnnpack-7bit":
                # with 8-bit weights, segnext_t_offset's QAT ONNX agreed 84.5 % with fp32 while its fake-quant
                # model scored within 0.4 mIoU
                cfg = dataclasses.replace(cfg, weight=dataclasses.replace(cfg.weight, **WEIGHT_7BIT))
            return XNNPACKQuantizer().set_global(_unfused_fake_quant(cfg))
        if family == "openvino":
            return openvino_qat_quantizer()
        if family == "coreml":
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
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase, FakeQuantize
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


_BN_OPS = ("aten.batch_norm.default", "aten._native_batch_norm_legit.default",
           "aten._native_batch_norm_legit_functional.default", "aten.cudnn_batch_norm.default")


def _set_flag_false(gm: nn.Module, match, index: int) -> int:
    """Set the boolean argument `index` of every call_function node with `match(str(target))` from True to False
    in an exported graph; returns how many were changed."""
    n_changed = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and match(str(n.target)) and len(n.args) > index and n.args[index] is True:
            args = list(n.args)
            args[index] = False
            n.args = tuple(args)
            n_changed += 1
    if n_changed:
        gm.recompile()
    return n_changed


def _set_bn_stats_frozen(gm: nn.Module) -> int:
    """Every batch norm normalizes with its running statistics and stops updating them (`training`, arg 5)."""
    return _set_flag_false(gm, lambda t: t in _BN_OPS, 5)


def freeze_bn_stats(prepared: nn.Module) -> nn.Module:
    """Keep the float model's batch-norm statistics through QAT, like torch.ao's `freeze_bn_stats`.

    Why: a short QAT at a small batch replaces the running statistics with those of the last few batches (momentum
    0.1); measured on offseg_t, 20 iterations at batch 8 moved the fake-quant graph's CamVid val mIoU 45.87 ->
    44.30 before any int8 rounding. With frozen statistics the weights fine-tune against the same normalization
    the exported graph uses. torchao's `.train()` rewrites batch norms back to training mode, so `_train_qat`
    re-freezes after each switch."""
    prepared.bn_stats_frozen = True
    prepared.train = types.MethodType(_train_qat, prepared)
    _set_bn_stats_frozen(prepared)
    return prepared


def _set_dropout_off(gm: nn.Module) -> int:
    """dropout(x, p, train=True) -> train=False (arg 2)."""
    return _set_flag_false(gm, lambda t: "dropout" in t, 2)


def _train_qat(self, mode: bool = True):
    """`.train()` of a prepared QAT graph: torchao's switch (batch norm and dropout to training mode), then dropout
    back off (torchao turns the eval-mode dropout that prepare_qat exported into a random one) and, with
    `bn_stats_frozen`, batch norm back to the running statistics. A plain function so that deepcopy rebinds it."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    if mode:
        move_exported_model_to_train(self)
        _set_dropout_off(self)
        if getattr(self, "bn_stats_frozen", False):
            _set_bn_stats_frozen(self)
    else:
        move_exported_model_to_eval(self)
    set_observers(self, mode)
    return self


def _eval_qat(self):
    return self.train(False)


def _fake_quants(gm: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(activation, weight) fake-quant modules of a prepared graph; a weight's reads a get_attr node."""
    acts, weights = [], []
    for node in gm.graph.nodes:
        if node.op != "call_module" or "activation_post_process" not in str(node.target):
            continue
        mod = gm.get_submodule(str(node.target))
        if not hasattr(mod, "disable_observer"):
            continue
        src = node.args[0] if node.args else None
        (weights if isinstance(src, torch.fx.Node) and src.op == "get_attr" else acts).append(mod)
    return acts, weights


def set_observers(prepared: nn.Module, on: bool) -> None:
    """Observers update ranges in training only (activation ones not at all once `freeze_activation_ranges` ran).

    Why: torchao's eval switch leaves them on, so every validation image moved the activation ranges (1 % each)
    and was fake-quantized with a range partly fitted to itself: measured on offseg_t's ONNX QAT, the validation
    said 45.75 mIoU while the converted program (the same weights, the ranges as validation left them) scored
    45.32 in PyTorch and in ONNX Runtime alike. With observers off in eval mode the fake-quant graph computes what
    convert_pt2e freezes, and validation images never reach the exported scales."""
    acts, weights = _fake_quants(prepared)
    frozen = getattr(prepared, "activation_ranges_frozen", False)
    for mod in weights:
        mod.enable_observer() if on else mod.disable_observer()
    for mod in acts:
        mod.enable_observer() if on and not frozen else mod.disable_observer()


def _stochastic_layers_off(model: nn.Module) -> int:
    """Put dropout and stochastic-depth (DropPath) modules in eval mode before the QAT export; returns how many.

    Why: `torch.export` in train mode records their random masks (aten.bernoulli) as graph nodes, torchao's
    eval switch only rewrites F.dropout patterns, and the converted program keeps them: measured, segnext_t's
    MSCAN DropPath (rate 0.1) reached the QAT ONNX artifact as 25 RandomUniformLike ops (a different answer on
    every run) and broke the ExecuTorch lowering (bernoulli is not core ATen); LightHamHead's NMF draws random
    bases in training (aten.rand). A short QAT fine-tune needs neither."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ in ("DropPath", "StochasticDepth"):
            m.eval()
            n += 1
        if getattr(m, "rand_in_train", False):  # LightHamHead's NMF: the stored bases, as inference uses them
            m.rand_in_train = False
            n += 1
    return n


_RANDOM_OPS = ("bernoulli", "rand", "dropout", "native_dropout", "feature_dropout", "alpha_dropout",
               "normal", "multinomial")


def check_deterministic(gm: nn.Module, where: str) -> None:
    """Refuse a QAT graph that still draws random numbers (ArtifactError naming the first such op)."""
    for n in gm.graph.nodes:
        parts = str(n.target).split(".")  # "aten.bernoulli.p" -> "bernoulli"
        op = (parts[1] if len(parts) > 1 and parts[0] == "aten" else parts[-1]).lstrip("_")
        if "dropout" in op and len(n.args) > 2 and n.args[2] is False:
            continue  # dropout(x, p, train=False) is the identity
        if n.op == "call_function" and op.startswith(_RANDOM_OPS):
            raise ArtifactError(f"{where}: the QAT graph draws random numbers ({n.target} at {n.name}); an int8 "
                                "artifact must be deterministic")


def unshare_weight_uses(gm: torch.fx.GraphModule) -> int:
    """Give every use of a parameter read by more than one op but its first its own `clone`; returns how many.

    Why: the XNNPACK quantizer leaves a conv unannotated when its weight is already annotated for another conv
    (FreqFusion's content encoders run on both the high- and the low-res features), so the conv stays float
    behind a dequantized input, which XNNPACK takes as a quantized conv with an fp32 weight: offseg_t's
    ExecuTorch QAT .pte failed at its first run ("Propagating input shapes failed"). PTQ copies such constants
    (export.executorch.unshare_constants); a trained parameter must stay one tensor, so each extra use reads a
    clone (gradients flow back to the one parameter, each use gets its own weight fake quant, and convert folds
    the clone into its int8 constant)."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or len(node.users) < 2:
            continue
        for user in list(node.users)[1:]:
            with gm.graph.inserting_before(user):
                copy = gm.graph.call_function(torch.ops.aten.clone.default, (node,))
            copy.meta = dict(node.meta)
            user.replace_input_with(node, copy)
            n += 1
    if n:
        gm.graph.lint()
        gm.recompile()
    return n


def _freeze_weight_clones(gm: torch.fx.GraphModule) -> int:
    """Replace each `clone` of a parameter (unshare_weight_uses) by a constant copy of its trained value, so that
    convert_pt2e folds its weight quantization into an int8 constant as for any other weight (a quantize of a
    clone stays in the graph, and ExecuTorch then lacks a kernel for the lone dequantize_per_channel)."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.clone.default \
                and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "get_attr":
            value = gm.get_parameter(node.args[0].target) if node.args[0].target in dict(gm.named_parameters()) \
                else gm.get_buffer(node.args[0].target)
            name = f"_unshared_weight_{n}"
            gm.register_buffer(name, value.detach().clone())
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(name)
            const.meta = dict(node.meta)
            node.replace_all_uses_with(const)
            gm.graph.erase_node(node)
            n += 1
    if n:
        gm.graph.lint()
        gm.recompile()
    return n


def prepare_qat(model: nn.Module, target: str, input_hw: Sequence[int], policy=None, per_channel: bool = True,
                example_batch: int = 2, freeze_bn: bool = True) -> nn.Module:
    """Export `model` with a dynamic batch and insert the target's fake quantization.

    Args:
        model: eager model (train mode is set here).
        target: export target name (QAT_TARGETS).
        input_hw: static (H, W) of training crops and the export.
        policy: FloatPolicy (modules left in float); None = the model's default policy.
        freeze_bn: normalize with the float model's running statistics and keep them (freeze_bn_stats).
    Returns:
        The prepared torch.fx.GraphModule; `.train()`/`.eval()` work on it.
    """
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from edgeseg.quant.policy import float_policy

    policy = float_policy(model) if policy is None else policy
    quantizer = policy.apply_pt2e(target_quantizer(target, per_channel=per_channel, is_qat=True))
    h, w = int(input_hw[0]), int(input_hw[1])
    model = model.train()
    _stochastic_layers_off(model)
    x = torch.randn(example_batch, 3, h, w)
    batch = torch.export.Dim("batch", min=1, max=1024)
    try:
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
        gm = ep.module()
        if QAT_TARGETS[target][0] == "xnnpack":
            unshare_weight_uses(gm)
        prepared = prepare_qat_pt2e(gm, quantizer)
    except Exception as e:  # noqa: BLE001 - the tool's failure becomes one line
        raise ArtifactError(f"qat: preparing {type(model).__name__} for {target} failed: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    check_deterministic(prepared, f"qat: {type(model).__name__} for {target}")
    allow_exported_model_train_eval(prepared)  # then .train/.eval replaced by _train_qat (same switches, plus)
    prepared.train = types.MethodType(_train_qat, prepared)
    prepared.eval = types.MethodType(_eval_qat, prepared)  # torchao's eval skips train(False)
    prepared.float_policy = policy
    if freeze_bn:
        freeze_bn_stats(prepared)
    return prepared


def init_observers(prepared: nn.Module, inputs: Sequence, progress: bool = False) -> int:
    """Set every observer's range from `inputs` (float32 NCHW arrays or tensors, one forward each, eval mode).

    A moving-average observer's first batch sets its range and later batches move it by `averaging_constant`;
    with the constant at 1/(k+1) for the k-th input the range is the plain mean of the per-input min/max, as a
    PTQ calibration over the same images would give. The constants are restored afterwards (training keeps
    adapting them). Returns the number of fake-quant modules initialised.
    """
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
    from tqdm import tqdm

    fqs = [m for m in prepared.modules() if isinstance(m, FakeQuantizeBase)]
    holders = [h for m in fqs for h in (m, getattr(m, "activation_post_process", None))
               if h is not None and hasattr(h, "averaging_constant")]
    saved = [h.averaging_constant for h in holders]
    was_training = prepared.training
    prepared.eval()
    set_observers(prepared, True)  # eval mode turned them off; here they are the point
    try:
        with torch.no_grad():
            for k, x in enumerate(tqdm(inputs, desc="qat: initialising observers", disable=not progress)):
                for h in holders:
                    h.averaging_constant = 1.0 / (k + 1)
                prepared(x if isinstance(x, torch.Tensor) else torch.from_numpy(x))
    finally:
        for h, c in zip(holders, saved):
            h.averaging_constant = c
        prepared.train(was_training)
    return len(fqs)


def freeze_activation_ranges(prepared: nn.Module) -> int:
    """Stop the activation observers for good (weights keep theirs: their ranges follow the trained weights).
    Returns the number frozen. The fake quantization itself stays on, at the ranges it has."""
    prepared.activation_ranges_frozen = True
    acts, _ = _fake_quants(prepared)
    for mod in acts:
        mod.disable_observer()
    return len(acts)


def qat_calibration_set(calib: str | None, data: str | Path, input_hw: Sequence[int], mean, std,
                        progress: bool = False):
    """The images `init_observers` uses: recipe `calib` (drawn with `data` as its "data" source), or by default up
    to 64 images of `data`'s train split (stratified by class presence, seed 0). Either is refused if it overlaps
    `data`'s val split, which QAT validates on."""
    from edgeseg.data.datasets import open_dataset
    from edgeseg.errors import EdgesegError
    from edgeseg.quant.calibration import build_calibration_set

    try:
        eval_split = open_dataset(data, split="val").image_paths
    except EdgesegError:  # no val split: nothing to keep apart
        eval_split = None
    if calib:
        return build_calibration_set(calib, input_hw, mean, std, data_root=data, eval_split=eval_split,
                                     progress=progress)
    return build_calibration_set(None, input_hw, mean, std, data_root=data, split="train", count=64,
                                 selection="stratified", seed=0, min_count=1, eval_split=eval_split,
                                 progress=progress)


def convert_qat(prepared: nn.Module, input_hw: Sequence[int], fold_quantize: bool = True
                ) -> "torch.export.ExportedProgram":
    """Freeze the learned scales: eval mode, convert_pt2e, re-export with a dynamic batch.

    `fold_quantize=False` keeps float weights behind a quantize/dequantize pair instead of int8 constants with a
    lone dequantize: openvino 2026.4.1's PyTorch frontend converts the pair to a FakeQuantize but leaves a lone
    dequantize's int8 constant as is (measured: "Arguments do not have the same element type (i8, f32)" at the
    first convolution of qat_tiny)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    gm = copy.deepcopy(prepared).cpu()
    move_exported_model_to_eval(gm)
    _freeze_weight_clones(gm)
    converted = convert_pt2e(gm, fold_quantize=fold_quantize)
    requantize_after_zero_pad(converted)
    h, w = int(input_hw[0]), int(input_hw[1])
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(converted, (torch.randn(2, 3, h, w),), dynamic_shapes=({0: batch},), strict=False)


def observer_scales(prepared: nn.Module) -> dict[str, float]:
    """Per-tensor activation scales learned by the fake-quant modules of a prepared graph, name -> scale."""
    out = {}
    for name, mod in prepared.named_modules():
        scale = getattr(mod, "scale", None)
        if name.startswith("activation_post_process") and isinstance(scale, torch.Tensor) and scale.numel() == 1:
            out[name] = float(scale)
    return out


def program_scales(ep_or_gm) -> list[float]:
    """Every per-tensor scale of the quantize ops in a converted graph (ExportedProgram or GraphModule)."""
    gm = ep_or_gm.graph_module if hasattr(ep_or_gm, "graph_module") else ep_or_gm
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and len(n.args) > 1:
            s = n.args[1]
            if isinstance(s, (float, int)):
                out.append(float(s))
    return out


def _copy_weights(prepared: nn.Module, model: nn.Module) -> None:
    """Copy the fine-tuned parameters/buffers of the prepared graph back into the eager model (same FQNs)."""
    src = prepared.state_dict()
    ref = model.state_dict()
    common = {k: v for k, v in src.items() if k in ref and v.shape == ref[k].shape}
    missing = [k for k in ref if k not in common]
    if missing:
        log.warning("qat: %d eager tensors not found in the prepared graph (kept as loaded), e.g. %s",
                    len(missing), missing[:3])
    model.load_state_dict(common, strict=False)


def load_qat_program(checkpoint: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The converted int8 graph of a QAT checkpoint as a module, with its `quant` record.

    `torch.export.load` deserializes a graph and tensors (not a pickle of arbitrary code).

    Raises:
        ArtifactError: the checkpoint has no QAT program, or it is unreadable.
    """
    from edgeseg.checkpoint import load_spec

    checkpoint = Path(checkpoint)
    spec = load_spec(checkpoint)
    quant = spec.quant or {}
    prog = quant.get("program")
    if not prog:
        raise ArtifactError(f"{checkpoint}: not a QAT checkpoint (model.json has no quant.program)")
    path = checkpoint / prog
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (named by model.json quant.program)")
    # registers the quantized_decomposed q/dq ops the program refers to (torch.export.load resolves ops by name;
    # without it a fresh process fails on `dequantize_per_channel`)
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    try:
        ep = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: unreadable ExportedProgram ({type(e).__name__}: {e})") from None
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    gm = ep.module()
    check_deterministic(gm, str(path))  # QAT checkpoints written before stochastic layers were switched off
    requantize_after_zero_pad(gm)  # QAT checkpoints converted before that pass existed
    allow_exported_model_train_eval(gm)  # ExportWrapper(...).eval() must work on the loaded graph
    gm.output_stride = int(quant.get("output_stride", 1))
    return gm, quant


def qat(checkpoint: str | Path, target: str, data: str | Path, out: str | Path, *, iters: int = 1000,
        batch_size: int = 8, lr: float = 1e-5, warmup_iters: int = 0, device: str | None = None,
        resume: bool = False, force: bool = False, keep_float: Sequence[str] = (), defaults: bool = True,
        per_channel: bool = True, input_hw: Sequence[int] | None = None, val_interval: int | None = None,
        progress: bool = True, seed: int = 0, freeze_bn: bool = True, calib: str | None = None,
        init_ranges: bool = True, freeze_ranges: bool = False, **fit_kwargs) -> dict[str, Any]:
    """QAT fine-tuning of `checkpoint` for `target` on dataset `data`.

    BatchNorm statistics stay those of the float checkpoint unless `freeze_bn=False` (see freeze_bn_stats).
    Activation ranges start from a calibration set (`calib`: a recipe name/path, default `data`'s train split;
    see qat_calibration_set and init_observers) unless `init_ranges=False`; a resumed run keeps its saved ranges.

    Writes `<out>/train/` (fit's run folder: log.jsonl, train_state.pt for --resume) and `<out>/checkpoint/`
    (the QAT checkpoint: float weights + model.json with `quant` + `qat_int8.pt2`).

    Returns:
        dict(checkpoint, program, fit summary, float_modules, target, scheme).
    """
    from edgeseg.checkpoint import load_checkpoint, save_checkpoint
    from edgeseg.fileio import atomic_path
    from edgeseg.quant.policy import float_policy
    from edgeseg.train.loop import fit

    if target not in QAT_TARGETS:
        raise UsageError(f"--target: no QAT scheme for {target!r}; known: {', '.join(QAT_TARGETS)}")
    out = Path(out)
    model, spec = load_checkpoint(checkpoint)
    hw = tuple(int(v) for v in (input_hw or spec.input_hw))
    policy = float_policy(model, keep_float, defaults=defaults)
    prepared = prepare_qat(model, target, hw, policy, per_channel=per_channel, freeze_bn=freeze_bn)
    calib_info = None
    if init_ranges:
        cal = qat_calibration_set(calib, data, hw, spec.mean, spec.std, progress=progress)
        calib_info = cal.info()
        if resume and (out / "train" / "train_state.pt").exists():
            log.info("qat: resuming; activation ranges come from the saved run")
        else:
            init_observers(prepared, cal.arrays, progress=progress)
    if freeze_ranges:
        freeze_activation_ranges(prepared)
    summary = fit(prepared, data, model_name=spec.model, model_kwargs=spec.model_kwargs, iters=iters,
                  batch_size=batch_size, crop_hw=hw, input_hw=hw, lr=lr, warmup_iters=warmup_iters,
                  mean=spec.mean, std=spec.std, device=device, out_dir=out / "train", resume=resume,
                  force=force, val_interval=val_interval, progress=progress, seed=seed, channels_last=False,
                  **fit_kwargs)
    prepared = prepared.cpu()
    ep = convert_qat(prepared, hw, fold_quantize=QAT_TARGETS[target][0] != "openvino")
    _copy_weights(prepared, model)
    quant = {"target": target, "scheme": QAT_TARGETS[target][1], "quantizer": QAT_TARGETS[target][0],
             "per_channel_weights": per_channel, "program": PROGRAM_FILE, "input_hw": list(hw),
             "output_stride": int(getattr(model, "output_stride", 1)), "float_modules": policy.to_json(),
             "iters": int(summary["step"]), "val": summary.get("last"),
             "bn_stats": "frozen (float checkpoint's)" if freeze_bn else "updated during QAT",
             "range_init": ({k: calib_info[k] for k in ("recipe", "source", "split", "count", "files",
                                                        "classes_missing")} if calib_info else
                            "first training batch (init_ranges off)"),
             "activation_ranges": "fixed after initialisation" if freeze_ranges else "moving average in training",
             "loader": "torch.export.load (serialized graph + tensors, no arbitrary code)"}
    qspec = dataclasses.replace(spec, quant=quant, metrics={**spec.metrics, "qat_val": summary.get("last")})
    ck = out / "checkpoint"
    save_checkpoint(ck, model, qspec, force=True)
    with atomic_path(ck / PROGRAM_FILE) as tmp:
        torch.export.save(ep, str(tmp))
    return {"checkpoint": str(ck), "program": str(ck / PROGRAM_FILE), "fit": summary,
            "float_modules": policy.names, "target": target, "scheme": quant["scheme"],
            "observer_scales": observer_scales(prepared)}


__all__ = ["QAT_TARGETS", "FAMILY_EXPORTS", "PROGRAM_FILE", "check_export_target", "openvino_qat_quantizer",
           "target_quantizer", "freeze_bn_stats", "check_deterministic", "unshare_weight_uses", "prepare_qat",
           "init_observers", "freeze_activation_ranges", "set_observers", "qat_calibration_set", "convert_qat",
           "observer_scales", "program_scales", "load_qat_program", "qat"]
