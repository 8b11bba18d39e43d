"""The QAT training graph: prepare (torch.export + the target's quantizer + the float policy), BatchNorm and
observer switches, activation-range initialisation, weight-sharing fixes for ExecuTorch, and convert to the int8
program. See edgeseg.train.qat for the whole flow.
"""
from __future__ import annotations

import copy
import logging
import types
from typing import Sequence

import torch
import torch.nn as nn

from edgeseg.errors import ArtifactError, one_line
from edgeseg.quant.qat_program import check_deterministic
from edgeseg.export.qat_quantizers import target_quantizer

log = logging.getLogger(__name__)


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

    from edgeseg.export import get_exporter
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
        for rewrite in get_exporter(target).qat_graph_passes():
            rewrite(gm)
        prepared = prepare_qat_pt2e(gm, quantizer)
    except Exception as e:  # noqa: BLE001 - the tool's failure becomes one line
        raise ArtifactError(f"qat: preparing {type(model).__name__} for {target} failed: {type(e).__name__}: "
                            f"{one_line(e)}") from e
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


# the ops a converted QAT graph computes with; anything else (another library's custom op, a higher-order op
# that runs a subgraph or a callable) has no place in one
