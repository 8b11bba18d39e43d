"""What the manifest reports about a `.tflite`: the op histogram of the flatbuffer, tensor dtypes, and which ops the
LiteRT Interpreter's default XNNPACK delegate takes (the rest run on TFLite's builtin kernels).

The XNNPACK split is measured, not guessed: the Interpreter (default op resolver, XNNPACK delegate applied at
`allocate_tensors`) lists its nodes with `_get_ops_details()`: each DELEGATE node replaced a partition of the
original nodes, recovered by walking back from the DELEGATE node's output tensors to its input tensors. ai-edge-litert
2.3.0 does not emit XNNPACK's "Replacing N of M nodes" log line, and its Python wheel has no per-op profiler.
Heavy imports stay inside functions.
"""
from __future__ import annotations

import collections
import re
from typing import Any

_OP_NAMES: dict[int, str] | None = None


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _op_names() -> dict[int, str]:
    global _OP_NAMES
    if _OP_NAMES is None:
        _OP_NAMES = {v: k for k, v in vars(_schema().BuiltinOperator).items() if not k.startswith("_")}
    return _OP_NAMES


def read_model(data: bytes):
    """The flatbuffer's object API model (`ModelT`)."""
    schema = _schema()
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))


def op_name(model, op) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    name = _op_names().get(max(code.builtinCode, code.deprecatedBuiltinCode), str(code.builtinCode))
    if name == "CUSTOM":
        name = "CUSTOM:" + (code.customCode.decode() if code.customCode else "?")
    return name


def op_histogram(model) -> dict[str, int]:
    """Builtin op -> count over every subgraph, most frequent first."""
    hist: collections.Counter = collections.Counter(op_name(model, op) for sg in model.subgraphs for op in sg.operators)
    return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))


def tensor_dtypes(model) -> dict[str, int]:
    """Tensor type name -> count (main subgraph), e.g. {"FLOAT32": 120, "INT8": 300, "INT32": 40}."""
    names = {v: k for k, v in vars(_schema().TensorType).items() if not k.startswith("_")}
    hist = collections.Counter(names.get(t.type, str(t.type)) for t in model.subgraphs[0].tensors)
    return dict(sorted(hist.items()))


def op_output_dtypes(model) -> dict[str, dict[str, int]]:
    """Builtin op -> {dtype of its first output tensor: count} (main subgraph), e.g. {"CONV_2D": {"INT8": 76},
    "GELU": {"FLOAT32": 27}}: which ops run in int8 and which stay float."""
    names = {v: k for k, v in vars(_schema().TensorType).items() if not k.startswith("_")}
    sg = model.subgraphs[0]
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for op in sg.operators:
        outs = [i for i in op.outputs if i != -1]
        if len(outs):
            out[op_name(model, op)][names.get(sg.tensors[outs[0]].type, "?")] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def io_dtypes(model) -> dict[str, list[str]]:
    names = {v: k for k, v in vars(_schema().TensorType).items() if not k.startswith("_")}
    sg = model.subgraphs[0]
    return {"inputs": [names.get(sg.tensors[i].type, "?") for i in sg.inputs],
            "outputs": [names.get(sg.tensors[i].type, "?") for i in sg.outputs]}


def op_scopes(model) -> list[tuple[str, str]]:
    """(op name, scope) of each op of the main subgraph; the scope is what ai-edge-quantizer's recipe regexes match:
    the op's output tensor names joined with ";" (litert-torch names tensors by module path, e.g.
    "edgeseg.models.wrapper.ExportWrapper/edgeseg.models.offseg_lite.OffSegLite_model/...;3")."""
    sg = model.subgraphs[0]
    out = []
    for op in sg.operators:
        idx = [i for i in (op.outputs if len(op.outputs) else op.inputs) if i != -1]
        names = [sg.tensors[i].name.decode() if isinstance(sg.tensors[i].name, bytes) else str(sg.tensors[i].name)
                 for i in idx]
        out.append((op_name(model, op), ";".join(names)))
    return out


def scope_regex(module: str) -> str:
    """ai-edge-quantizer scope regex of the ops inside `module` (an ExportWrapper-relative dotted name such as
    "model.decode_head.offset_learning"): litert-torch names each level `<module>.<Class>_<attribute>` under
    `...ExportWrapper`, and an item of a ModuleList by its index alone, without the list's level
    ("decode_head.freqfusions.0" -> ".../OffSegHead_decode_head/edgeseg.models.freqfusion.FreqFusion_0"); the list's
    level is optional in the regex, so that a container litert-torch does name still matches."""
    level = r"[^/;]*\.[A-Za-z0-9]*_"
    names = module.split(".")
    out: list[str] = []
    for name in names:
        if name.isdigit() and out:  # the container before an index: present or not
            out[-1] = f"(?:{out[-1]}/)?"
        out.append(level + re.escape(name))
    return r"(^|;)[^/;]*ExportWrapper/" + "/".join(out).replace("/)?/", "/)?") + r"(/|;|$)"


def xnnpack_split(data: bytes, num_threads: int = 1) -> dict[str, Any]:
    """Which ops the Interpreter's default XNNPACK delegate takes (see the module docstring).

    Returns:
        {partitions (DELEGATE nodes), delegated {op: n}, not_delegated {op: n}, source}.
    """
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data, num_threads=num_threads)
    interp.allocate_tensors()  # the default delegate is applied here (no DELEGATE node before it)
    ops = interp._get_ops_details()
    orig = [o for o in ops if o["op_name"] != "DELEGATE"]
    delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
    producer = {int(t): o for o in orig for t in o["outputs"]}
    taken: set[int] = set()
    for d in delegates:
        stop = {int(t) for t in d["inputs"]}
        stack, seen = [int(t) for t in d["outputs"]], set()
        while stack:
            t = stack.pop()
            if t in seen or t in stop or t not in producer:
                continue
            seen.add(t)
            node = producer[t]
            taken.add(node["index"])
            stack.extend(int(i) for i in node["inputs"] if i >= 0)
    on, off = collections.Counter(), collections.Counter()
    for o in orig:
        (on if o["index"] in taken else off)[o["op_name"]] += 1
    return {"partitions": len(delegates), "delegated": dict(sorted(on.items())),
            "not_delegated": dict(sorted(off.items())),
            "source": "ai_edge_litert Interpreter nodes after allocate_tensors: the ops between each DELEGATE "
                      "node's inputs and outputs"}
