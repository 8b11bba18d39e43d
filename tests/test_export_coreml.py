"""Core ML target: real ct.convert on the tiny models at 64x64. Core ML cannot execute on Linux, so these tests
check the converted program's structure (op histogram, weight dtypes, quantized ops) and the manifest's
"not executed" record; on macOS the exporter's proof executes the artifact and the tests check it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402  (registers tiny_ops)

from edgeseg.errors import ArtifactError, UsageError  # noqa: E402
from edgeseg.export import export_checkpoint  # noqa: E402
from edgeseg.export.base import MANIFEST  # noqa: E402
from edgeseg.models import list_models  # noqa: E402
from edgeseg.runtime import open_session  # noqa: E402

pytest.importorskip("coremltools")

MODELS = [_tiny.TINY] + list_models("test_*")
# Fast suite: tiny_ops (the hard ops), SegNeXt (NMF) and OffSeg-AFM (OffsetLearning, AFM DFT); the other variants
# are marked slow. One export per (model, precision, options) is shared by the session (`exported`, conftest.py).
# W8A8 (PT2E CoreMLQuantizer) costs minutes per process on 2 cores: tiny_ops only in the fast suite.
FAST = {_tiny.TINY, "test_segnext", "test_offseg_afm"}
SUBSET = [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in MODELS]
HW = (64, 64)
ON_MAC = sys.platform == "darwin"


@pytest.fixture
def exported(exports):
    """The session's shared export cache (tests/conftest.py) for coreml."""
    def get(model: str = _tiny.TINY, precision: str = "fp16", **options) -> Path:
        return exports.get("coreml", model, precision, **options)

    return get


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _check_execution_record(m: dict) -> None:
    if ON_MAC:
        assert m["executed_here"] is True and m["proof"] is not None
    else:
        assert m["executed_here"] is False and m["proof"] is None
        assert "not execute" in m["not_executed_reason"] or "cannot execute" in m["not_executed_reason"]
        assert "Linux" in m["not_executed_reason"] or sys.platform != "linux"


def _weights(insp: dict) -> dict[str, int]:
    return insp["weight_dtypes"]


# Ops that every variant's program must hold (the backbone/head convs) and ops that must never survive conversion.
_NEVER = ("upsample_bicubic2d", "fft", "complex", "angle")


@pytest.mark.exports(lambda p: [("coreml", p["model"], "fp16")])
@pytest.mark.parametrize("model", SUBSET)
def test_fp16_program_structure(model, exported):
    art = exported(model, "fp16")
    m = _manifest(art)
    insp = m["inspection"]
    _check_execution_record(m)
    assert m["files"] == ["model.mlpackage"] and any(k.startswith("model.mlpackage/") for k in m["sha256"])
    assert insp["inputs"] == ["image"] and insp["outputs"] == ["logits"]
    hist = insp["op_histogram"]
    assert hist.get("conv", 0) >= 3, hist
    assert not insp["quantized_ops"], insp["quantized_ops"]
    w = _weights(insp)
    assert w.get("const: FLOAT16", 0) > 0 and not any("FLOAT32" in k for k in w), w  # every weight is fp16
    # no bicubic/FFT reached the converter: prepare_for_export baked them (nothing needed the rewrite either)
    assert not [op for op in insp["aten_ops"] if any(bad in op for bad in _NEVER)], insp["aten_ops"]
    assert insp["rewrites"] == {}
    assert m["tool_versions"]["coremltools"].startswith("9.")
    print(f"\n{model} fp16 ops: {hist}")


def test_tiny_ops_program_has_the_hard_ops(exported):
    """grid_sample -> resample, the CARAFE unfold -> conv, talking-head softmax, LayerNorm, bmm -> matmul."""
    hist = _manifest(exported(_tiny.TINY, "fp16"))["inspection"]["op_histogram"]
    for op in ("resample", "softmax", "layer_norm", "matmul", "upsample_nearest_neighbor", "gelu"):
        assert hist.get(op, 0) >= 1, (op, hist)


@pytest.mark.exports([("coreml", _tiny.TINY, "fp32")])
def test_fp32_program_keeps_fp32_weights(exported):
    m = _manifest(exported(_tiny.TINY, "fp32"))
    w = _weights(m["inspection"])
    assert w.get("const: FLOAT32", 0) > 0 and not any("FLOAT16" in k for k in w), w
    assert "cast" not in m["inspection"]["op_histogram"]  # no fp16 casts at the I/O


@pytest.mark.exports(lambda p: [("coreml", p["model"], "int8", {"int8_mode": "weights"})])
@pytest.mark.parametrize("model", [_tiny.TINY, pytest.param("test_offseg", marks=pytest.mark.slow)])
def test_weight_only_int8_has_int8_constexpr_weights(model, exported):
    m = _manifest(exported(model, "int8", int8_mode="weights"))
    insp = m["inspection"]
    assert insp["quantized_ops"].get("constexpr_affine_dequantize", 0) > 0, insp["quantized_ops"]
    assert "quantize" not in insp["quantized_ops"]  # activations stay fp16
    w = _weights(insp)
    assert w.get("constexpr_affine_dequantize.quantized_data: INT8", 0) > 0, w
    assert m["quantization"]["scheme"].startswith("weight-only int8")
    _check_execution_record(m)
    # test_offseg's FreqFusion `direct_scale` convs are zero-initialised and its layer scales underflow fp16 /127:
    # per channel, those got scale 0 (NaN before the int8 cast); every scale must be a usable number now
    consts = _quantized_constants(exported(model, "int8", int8_mode="weights") / "model.mlpackage")
    assert consts and all(np.isfinite(sc).all() and (sc > 0).all() for _, sc, _ in consts), \
        [name for name, sc, _ in consts if not (np.isfinite(sc).all() and (sc > 0).all())]


def _quantized_constants(mlpackage: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, scale, int8 data) of every constexpr_affine_dequantize in a saved program (read, not run)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    mlmodel = ct.models.MLModel(str(mlpackage), skip_model_load=True)
    spec = mlmodel.get_spec()
    prog = load(spec, spec.specificationVersion, mlmodel.weights_dir)
    out = []
    for fn in prog.functions.values():
        for op in fn.operations:
            if op.op_type == "constexpr_affine_dequantize":
                out.append((op.name, np.asarray(op.scale.val, np.float64), np.asarray(op.quantized_data.val)))
    return out


def test_weight_only_int8_zero_and_underflowing_channels(checkpoints, tmp_path):
    """A conv with all-zero output channels is quantized per tensor, one whose weights underflow an fp16 scale
    stays float; no RuntimeWarning from the quantizer, no zero or NaN scale, dequantized weights match."""
    import warnings

    from edgeseg.checkpoint import load_checkpoint, save_checkpoint

    model, spec = load_checkpoint(checkpoints(_tiny.TINY))
    with torch.no_grad():
        model.decode_head["kernel"].weight[:4] = 0  # 4 of 9 output channels all zero
        model.decode_head["offset"].weight.mul_(1e-6 / model.decode_head["offset"].weight.abs().max())
    ck = save_checkpoint(tmp_path / "ck", model, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        art = export_checkpoint(ck, "coreml", "int8", out=tmp_path / "art", int8_mode="weights")
    consts = {name: (sc, q) for name, sc, q in _quantized_constants(art / "model.mlpackage")}
    assert all(np.isfinite(sc).all() and (sc > 0).all() for sc, _ in consts.values()), consts
    kernel = [n for n in consts if "decode_head_kernel_weight" in n]
    assert len(kernel) == 1 and consts[kernel[0]][0].size == 1, kernel  # one scale: per tensor
    sc, q = consts[kernel[0]]
    w = model.decode_head["kernel"].weight.detach().numpy()
    assert np.abs(q.astype(np.float64) * sc.reshape(-1)[0] - w).max() <= sc.reshape(-1)[0] * 0.5 + 1e-3
    assert not any("decode_head_offset_weight" in n for n in consts), sorted(consts)  # stays float
    assert any("decode_head_cls_weight" in n for n in consts)  # the healthy convs stay per-channel int8


@pytest.mark.exports(lambda p: [("coreml", p["model"], "int8", {"int8_mode": "w8a8", "calib_count": 2})])
@pytest.mark.parametrize("model", [_tiny.TINY, pytest.param("test_segnext", marks=pytest.mark.slow)])
def test_w8a8_has_quantized_activations_and_int8_weights(model, exported):
    """test_segnext: NMF2D stays float (the float policy); quantized, its calibration saw NaN ("min nan should be
    less than max nan")."""
    m = _manifest(exported(model, "int8", int8_mode="w8a8", calib_count=2))
    insp = m["inspection"]
    q = insp["quantized_ops"]
    assert q.get("quantize", 0) > 0 and q.get("dequantize", 0) > 0, q
    assert any("INT8" in k for k in _weights(insp)), _weights(insp)
    assert "CoreMLQuantizer" in m["quantization"]["scheme"] and m["calibration"]["count"] >= 1
    if model == "test_segnext":
        assert "model.decode_head.hamburger.ham" in m["quantization"]["float_modules"], m["quantization"]
        assert m["quantization"]["float_ops"] > 0
    _check_execution_record(m)
    print(f"\nw8a8 ops: {insp['op_histogram']}\nweights: {_weights(insp)}")


def test_session_refuses_to_run_off_macos(exported):
    art = exported(_tiny.TINY, "fp16")
    with open_session(art) as s:
        assert s.executed is ON_MAC
        assert s.inspect()["op_histogram"]["conv"] >= 3
        x = np.zeros((1, 3, *HW), np.float32)
        if ON_MAC:
            assert s.run(x).shape[:2] == (1, len(_tiny.CLASSES))
        else:
            with pytest.raises(ArtifactError, match="Core ML cannot execute on this host"):
                s.run(x)


@pytest.mark.exports([("coreml", _tiny.TINY, "fp16", {"output": "argmax"})])
def test_argmax_output_converts(exported):
    m = _manifest(exported(_tiny.TINY, "fp16", output="argmax"))
    insp = m["inspection"]
    assert insp["outputs"] == ["class_map"] and m["output"]["kind"] == "argmax"
    assert insp["op_histogram"].get("reduce_argmax", 0) == 1


def test_uint8_input_and_bad_options_are_usage_errors(checkpoints, tmp_path):
    ck = checkpoints(_tiny.TINY)
    with pytest.raises(UsageError, match="uint8"):
        export_checkpoint(ck, "coreml", "fp16", out=tmp_path / "a", input_dtype="uint8")
    with pytest.raises(UsageError, match="compute_units"):
        export_checkpoint(ck, "coreml", "fp16", out=tmp_path / "b", compute_units="NPU")
    with pytest.raises(UsageError, match="W8A8 needs iOS17"):
        export_checkpoint(ck, "coreml", "int8", out=tmp_path / "c", minimum_deployment_target="iOS16")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Export-time lowering passes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_in, n_out, align, sf", [(7, 14, False, None), (7, 14, False, 2.0), (16, 9, False, None),
                                                    (5, 12, True, None), (12, 12, False, None), (3, 8, False, None)])
def test_bicubic_matrix_equals_torch(n_in, n_out, align, sf):
    from edgeseg.targets.coreml.exporter import bicubic_matrix

    x = torch.randn(1, 1, n_in, 3)
    kw = dict(scale_factor=(sf, 1.0)) if sf else dict(size=(n_out, 3))
    ref = F.interpolate(x, mode="bicubic", align_corners=align, **kw)[0, 0]
    got = torch.from_numpy(bicubic_matrix(n_in, n_out, align, sf)) @ x[0, 0]
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


class _Bicubic(nn.Module):
    output_stride = 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = F.interpolate(self.conv(x), size=(40, 24), mode="bicubic", align_corners=False)
        return F.interpolate(y, scale_factor=2, mode="bicubic", align_corners=True)


def test_bicubic_is_rewritten_and_converts():
    """coremltools 9.0 has no upsample_bicubic2d converter; the exporter's rewrite (two matmuls) converts and
    computes what torch computes."""
    import coremltools as ct

    from edgeseg.targets.coreml.exporter import export_program

    torch.set_num_threads(1)
    m = _Bicubic().eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(NotImplementedError, match="bicubic"):  # still true upstream? then the rewrite is needed
        ct.convert(torch.export.export(m, (x,)).run_decompositions({}), convert_to="mlprogram",
                   skip_model_load=True)
    ep, rewrites = export_program(m, x)
    assert len(rewrites["bicubic_as_matmul"]) == 2
    assert not any("bicubic" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), m(x), atol=1e-4)
    ml = ct.convert(ep, convert_to="mlprogram", skip_model_load=True)
    assert ml is not None


class _FFT(nn.Module):
    def forward(self, x):
        return torch.fft.rfft2(x, norm="ortho").abs()


def test_fft_fails_with_an_error_naming_the_op_and_fix():
    from edgeseg.targets.coreml.exporter import export_program

    with pytest.raises(ArtifactError, match=r"fft.*matmul-DFT"):
        export_program(_FFT().eval(), torch.randn(1, 3, 8, 8))


def test_coreml_quantizer_honours_the_float_policy():
    """The float policy's filter reaches CoreMLQuantizer's annotators: nodes of a float module stay unannotated."""
    from edgeseg.targets.coreml.exporter import coreml_quantizer
    from edgeseg.quant.policy import FloatPolicy

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    gm = torch.export.export(Net().eval(), (torch.randn(2, 8),)).module()
    policy = FloatPolicy({"b": "test"})
    quantizer = policy.apply_pt2e(coreml_quantizer())
    assert quantizer.filter_fn is not None
    annotated = quantizer.annotate(gm)
    linears = {n.meta["nn_module_stack"][next(reversed(n.meta["nn_module_stack"]))][0]: n
               for n in annotated.graph.nodes if n.op == "call_function" and "linear" in str(n.target)}
    qa = {k: bool(n.meta.get("quantization_annotation")) for k, n in linears.items()}
    assert qa == {"a": True, "b": False}, qa
