"""XNNPACK's graph passes on converted (q/dq) int8 graphs: the ExecuTorch exporter runs them on its PTQ graph and
on a QAT checkpoint's graph, QAT's convert (edgeseg.export.qat_graph) on the program it saves.

Must not import export runtimes at module level.
"""
from __future__ import annotations

import torch

_PAD_OPS = ("aten.pad.default", "aten.constant_pad_nd.default")
_Q = "quantized_decomposed.quantize_per_tensor.default"
_DQ = "quantized_decomposed.dequantize_per_tensor.default"


def requantize_after_zero_pad(gm: torch.fx.GraphModule) -> int:
    """Give every zero pad that reads a dequantized tensor a quantize/dequantize pair on its output with the
    input's parameters. Returns the number of pads changed (0 when there is nothing to do; safe to repeat).

    Why: executorch 1.5.1's XNNPACK partitioner delegates such a pad as a quantized op even when its output stays
    float; XNNPACK then refuses the program at load ("Failed to create StaticConstantPad node ...
    xnn_status_invalid_parameter"; offseg_t's FreqFusion pads in the QAT graph, tests/test_qat.py). The pair is
    exact: the pad's values are the input's grid points plus zeros, and 0 is on every int8 grid (its zero point).
    """
    q_op = torch.ops.quantized_decomposed.quantize_per_tensor.default
    dq_op = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or str(node.target) not in _PAD_OPS:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_function" and str(src.target) == _DQ):
            continue
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if mode != "constant" or value not in (None, 0, 0.0):
            continue  # only a zero pad keeps the values on the input's grid
        if node.users and all(u.op == "call_function" and str(u.target) == _Q for u in node.users):
            continue
        qargs = tuple(src.args[1:])  # scale, zero_point, quant_min, quant_max, dtype
        with gm.graph.inserting_after(node):
            q = gm.graph.call_function(q_op, (node, *qargs), dict(src.kwargs))
        with gm.graph.inserting_after(q):
            dq = gm.graph.call_function(dq_op, (q, *qargs), dict(src.kwargs))
        node.replace_all_uses_with(dq, delete_user_cb=lambda u: u is not q)
        for new in (q, dq):
            if "val" in node.meta:
                new.meta["val"] = node.meta["val"]
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


__all__ = ["requantize_after_zero_pad"]
