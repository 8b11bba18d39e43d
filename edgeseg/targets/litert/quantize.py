"""int8 of a `.tflite` with ai-edge-quantizer (installed with litert-torch): full-integer static quantization of the
fp32 flatbuffer, calibrated on the target's calibration images.

Recipes (`LiteRTOptions.recipe`), both int8 symmetric per-channel weights, int8 asymmetric per-tensor activations,
min/max calibration:
  * "xnnpack" (default): int8 only for XNNPACK_INT8_OPS -- the ops XNNPACK runs in int8: conv, depthwise conv, FC,
    batch matmul with a constant operand and the add/sub/mul/concat/pad/resize/reshape/transpose/slice/pool/mean ops
    between them, so int8 flows conv to conv -- and float for the rest (batch matmuls of two activations included): GELU, SOFTMAX, DIV, RSQRT, SQRT, SQUARED_DIFFERENCE, SUM, ...,
    plus every op of a LayerNorm/GroupNorm module (XNNPACK_FLOAT_SCOPES). ai-edge-quantizer puts a DEQUANTIZE
    before and a QUANTIZE after each float run; XNNPACK takes those too. Measured on segnext_t_offset_camvid at
    384x480 (CamVid val, Intel Xeon AVX-512/VNNI/AMX, 1 thread): see the numbers in `__init__`'s options docstring.
  * "static_wi8_ai8": ai-edge-quantizer's own recipe, every op it supports int8, GELU (int8 LUT) and the
    LayerNorm arithmetic included. On segnext_t_offset: 94.3 % argmax agreement with fp32 and a 2.63-point mIoU
    drop on CamVid val; XNNPACK refused the int8 GELU/RSQRT/SQUARED_DIFFERENCE and some ADD/SUB (49 partitions).
Additions to both:
  * The graph's input and output stay float32 (the recipe's virtual INPUT/OUTPUT ops set to no_quantize; the
    quantizer then puts a QUANTIZE op after the input and a DEQUANTIZE op before the output), so an int8 artifact
    keeps every target's contract: float32 normalised NCHW in, float logits out. (Without them the model has int8
    I/O tensors, input scale 0.0078 / zero point -1 on offseg_lite0, and every caller would have to quantize.)
  * The float policy (edgeseg.quant.policy: OffsetLearning, NMF2D, AFM, BilinearGather, SSAClassifier, plus
    `keep_float`) as no_quantize entries whose scope regexes match the module paths that litert-torch writes into
    tensor names (`inspection.scope_regex`). Measured before this was added: offseg_lite0's all-int8 model failed
    on random-noise input in OffsetLearning's LayerNorm DIV (the int8 variance rounds to its zero point:
    `div.cc:262 data[i] != zero_point`).
litert-torch's own PT2E int8 path is not used: on offseg_lite0 its converter failed after calibration ("operand #0
does not dominate this use" in the OffsetLearning head), and its quantizer annotates few op kinds.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any

from edgeseg.errors import ArtifactError, one_line
from edgeseg.targets.litert.inspection import op_scopes, read_model, scope_regex

log = logging.getLogger(__name__)

RECIPES = ("xnnpack", "static_wi8_ai8")
DEFAULT_RECIPE = "xnnpack"
NO_QUANTIZE = "no_quantize"

# recipe "xnnpack": the ops quantized to int8 (static, int8 per-channel weights, int8 per-tensor activations). The
# compute ops XNNPACK runs in int8 (conv, depthwise conv, FC, batch matmul), and the data-movement / elementwise ops
# between them that XNNPACK also runs in int8, so that int8 flows from one conv to the next without a
# DEQUANTIZE/QUANTIZE pair around each. What XNNPACK's quantizer for ExecuTorch (PT2E) annotates, roughly.
XNNPACK_INT8_OPS = (
    "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D_TRANSPOSE", "FULLY_CONNECTED", "BATCH_MATMUL",
    "ADD", "SUB", "MUL", "CONCATENATION", "PAD", "PADV2", "RESHAPE", "TRANSPOSE", "SLICE", "STRIDED_SLICE", "SPLIT",
    "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN", "SPACE_TO_DEPTH",
    "HARD_SWISH", "LOGISTIC", "TANH", "RELU",
)
# Not in that list, so float (ai-edge-quantizer puts a DEQUANTIZE before and a QUANTIZE after them): GELU (XNNPACK
# has no int8 GELU: the int8 LUT kernel ran off the delegate, 27 partition breaks on segnext), RSQRT / SQRT /
# SQUARED_DIFFERENCE / DIV (normalisation arithmetic: an int8-rounded variance or denominator), SOFTMAX, SUM,
# MAXIMUM (XNNPACK left an int8 MAXIMUM off the delegate on tiny_ops), gathers/selects, and everything else.
# Module classes whose every op stays float under "xnnpack" (their MEAN/SUB/MUL/ADD would otherwise be int8 around a
# float RSQRT, and an int8-rounded mean/variance is what hurts): LayerNorm, GroupNorm, RMSNorm, matched on the op's
# scope (its output tensor names; litert-torch names each tensor by module path,
# `...torch.nn.modules.normalization.LayerNorm_<attribute>;<n>`). BatchNorm is not among them: it folds into the
# preceding conv, and an unfolded one (segnext's MSCABlock norm1) is a per-channel SUB/MUL/ADD that stays int8.
XNNPACK_FLOAT_SCOPES = (r"\.(LayerNorm|GroupNorm|RMSNorm)[A-Za-z0-9]*_[^/;]*;",)
# A BATCH_MATMUL of two activations (attention's QK^T and AV, CARAFE's per-pixel products) stays float under
# "xnnpack": LiteRT's XNNPACK delegate left 23 of offseg_t's 25 such int8 products on the builtin kernels (one
# partition break each); as float it takes them all. Measured on shipped offseg_t at 384x480, 2 threads, Intel Xeon
# (AVX-512, VNNI, AMX), `bench/interleaved.py`: int8 p50 367.6 -> 282.5 ms, partitions 24 -> 10. A BATCH_MATMUL with
# a constant operand (a Linear that litert-torch lowered to BATCH_MATMUL) stays int8.


def _static_op_config() -> dict[str, Any]:
    from ai_edge_quantizer import recipe as aeq_recipe

    (entry,) = aeq_recipe.static_wi8_ai8()
    return entry


def activation_matmul_scopes(model) -> list[str]:
    """ai-edge-quantizer scopes (output tensor names, ";"-joined, with its trailing ";") of the main subgraph's
    BATCH_MATMULs whose operands are both activations (no constant buffer)."""
    sg = model.subgraphs[0]

    def constant(i: int) -> bool:
        t = sg.tensors[i]
        buf = model.buffers[t.buffer] if t.buffer else None
        return buf is not None and ((buf.data is not None and len(buf.data) > 0) or bool(getattr(buf, "size", 0)))

    return [scope + ";" for op, (name, scope) in zip(sg.operators, op_scopes(model))
            if name == "BATCH_MATMUL" and not any(constant(i) for i in op.inputs if i != -1)]


def build_recipe(name: str, float_modules: list[str], float_io: bool = True,
                 float_matmuls: list[str] = ()) -> list[dict[str, Any]]:
    """The ai-edge-quantizer recipe (later entries win): `name`'s rules, then float I/O and the float modules'
    scopes left unquantized.

    "static_wi8_ai8": ai-edge-quantizer's own recipe, every op it supports int8 (incl. GELU, RSQRT, SOFTMAX, DIV).
    "xnnpack": only XNNPACK_INT8_OPS int8, XNNPACK_FLOAT_SCOPES float, and the BATCH_MATMULs whose scopes are in
    `float_matmuls` (activation x activation, `activation_matmul_scopes`) float (see above)."""
    from ai_edge_quantizer import recipe as aeq_recipe

    if name == "xnnpack":
        base = _static_op_config()
        entries = [{"regex": ".*", "operation": op, "algorithm_key": base["algorithm_key"],
                    "op_config": base["op_config"]} for op in XNNPACK_INT8_OPS]
        entries += [{"regex": r, "operation": "*", "algorithm_key": NO_QUANTIZE} for r in XNNPACK_FLOAT_SCOPES]
        entries += [{"regex": "^" + re.escape(sc) + "$", "operation": "BATCH_MATMUL", "algorithm_key": NO_QUANTIZE}
                    for sc in float_matmuls]
    else:
        entries = list(getattr(aeq_recipe, name)())
    if float_io:
        entries += [{"regex": ".*", "operation": op, "algorithm_key": NO_QUANTIZE} for op in ("INPUT", "OUTPUT")]
    entries += [{"regex": scope_regex(m), "operation": "*", "algorithm_key": NO_QUANTIZE} for m in float_modules]
    return entries


def recipe_record(name: str) -> dict[str, Any]:
    """What the manifest's quantization record says about the recipe."""
    if name == "xnnpack":
        return {"name": name, "int8_ops": list(XNNPACK_INT8_OPS), "float_scopes": list(XNNPACK_FLOAT_SCOPES),
                "float": "every other op (GELU, SOFTMAX, DIV, RSQRT, SQRT, SQUARED_DIFFERENCE, SUM, ...), the ops of "
                         "LayerNorm/GroupNorm modules, BATCH_MATMULs of two activations, the float modules"}
    return {"name": name, "int8_ops": "every op ai-edge-quantizer supports", "float": "the float modules"}


def float_ops_per_module(fp32: bytes, float_modules: list[str]) -> dict[str, int]:
    """Float module -> how many ops of the fp32 model its scope regex matches (a module matching none is not
    kept float: its ops were not found by name)."""
    import re

    scopes = op_scopes(read_model(fp32))
    return {m: sum(1 for _, s in scopes if re.search(scope_regex(m), s)) for m in float_modules}


def quantize(fp32: bytes, calib: list, recipe: str, float_modules: list[str], float_io: bool = True
             ) -> tuple[bytes, dict[str, Any]]:
    """(int8 flatbuffer, quantization record) of the fp32 flatbuffer `fp32`, calibrated on `calib` (numpy arrays in
    the model's input contract); `float_io`: keep float32 input/output (see the module docstring)."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer as aeq_quantizer

    sig = Interpreter(model_content=fp32).get_signature_list()
    if len(sig) != 1:
        raise ArtifactError(f"litert: expected one signature in the converted model, found {sorted(sig)}")
    key = next(iter(sig))
    inputs = sig[key]["inputs"]
    if len(inputs) != 1:
        raise ArtifactError(f"litert: expected one model input, found {inputs}")
    matched = float_ops_per_module(fp32, float_modules)
    float_matmuls = activation_matmul_scopes(read_model(fp32)) if recipe == "xnnpack" else []
    for m, n in matched.items():
        if not n:
            log.warning("litert: float module %s matched no op of the converted model by name; it is quantized", m)
    t = time.perf_counter()
    try:
        q = aeq_quantizer.Quantizer(bytearray(fp32))
        q.load_quantization_recipe(build_recipe(recipe, [m for m, n in matched.items() if n], float_io,
                                                float_matmuls))
        qsv = q.calibrate({key: [{inputs[0]: a} for a in calib]})
        t_cal = time.perf_counter() - t
        t = time.perf_counter()
        result = q.quantize(qsv)
    except Exception as e:  # noqa: BLE001 - the vendor tool's failure becomes one line
        raise ArtifactError(f"litert: ai-edge-quantizer ({recipe}) failed: {type(e).__name__}: {one_line(e)}") from e
    if not result.quantized_model:
        raise ArtifactError(f"litert: ai-edge-quantizer ({recipe}) returned no model")
    record = {"scheme": "ai-edge-quantizer static int8 (full integer)", "quantizer": f"ai_edge_quantizer {recipe}",
              "per_channel_weights": True, "weights": "int8 symmetric per-channel",
              "activations": "int8 asymmetric per-tensor (min/max)",
              "io": "float32 (QUANTIZE after the input, DEQUANTIZE before the output, in graph)" if float_io
              else "int8 input/output tensors (the session quantizes/dequantizes with their parameters)",
              "recipe": recipe_record(recipe),
              "calibration_images": len(calib), "float_ops_per_module": matched,
              "float_activation_matmuls": len(float_matmuls),
              "timings_s": {"calibrate": round(t_cal, 2), "quantize": round(time.perf_counter() - t, 2)}}
    return bytes(result.quantized_model), record
