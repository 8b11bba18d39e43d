"""OpenVINO exporter: IR (`model.xml` + `model.bin`) through `ov.convert_model`; fp32, fp16 (weights stored fp16),
int8 through NNCF post-training quantization of the OpenVINO model, or, for a QAT checkpoint (`edgeseg qat
--target openvino`), the converted PT2E graph as is: `ov.convert_model` turns its quantize/dequantize pairs into
FakeQuantize nodes with the learned scales and NNCF is not run. Heavy imports stay inside functions.

Conversion route: `torch.export.export(wrapper)` -> `ov.convert_model(ExportedProgram)`. Measured here (openvino
2026.4.1, torch 2.13): OffSeg-T converts through torch.export but not through the TorchScript module route, so the
module route (`ov.convert_model(module, example_input=...)`) is only the fallback when torch.export fails. The
ExportedProgram route yields dynamic N/H/W (`?,3,?,?`); the IR is reshaped to the static export size.

GroupNorm crash (openvino 2026.4.1, CPU plugin, measured here): `compile_model` segfaults on a graph where a
GroupNorm+ReLU output feeds both a second GroupNorm and a residual Add with that GroupNorm's output
(`y = relu(gn1(x)); relu(y + gn2(f(y)))`, SegNeXt's squeeze -> Hamburger -> `relu(x + ham_out(...))`). The crash is
in the CPU plugin's snippets tokenization of `GroupNormalization` (compile with `SNIPPETS_MODE=DISABLE` works); it
hits every static-shape SegNeXt IR and the dynamic-shape SegNeXt-AFM IR. It is neither the ExportWrapper nor the
I/O renaming: a bare torch.export -> convert_model -> compile_model of the model segfaults the same way. Fix,
here and for every consumer of the IR (no plugin option needed): `decompose_group_norm` rewrites each
`GroupNormalization` node into Reshape -> MVN -> Reshape -> Multiply -> Add (bitwise-close: max |d| ~5e-8).

int8 (NNCF PTQ, its overflow fix and the float policy's IgnoredScope) and the QAT quantizer: `quantize.py`;
what the manifest reports about the IR (histograms, device queries): `inspection.py`.

Fallback ops: the CPU plugin has no fallback device (an op it does not take fails `compile_model`), so a CPU IR
that compiles has none; everything our models use is supported (grid_sample -> GridSample, unfold, bicubic ->
Interpolate cubic, atan2). For other devices `Core.query_model` lists the ops the plugin takes, run in a child
process (a plugin crash must not take the export down). For int8 the manifest also lists (in `inspection`) the
compute layers that still run in float.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeseg.errors import ArtifactError, UsageError, one_line
from edgeseg.export.base import (
    INPUT_NAME,
    Exporter,
    ExportJob,
    ExportOptions,
    ExportResult,
    export_float_policy,
)
from edgeseg.targets.openvino.inspection import (
    constant_dtypes,
    fake_quantize_levels,
    op_histogram,
    query_in_child,
    runtime_precisions,
)
from edgeseg.targets.openvino.quantize import float_node_names, quantize, quantized_float_nodes

log = logging.getLogger(__name__)

MODEL_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
OVERFLOW_FIX = ("auto", "enable", "first_layer_only", "disable")
INFERENCE_PRECISIONS = ("auto", "f32", "bf16")


@dataclass
class OpenVINOOptions(ExportOptions):
    """openvino options.

    Attributes:
        device: OpenVINO device the fallback query and the proof use ("CPU"; "GPU"/"NPU" where present).
        route: "auto" (torch.export, then the TorchScript module route if that fails), "export" or "module".
        overflow_fix: int8: NNCF overflow fix, "auto" (from this CPU's flags, see `resolve_overflow_fix`), "enable"
            (7-bit weights everywhere; needed on AVX2 CPUs without VNNI), "first_layer_only" (NNCF's default) or
            "disable".
        preset: int8: NNCF preset, "performance" (symmetric activations) or "mixed" (asymmetric activations).
        model_type: int8: "" or "transformer" (NNCF keeps softmax/LayerNorm-adjacent ops float for transformers).
        fast_bias_correction: int8: NNCF's fast bias correction (the slow one needs many more images).
        inference_precision: what the CPU plugin computes the float parts in (fp32 IRs, and the float islands
            of int8 IRs): "auto" (bf16 where this CPU computes bf16 natively, AVX512_BF16 or AMX-BF16, as
            OpenVINO's own default does; f32 elsewhere), "f32" (strict fp32) or "bf16". The export resolves
            "auto" from the host's flags and records the value (and why) in the manifest; the proof and
            `validate` measure its accuracy, and sessions compute with it (falling back to f32 on a CPU without
            native bf16). Measured (offseg_t fp32 IR, 384x480, 2 threads, AMD EPYC with AVX512_BF16): 163 ms
            f32 against 86 ms bf16.
    """

    device: str = "CPU"
    route: str = "auto"
    overflow_fix: str = "auto"
    preset: str = "performance"
    model_type: str = ""
    fast_bias_correction: bool = True
    inference_precision: str = "auto"

    def validate(self, where: str = "options") -> None:
        super().validate(where)
        for key, choices in (("route", ("auto", "export", "module")), ("overflow_fix", OVERFLOW_FIX),
                             ("inference_precision", INFERENCE_PRECISIONS),
                             ("preset", ("performance", "mixed")), ("model_type", ("", "transformer"))):
            if getattr(self, key) not in choices:
                raise UsageError(f"{where}.{key}: {getattr(self, key)!r} is not one of "
                                 f"{', '.join(repr(c) for c in choices)}")


def resolve_inference_precision(requested: str) -> tuple[str, str]:
    """(the CPU plugin's INFERENCE_PRECISION_HINT, why) for `requested`; "auto" decides from the host CPU."""
    from edgeseg.cpu import resolve_auto

    return resolve_auto(requested, lambda cpu: cpu.native_bf16, "bf16", "f32",
                        "computes bf16 natively (OpenVINO's default there)", "has no native bf16")


@dataclass
class Converted:
    """What `convert` returns: the OV model, the route used, and the FX graph the OpenVINO frontend converted
    (torch.export route only; its node names prefix the OV node names) for the float-policy name mapping."""

    model: Any
    route: str
    fx_graph: Any = None
    group_norms_decomposed: int = 0


def _fx_decoder(ep):
    """openvino's own FX decoder of an ExportedProgram (it applies openvino's decomposition table); its
    `pt_module` is the exact FX graph whose node names the OV nodes carry. None if this openvino lacks it."""
    try:
        from openvino.frontend.pytorch.fx_decoder import TorchFXPythonDecoder
    except ImportError:  # pragma: no cover - other openvino versions
        return None
    return TorchFXPythonDecoder.from_exported_program(ep)


def convert(model, route: str = "auto", static: bool = True) -> Converted:
    """torch module (an ExportWrapper or any module with `example_input()`) -> Converted (ov.Model reshaped to the
    example's static shape, GroupNorm decomposed; see the module docstring). The ExportedProgram route first."""
    import openvino as ov
    import torch

    example = model.example_input()
    errors = []
    ov_model, used, fx_graph = None, None, None
    if route in ("auto", "export"):
        try:
            ep = torch.export.export(model, (example,))
            decoder = _fx_decoder(ep)
            if decoder is not None:
                ov_model, fx_graph = ov.convert_model(decoder), decoder.pt_module
            else:  # pragma: no cover
                ov_model = ov.convert_model(ep)
            used = "torch.export"
        except Exception as e:  # noqa: BLE001 - tried next route / reported below
            errors.append(f"torch.export route: {one_line(e, with_type=True)}")
            log.info("openvino: torch.export route failed (%s)", errors[-1])
    if ov_model is None and route in ("auto", "module"):
        try:
            with torch.no_grad():
                ov_model, used = ov.convert_model(model, example_input=example), "module (TorchScript)"
        except Exception as e:  # noqa: BLE001
            errors.append(f"module route: {one_line(e, with_type=True)}")
    if ov_model is None:
        raise ArtifactError(f"openvino: ov.convert_model failed; {'; '.join(errors)}")
    if len(ov_model.inputs) != 1 or len(ov_model.outputs) != 1:
        raise ArtifactError(f"openvino: converted model has {len(ov_model.inputs)} inputs and "
                            f"{len(ov_model.outputs)} outputs; expected one of each")
    if static:
        ov_model.reshape({ov_model.inputs[0]: ov.PartialShape(list(example.shape))})
    n_gn = decompose_group_norm(ov_model)
    if fx_graph is not None:
        tag_module_paths(ov_model, fx_graph)
    return Converted(ov_model, used, fx_graph, n_gn)


def tag_module_paths(ov_model, fx_graph) -> int:
    """Store the module path of every op (the innermost `nn_module_stack` entry of the FX node its friendly name
    starts with) in the model's rt_info as one JSON object {fx node name: module path}, which the IR keeps (an
    op's own rt_info strings are not serialized): `edgeseg bench --profile` rolls per-layer time up to model parts
    with it. Returns the number of ops covered."""
    import json

    from edgeseg.export.base import module_path
    from edgeseg.runtime.base import RT_INFO_KEY

    path_of = {node.name: path for node in fx_graph.graph.nodes if (path := module_path(node)) is not None}
    used = {}
    tagged = 0
    for op in ov_model.get_ops():
        name = op.get_friendly_name().split("/", 1)[0]
        if name in path_of:
            used[name] = path_of[name]
            tagged += 1
    ov_model.set_rt_info(json.dumps(used, separators=(",", ":")), [RT_INFO_KEY])
    return tagged


def decompose_group_norm(ov_model) -> int:
    """Replace every `GroupNormalization` node by Reshape(N,G,-1) -> MVN(axis 2, eps inside sqrt) -> Reshape back
    -> Multiply(scale) -> Add(bias); returns how many. Works around the openvino 2026.4.1 CPU-plugin segfault in
    `compile_model` (snippets tokenization of GroupNormalization; see the module docstring). New nodes are named
    `<GroupNormalization's name>/decomposed/...` so that float-policy name matching still sees them."""
    import numpy as np
    import openvino.opset13 as ops

    n = 0
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "GroupNormalization":
            continue
        x, scale, bias = (op.input_value(i) for i in range(3))
        attrs = op.get_attributes()
        groups, eps, name = int(attrs["num_groups"]), float(attrs["epsilon"]), op.get_friendly_name()
        rank = x.get_partial_shape().rank
        if not rank.is_static:
            raise ArtifactError(f"openvino: GroupNormalization {name} has a dynamic rank; cannot decompose it")
        param_shape = ops.constant(np.array([1, -1] + [1] * (rank.get_length() - 2), np.int64))
        nodes = {
            "shape": ops.shape_of(x),
            "grouped": ops.reshape(x, ops.constant(np.array([0, groups, -1], np.int64)), special_zero=True),
        }
        nodes["mvn"] = ops.mvn(nodes["grouped"], ops.constant(np.array([2], np.int64)), True, eps, "inside_sqrt")
        nodes["ungrouped"] = ops.reshape(nodes["mvn"], nodes["shape"], special_zero=False)
        nodes["scale"] = ops.multiply(nodes["ungrouped"], ops.reshape(scale, param_shape, special_zero=False))
        nodes["bias"] = ops.add(nodes["scale"], ops.reshape(bias, param_shape, special_zero=False))
        for key, node in nodes.items():
            node.set_friendly_name(f"{name}/decomposed/{key}")
        out = nodes["bias"].output(0)
        out.get_tensor().set_names(op.output(0).get_tensor().get_names())
        op.output(0).replace(out)
        n += 1
    if n:
        ov_model.validate_nodes_and_infer_types()
    return n


def name_io(ov_model, output_name: str) -> None:
    """Give the IR the manifest's tensor names (input "image", output "logits"/"class_map")."""
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    ov_model.outputs[0].get_tensor().set_names({output_name})


class OpenVINOExporter(Exporter):
    """OpenVINO IR for Intel CPU/GPU/NPU: fp32, fp16 (fp16 weights), int8 (NNCF PTQ, or a QAT checkpoint's graph)."""

    name = "openvino"
    precisions = ("fp32", "fp16", "int8")
    Options = OpenVINOOptions
    tools = ("openvino", "nncf", "torch")

    def quantizer(self, options: ExportOptions | None = None, is_qat: bool = False):
        """The PT2E quantizer `edgeseg qat --target openvino` trains for: executorch's OpenVINOQuantizer (NNCF's
        INT8_SYM placement) with fake quants (quantize.openvino_qat_quantizer). The PTQ itself is NNCF on
        the converted OpenVINO model (quantize.quantize), not PT2E."""
        from edgeseg.targets.openvino.quantize import openvino_qat_quantizer

        return openvino_qat_quantizer()

    def int8_scheme(self, target: str, options: ExportOptions):
        """NNCF's int8 as it quantizes here: symmetric per-channel weights (7-bit where the overflow fix applies,
        resolved from this CPU), activations by the preset."""
        from edgeseg.targets.openvino.quantize import resolve_overflow_fix
        from edgeseg.quant.sensitivity import Int8Scheme

        fix, why = resolve_overflow_fix(options.overflow_fix)
        # NNCF's overflow fix: 7-bit weights everywhere ("enable") or in the first layer only
        seven = {"w_qmin": -63, "w_qmax": 63, "w_div": 63.0}
        weights = seven if fix == "enable" else {"w_qmin": -127, "w_qmax": 127, "w_div": 127.0}
        first = {"first_w_qmin": -63, "first_w_qmax": 63, "first_w_div": 63.0} if fix == "first_layer_only" else {}
        acts = ({"activations": "signed_by_range"} if options.preset == "performance" else
                {"activations": "asymmetric", "a_qmin": 0, "a_qmax": 255})
        return Int8Scheme(target, "NNCF: int8 symmetric per-channel weights"
                          + {"enable": " 7-bit (overflow fix)", "first_layer_only": " (7-bit in the first layer)"}
                          .get(fix, "") + ", int8 per-tensor activations "
                          + ("symmetric" if options.preset == "performance" else "asymmetric"), per_channel=True,
                          **weights, **first, **acts,
                          options={"overflow_fix": fix, "overflow_fix_reason": why, "preset": options.preset})

    def export(self, job: ExportJob) -> ExportResult:
        import openvino as ov

        model, options = job.model, job.options
        out_dir = Path(job.out_dir)
        # the manifest's options carry the resolved hint, which sessions compute with
        options.inference_precision, precision_why = resolve_inference_precision(options.inference_precision)
        with job.stage("convert_model", "ov.convert_model"):
            converted = convert(model, options.route)
            name_io(converted.model, model.output_contract(job.spec.num_classes)["name"])
        ov_model, quant, float_names = _quantize(converted, job)
        with job.stage("save_model", "ov.save_model"):
            ov.save_model(ov_model, str(out_dir / MODEL_FILE), compress_to_fp16=(job.precision == "fp16"))

        core = ov.Core()
        saved = core.read_model(str(out_dir / MODEL_FILE))
        inspection = _inspect(saved, converted, job, float_names)
        inspection["inference_precision"] = {"hint": options.inference_precision, "why": precision_why}
        fallback = _compile(core, saved, job, inspection)
        executed = options.device in core.available_devices
        return ExportResult(files=[MODEL_FILE, WEIGHTS_FILE], fallback_ops=fallback, executed_here=executed,
                            not_executed_reason=None if executed else
                            f"OpenVINO device {options.device!r} is not available on this host "
                            f"(available: {', '.join(core.available_devices)})",
                            quantization=quant, inspection=inspection)


def _quantize(converted: Converted, job: ExportJob) -> tuple[Any, dict[str, Any], list[str]]:
    """(OV model to save, quantization record, float policy node names) of a job."""
    quant: dict[str, Any] = {}
    float_names: list[str] = []
    ov_model = converted.model
    if job.qat:
        # QAT graph (edgeseg qat): its q/dq ops with the learned scales became FakeQuantize nodes in
        # convert_model; NNCF PTQ on top would re-calibrate them and throw the learned scales away.
        quant = {**job.qat, "calibration_images": 0,
                 "conversion": "ov.convert_model of the QAT-converted PT2E graph (q/dq -> FakeQuantize); "
                               "no NNCF PTQ"}
    elif job.precision == "int8":
        with job.stage("nncf_quantize", "NNCF quantization"):
            policy = export_float_policy(job.model, job.options)
            float_names = float_node_names(converted, policy)
            ov_model, quant = quantize(ov_model, job.calib, job.options, float_names)
        quant["float_modules"] = policy.to_json()
    return ov_model, quant, float_names


def _inspect(saved, converted: Converted, job: ExportJob, float_names: list[str]) -> dict[str, Any]:
    """The manifest's inspection of the saved IR; ArtifactError when an int8 IR is not quantized as asked."""
    from edgeseg.cpu import host_cpu

    path = Path(job.out_dir) / MODEL_FILE
    hist = op_histogram(saved)
    inspection: dict[str, Any] = {"route": converted.route, "op_histogram": hist,
                                  "constant_dtypes": constant_dtypes(saved), "device": job.options.device,
                                  "host_cpu": host_cpu().to_json()}
    if job.precision == "int8":
        if not hist.get("FakeQuantize"):
            raise ArtifactError(f"{path}: int8 export holds no FakeQuantize node")
        inspection["fake_quantize_levels"] = fake_quantize_levels(saved)
        inspection["float_policy_nodes"] = len(float_names)
        leaked = quantized_float_nodes(saved, float_names)
        if leaked:
            raise ArtifactError(f"{path}: {len(leaked)} node(s) of float modules read int8 "
                                f"FakeQuantize outputs (e.g. {leaked[0]}); the float policy was not applied")
    if converted.group_norms_decomposed:
        inspection["group_norms_decomposed"] = converted.group_norms_decomposed
    if job.precision == "fp16":
        inspection["note"] = ("fp16 IR: weights stored as fp16 and decompressed at load; the CPU plugin "
                              "computes in its default inference precision (f32 on CPUs without native "
                              "fp16/bf16, as here)")
    return inspection


def _compile(core, saved, job: ExportJob, inspection: dict[str, Any]) -> list[str] | None:
    """Compile the IR on the options' device where present (adding runtime precisions to `inspection`) -> the
    fallback ops (None when unknown)."""
    options = job.options
    fallback: list[str] | None = None
    if options.device in core.available_devices:
        config = {"INFERENCE_NUM_THREADS": max(1, options.num_threads)}
        if options.device == "CPU":
            config["INFERENCE_PRECISION_HINT"] = options.inference_precision
        with job.stage("compile_model", f"compile_model on {options.device}"):
            compiled = core.compile_model(saved, options.device, config)
        if options.device == "CPU":
            # The CPU plugin has no fallback device: an op it does not take fails compile_model, so a compiled
            # CPU model has none. (Core.query_model is asked, in a child process, for other devices.)
            fallback = []
            rp = runtime_precisions(compiled)
            inspection["runtime_precisions"] = rp
            if job.precision == "int8":
                inspection["float_compute_layers"] = {k: sum(n for p, n in v.items() if p not in ("u8", "i8"))
                                                      for k, v in rp.items()}
    if options.device != "CPU":
        fallback = query_in_child(Path(job.out_dir) / MODEL_FILE, options.device)
    return fallback


EXPORTER = OpenVINOExporter
