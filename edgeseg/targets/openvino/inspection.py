"""What the OpenVINO exporter (edgeseg.targets.openvino.exporter) reports about an IR: op and constant histograms,
FakeQuantize levels, the ops a device does not take (Core.query_model, in a child process) and the runtime
precision of each compute layer once compiled. Heavy imports stay inside functions.
"""
from __future__ import annotations

import collections
import logging
from pathlib import Path

from edgeseg.errors import one_line

log = logging.getLogger(__name__)

# OpenVINO op types that carry the arithmetic; used for the "still in float" report of int8 IRs.
_COMPUTE_OPS = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData", "FullyConnected")


def op_histogram(ov_model) -> dict[str, int]:
    hist = collections.Counter(op.get_type_name() for op in ov_model.get_ops())
    for skip in ("Parameter", "Result"):
        hist.pop(skip, None)
    return dict(sorted(hist.items()))


def constant_dtypes(ov_model) -> dict[str, int]:
    """How many constants (larger than 16 elements: weights, not scalars) of each element type the IR holds."""
    c: collections.Counter = collections.Counter()
    for op in ov_model.get_ops():
        if op.get_type_name() == "Constant":
            shape = op.get_output_partial_shape(0)
            n = 1
            for d in shape.to_shape():
                n *= d
            if n > 16:
                c[op.get_output_element_type(0).get_type_name()] += 1
    return dict(sorted(c.items()))


def fake_quantize_levels(ov_model) -> dict[str, int]:
    c: collections.Counter = collections.Counter()
    for op in ov_model.get_ops():
        if op.get_type_name() == "FakeQuantize":
            c[str(op.get_attributes()["levels"])] += 1
    return dict(c)


def unsupported_ops(core, ov_model, device: str) -> list[str]:
    """Ops of `ov_model` that `device` does not take ("Type friendly_name"), from Core.query_model."""
    supported = core.query_model(ov_model, device)
    return sorted(f"{op.get_type_name()} {op.get_friendly_name()}" for op in ov_model.get_ops()
                  if op.get_type_name() not in ("Parameter", "Result", "Constant")
                  and op.get_friendly_name() not in supported)


def query_in_child(xml: Path, device: str, timeout: float = 300) -> list[str] | None:
    """`unsupported_ops` of a saved IR in a child process (query_model can crash the interpreter); None if the
    device is absent or the query fails."""
    import json
    import subprocess
    import sys

    code = ("import json, sys, openvino as ov; from edgeseg.targets.openvino.inspection import unsupported_ops; "
            "c = ov.Core(); print(json.dumps(unsupported_ops(c, c.read_model(sys.argv[1]), sys.argv[2])))")
    try:
        r = subprocess.run([sys.executable, "-c", code, str(xml), device], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode == 0:
            return json.loads(r.stdout.strip().splitlines()[-1])
        log.warning("openvino: query_model on %s failed (exit %s); fallback ops unknown", device, r.returncode)
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        log.warning("openvino: query_model on %s failed (%s); fallback ops unknown", device, one_line(e, with_type=True))
    return None


def runtime_precisions(compiled) -> dict[str, dict[str, int]]:
    """Per compute layer type of the compiled (executable) graph: how many run at each runtime precision."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        layer = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
        if layer in _COMPUTE_OPS:
            prec = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else "?"
            out[layer][prec] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


__all__ = ["op_histogram", "constant_dtypes", "fake_quantize_levels", "unsupported_ops", "query_in_child",
           "runtime_precisions"]
