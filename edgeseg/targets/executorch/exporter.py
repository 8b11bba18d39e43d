"""ExecuTorch + XNNPACK exporter: torch.export -> (PT2E int8) -> to_edge_transform_and_lower(XnnpackPartitioner)
-> `.pte`. Heavy imports (executorch, torchao) stay inside functions.
"""
from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeseg.errors import UsageError
from edgeseg.export.base import Exporter, ExportJob, ExportOptions, ExportResult, export_float_policy, module_path
from edgeseg.quant.pt2e_specs import xnnpack_quantizer
from edgeseg.targets.executorch.passes import requantize_after_zero_pad
from edgeseg.targets.executorch.session import DEBUG_MAP

log = logging.getLogger(__name__)

MODEL_FILE = "model.pte"


@dataclass
class ExecutorchOptions(ExportOptions):
    """executorch-xnnpack options.

    Attributes:
        per_channel: int8: per-channel symmetric weight scales (XNNPACK quantizer config).
        fix_channels_last_softmax: rewrite softmax over the last axis of 4-D tensors into a 3-D softmax so that the
            XNNPACK delegate computes it over the right axis (executorch 1.5.1 bug, see `rewrite_last_dim_softmax`).
    """

    per_channel: bool = True
    fix_channels_last_softmax: bool = True


def rewrite_last_dim_softmax(ep: "torch.export.ExportedProgram", example_inputs: tuple):
    """Rewrite `softmax(x, dim=-1)` of a 4-D `x` as `softmax(x.reshape(-1, H, W), -1).reshape(x.shape)`.

    Why: in executorch 1.5.1 (XNNPACK delegate, torch 2.13) `ChannelsLastTaggedReshapePass` treats softmax as
    layout-agnostic: when its input comes from a convolution (tagged NHWC), the tensor stays channels-last and
    XNNPACK's softmax, which always reduces over the innermost memory axis, reduces over C instead of W. That is
    EfficientFormerV2's talking-head attention (conv -> softmax(-1) -> conv); measured max error 3.0 on OffSeg-T,
    0.4 on a 2-conv toy (tests/test_export.py::test_xnnpack_softmax_between_convs). A 3-D tensor is never
    converted to NHWC and `view_copy` requires NCHW input, so the pass inserts the NHWC->NCHW copy before the
    reshape and the softmax stays delegated and correct. Remove when the pass lists softmax among the NCHW-
    sensitive ops (backends/xnnpack/_passes/channels_last_tagged_reshape_pass.py, `memory_sensitive_ops_nchw`).

    Returns:
        (new ExportedProgram, number of softmax nodes rewritten).
    """
    aten = torch.ops.aten
    gm = ep.module()
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.softmax.int, aten._softmax.default):
            continue
        val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        if val is None or val.dim() != 4 or node.args[1] not in (-1, 3):
            continue
        shape = [int(s) for s in val.shape]
        with gm.graph.inserting_before(node):
            flat = gm.graph.call_function(aten.reshape.default, (node.args[0], [-1, shape[2], shape[3]]))
            sm = gm.graph.call_function(aten.softmax.int, (flat, -1))
            back = gm.graph.call_function(aten.reshape.default, (sm, shape))
        node.replace_all_uses_with(back)
        gm.graph.erase_node(node)
        count += 1
    if not count:
        return ep, 0
    gm.graph.lint()
    gm.recompile()
    return torch.export.export(gm, example_inputs, strict=False), count


def _pixel_shuffle(x, r: int):
    # torch's own decomposition ends in clone(memory_format=suggest_memory_format(x)): a channels-last clone
    # when x has channels-last strides (a permuted view), which the XNNPACK partitioner refuses (it takes only
    # dim-order-preserving clones), splitting the graph. Same values, plain contiguous layout.
    n, c, h, w = x.shape
    co = c // (r * r)
    return x.reshape(n, co, r, r, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, co, h * r, w * r)


def _pixel_unshuffle(x, r: int):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // r, r, w // r, r).permute(0, 1, 3, 5, 2, 4).reshape(n, c * r * r, h // r, w // r)


def _group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, cudnn_enabled: bool = True):
    # XNNPACK has no group norm; its mean is 4-D over the last two axes only: (N, G, C/G, HW) means
    n, c = x.shape[:2]
    xg = x.reshape(n, num_groups, c // num_groups, -1)
    centred = xg - xg.mean(dim=(-2, -1), keepdim=True)
    var = (centred * centred).mean(dim=(-2, -1), keepdim=True)
    y = (centred / (var + eps).sqrt()).reshape(x.shape)
    shape = [1, c] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _avg_pool2d_as_slice(x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
                         divisor_override=None):
    # EfficientFormerV2's LGQuery subsamples with AvgPool2d(1, 2, 0); XNNPACK takes the quantized 1x1 average
    # pool into its graph and then fails at the first run ("Propagating input shapes failed ...
    # xnn_status_invalid_parameter", offseg_t's ExecuTorch QAT .pte). A 1x1 window without padding is exactly a
    # strided slice. Other pools keep the op (NotImplemented: no decomposition).
    k = list(kernel_size) * (2 // len(kernel_size))
    pad = [padding] * 2 if isinstance(padding, int) else list(padding) * (2 // len(padding))
    if k != [1, 1] or any(pad) or ceil_mode or divisor_override is not None:
        return NotImplemented
    s = list(stride or kernel_size) * (2 // len(stride or kernel_size))
    return x[:, :, ::s[0], ::s[1]] if x.dim() == 4 else x[:, ::s[0], ::s[1]]


def delegate_friendly_decompositions(ep: "torch.export.ExportedProgram") -> "torch.export.ExportedProgram":
    """Decompose the ops that would otherwise leave XNNPACK, split its partitions or fail in it into ones it takes:
    GroupNorm (4-D means, sub, mul, sqrt, div), pixel_shuffle / pixel_unshuffle without the channels-last clone,
    a 1x1 average pool as a strided slice. Every
    op outside the delegate splits the graph into one more partition, and lowering time grows with the
    partition count (each partition runs the whole XNNPACK pass pipeline; shared constants are deep-copied)."""
    aten = torch.ops.aten
    table = {aten.group_norm.default: _group_norm, aten.pixel_shuffle.default: _pixel_shuffle,
             aten.pixel_unshuffle.default: _pixel_unshuffle, aten.avg_pool2d.default: _avg_pool2d_as_slice}
    if not any(n.op == "call_function" and n.target in table for n in ep.graph.nodes):
        return ep
    return ep.run_decompositions(table)


def unshare_constants(ep: "torch.export.ExportedProgram") -> tuple["torch.export.ExportedProgram", int]:
    """Give every user of a parameter / buffer / constant its own copy of it.

    Why: the XNNPACK delegate serialises a constant once, in the form its first consumer wants (a convolution
    packs and re-lays out its weight, a quantized one stores int8), and every other consumer in the same
    partition reads that. Seen on executorch 1.5.1: SSA's `conv_seg.weight` used as the classifier conv's weight
    and as prototype data (segfault / "Propagating input shapes failed" at run time), and FreqFusion's shared
    one-hot kernels in an int8 graph ("Failed to create convolution node ... invalid_parameter").
    The copies are small (shared tensors here are one-hot kernels and class embeddings).

    Returns:
        (the same program, modified in place; number of copies made).
    """
    from executorch.exir.backend.canonical_partitioners.duplicate_constant_node_pass import duplicate_constant_node
    from torch.export.graph_signature import InputKind

    kinds = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}
    shared = [spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind in kinds]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    copies = 0
    for name in shared:
        if name in nodes and len(nodes[name].users) > 1:
            copies += len(duplicate_constant_node(ep, name))
    if copies:
        ep.graph_module.recompile()
    return ep, copies


def non_delegated_ops(program) -> dict[str, int]:
    """Histogram of the call_function ops of a lowered edge program that did not go into a delegate blob
    (`executorch_call_delegate` and `getitem` excluded). These run on ExecuTorch's portable CPU kernels."""
    hist: collections.Counter = collections.Counter()
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "executorch_call_delegate" in name or name == "getitem":
            continue
        hist[_op_name(node.target)] += 1
    return dict(sorted(hist.items()))


def delegated_op_counts(program) -> dict[str, int]:
    """Histogram of the ops inside the XNNPACK delegate blobs (from each lowered module's original program);
    an int8 export shows quantize/dequantize ops here when the quantized graph was delegated."""
    hist: collections.Counter = collections.Counter()
    gm = program.graph_module
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.target.startswith("lowered_module"):
            continue
        sub = getattr(gm, node.target)
        original = getattr(sub, "original_module", None)
        if original is None:
            continue
        for n in original.graph_module.graph.nodes:
            if n.op == "call_function":
                hist[_op_name(n.target)] += 1
    return dict(sorted(hist.items()))


def debug_map(lowered) -> dict[str, Any]:
    """What `edgeseg bench --profile` needs to attribute ETDump events to model parts without an ETRecord (which
    would store the whole program again): the op and module path behind each top-level debug handle, and each XNNPACK
    delegate's ops in graph order with the set of debug handles they carry. Read before `to_executorch`, whose
    passes rewrite the top-level graph; `instruction_map` then keys both by program instruction."""
    def entry(n) -> list:
        return [_op_name(n.target), module_path(n)]

    gm = lowered.graph_module
    top: dict[int, list] = {}
    delegates = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.meta.get("debug_handle") is not None:
            top.setdefault(node.meta["debug_handle"], entry(node))
        if node.op == "get_attr" and str(node.target).startswith("lowered_module"):
            original = getattr(getattr(gm, node.target), "original_module", None)
            inner = [n for n in (original.graph_module.graph.nodes if original is not None else ())
                     if n.op == "call_function" and n.meta.get("debug_handle") is not None]
            delegates.append(({n.meta["debug_handle"] for n in inner}, [entry(n) for n in inner]))
    return {"top": top, "delegates": delegates}


def instruction_map(info: dict[str, Any], handle_map: dict) -> dict[str, dict]:
    """{"ops": {instruction: [op, path]}, "delegates": {instruction: [[op, path], ...]}} from `debug_map`'s record
    and `ExecutorchProgramManager.debug_handle_map["forward"]` (instruction -> debug handle(s)). A delegate call's
    instruction carries exactly its delegated nodes' handles; handles of decomposed ops repeat (one per original
    node), and top-level handles may equal delegated ones, so both readings are kept and the ETDump event's kind
    (OPERATOR_CALL / DELEGATE_CALL) picks one."""
    ops, delegates = {}, {}
    for instr, handles in handle_map.items():
        hs = set(handles) if isinstance(handles, (list, tuple)) else {handles}
        match = [seq for hset, seq in info["delegates"] if hset == hs]
        if match:
            delegates[str(instr)] = match[0]
        hit = next((info["top"][h] for h in sorted(hs) if h in info["top"]), None)
        if hit is not None:
            ops[str(instr)] = hit
    return {"ops": ops, "delegates": delegates}


def _op_name(target) -> str:
    name = str(getattr(target, "_name", None) or getattr(target, "__name__", target))
    return name.replace("::", ".")


class ExecutorchExporter(Exporter):
    """`.pte` for ExecuTorch with the XNNPACK delegate; fp32, or int8 via PT2E with the XNNPACK quantizer."""

    name = "executorch"
    precisions = ("fp32", "int8")
    Options = ExecutorchOptions
    tools = ("executorch", "torch", "torchao")

    def quantizer(self, options: ExportOptions | None = None, is_qat: bool = False):
        """XNNPACKQuantizer with the symmetric int8 config (per-channel weights unless options say otherwise):
        this exporter's PTQ and the scheme `edgeseg qat --target executorch-xnnpack` trains for."""
        return xnnpack_quantizer(per_channel=getattr(options, "per_channel", True), is_qat=is_qat)

    def qat_graph_passes(self) -> list:
        """XNNPACK's quantizer leaves a conv unannotated when its weight already serves another conv: each extra
        use of a trained weight reads a clone of it (exact; edgeseg.export.qat_graph.unshare_weight_uses)."""
        from edgeseg.export.qat_graph import unshare_weight_uses

        return [unshare_weight_uses]

    def ptq_quantizer(self, model, options: ExportOptions | None = None):
        """(quantizer, policy) for PTQ of an ExportWrapper: `quantizer(options)` with the float policy's filter
        (edgeseg.quant.policy: NMF2D, OffsetLearning, AFM and options.keep_float stay float)."""
        policy = export_float_policy(model, options or self.Options())
        return policy.apply_pt2e(self.quantizer(options)), policy

    def fallback_ops(self, lowered) -> list[str]:
        return sorted(non_delegated_ops(lowered))

    def int8_scheme(self, target: str, options: ExportOptions):
        """XNNPACKQuantizer's symmetric config: symmetric int8 weights, asymmetric int8 activations."""
        from edgeseg.quant.sensitivity import Int8Scheme

        per_channel = bool(getattr(options, "per_channel", True))
        chan = "per-channel" if per_channel else "per-tensor"
        return Int8Scheme(target, f"XNNPACKQuantizer symmetric config: int8 symmetric {chan} weights, int8 "
                          "asymmetric per-tensor activations", w_qmin=-127, w_qmax=127, w_div=127.0,
                          per_channel=per_channel, activations="asymmetric", a_qmin=-128, a_qmax=127,
                          options={"per_channel": per_channel})

    def export(self, job: ExportJob) -> ExportResult:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        model, precision, calib_data, options = job.model, job.precision, job.calib, job.options
        out_dir = Path(job.out_dir)
        example = (model.example_input(),)
        graph = getattr(model, "model", model)
        if job.qat and isinstance(graph, torch.fx.GraphModule):
            # for QAT checkpoints converted before QAT's convert ran this pass (a no-op on the others)
            requantize_after_zero_pad(graph)
        with job.stage("torch_export", "torch.export"):
            ep = torch.export.export(model, example, strict=False)
        quant: dict[str, Any] = {}
        if job.qat:
            # a QAT checkpoint's converted graph: the q/dq ops with the learned scales are already in `ep`
            quant = {**job.qat, "calibration_images": 0}
        elif precision == "int8":
            if calib_data is None or not calib_data.inputs:
                raise UsageError("--precision int8: executorch-xnnpack needs calibration images")
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            with job.stage("quantize", "PT2E quantization"):
                quantizer, policy = self.ptq_quantizer(model, options)  # float modules: ops left unannotated
                # a conv whose weight is shared (FreqFusion's one-hot kernels, content_encoder on hr and lr) is
                # left unannotated by the XNNPACK quantizer while its input is dequantized: XNNPACK then takes it
                # as a quantized conv with an fp32 weight and fails at load ("Failed to create convolution node")
                ep, _ = unshare_constants(ep)
                prepared = prepare_pt2e(ep.module(), quantizer)
                float_ops = sum(1 for n in prepared.graph.nodes
                                if n.op == "call_function" and policy.node_is_float(n))
                with torch.no_grad():
                    for x in calib_data.inputs:
                        prepared(x)
                converted = convert_pt2e(prepared)
                requantize_after_zero_pad(converted)  # XNNPACK refuses a "quantized" pad with a float output
                ep = torch.export.export(converted, example, strict=False)
            quant = {"scheme": "PT2E static int8", "quantizer": "XNNPACKQuantizer symmetric",
                     "per_channel_weights": options.per_channel, "activations": "int8 asymmetric per-tensor",
                     "calibration_images": len(calib_data.inputs), "float_modules": policy.to_json(),
                     "float_ops": float_ops}
        rewritten = 0
        with job.stage("decompose", "graph rewrites for XNNPACK"):
            if options.fix_channels_last_softmax:
                ep, rewritten = rewrite_last_dim_softmax(ep, example)
            ep = delegate_friendly_decompositions(ep)
            ep, unshared = unshare_constants(ep)
        with job.stage("to_edge_transform_and_lower", "lowering"):
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        lowered = edge.exported_program()
        hist = non_delegated_ops(lowered)
        delegates = sum(1 for n in lowered.graph_module.graph.nodes
                        if n.op == "call_function" and "executorch_call_delegate" in str(n.target))
        delegated = delegated_op_counts(lowered)
        handles = debug_map(lowered)  # before to_executorch, whose passes rewrite the top-level graph
        with job.stage("to_executorch"):
            prog = edge.to_executorch()
        (Path(out_dir) / MODEL_FILE).write_bytes(prog.buffer)
        dmap = instruction_map(handles, prog.debug_handle_map.get("forward", {}))
        (Path(out_dir) / DEBUG_MAP).write_text(json.dumps(dmap, separators=(",", ":")))
        log.info("executorch: timings %s; %d delegate call(s); off XNNPACK: %s", job.timings, delegates,
                 hist or "none")
        return ExportResult(
            files=[MODEL_FILE, DEBUG_MAP], fallback_ops=sorted(hist), executed_here=True, quantization=quant,
            inspection={"delegate_calls": delegates, "non_delegated_op_counts": hist,
                        "delegated_op_counts": delegated, "softmax_rewritten_for_xnnpack": rewritten,
                        "constants_unshared": unshared})


EXPORTER = ExecutorchExporter
