"""OpenVINO target: real ov.convert_model / NNCF / OpenVINO CPU runtime on the tiny models at 64x64.

Exports come from the session's cache (tests/conftest.py `exports`), as in test_export.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402  (registers tiny_ops)

from edgeseg.cpu import host_cpu  # noqa: E402
from edgeseg.errors import ArtifactError, UsageError  # noqa: E402
from edgeseg.export import export_checkpoint, get_exporter  # noqa: E402
from edgeseg.export.base import MANIFEST, CalibrationData  # noqa: E402
from edgeseg.models import list_models  # noqa: E402
from edgeseg.runtime import open_session  # noqa: E402
from edgeseg.targets.openvino import FLOW  # noqa: E402

pytest.importorskip("openvino")
pytest.importorskip("nncf")

# The contract round trips (fp32 of every variant, int8 with the floors the package declares, float compute pinned to
# f32) are tests/test_export.py's, from edgeseg.targets.openvino.FLOW; this file checks what only OpenVINO has, on
# the same cached exports: the IR's contents, fp16, the CPU-dependent inference precision and overflow fix.
MODELS = [_tiny.TINY] + list_models("test_*")
FAST = {_tiny.TINY, "test_segnext", "test_offseg_afm"}
SUBSET = [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in MODELS]
STRICT = dict(FLOW.contract_options)  # {"inference_precision": "f32"}: the contract's exports
HW = (64, 64)


@pytest.fixture
def exported(exports):
    """The session's shared export cache (tests/conftest.py) for openvino."""
    def get(model: str = _tiny.TINY, precision: str = "fp32", **options) -> Path:
        return exports.get("openvino", model, precision, **options)

    return get


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _eager(checkpoint: Path, x: np.ndarray) -> np.ndarray:
    from edgeseg.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.exports(lambda p: [("openvino", p["model"], "fp32", STRICT)])
@pytest.mark.parametrize("model", MODELS)
def test_fp32_ir_holds_every_op_for_the_cpu_plugin(model, exported):
    m = _manifest(exported(model, "fp32", **STRICT))
    assert sorted(m["files"]) == ["model.bin", "model.xml"] and set(m["sha256"]) == {"model.bin", "model.xml"}
    assert m["fallback_ops"] == [], m["fallback_ops"]  # the CPU plugin takes every op of every variant
    assert m["inspection"]["route"] == "torch.export"
    assert "Parameter" not in m["inspection"]["op_histogram"]
    assert "GroupNormalization" not in m["inspection"]["op_histogram"]  # decomposed (openvino 2026.4.1 crash)
    assert m["inspection"]["constant_dtypes"].get("f16", 0) == 0
    assert m["options"]["inference_precision"] == "f32" and m["proof"]["float_compute"] == "fp32"


@pytest.mark.exports([("openvino", _tiny.TINY, "fp32")])
def test_fp32_ir_at_the_auto_precision_agrees_with_eager(exported, checkpoints):
    """The default (auto) inference precision, as a user exports: bf16 compute where this CPU has it natively."""
    art = exported(_tiny.TINY, "fp32")
    m = _manifest(art)
    # the float compute follows this CPU (auto: bf16 where native); the floor follows the compute
    bf16 = host_cpu().native_bf16
    assert m["options"]["inference_precision"] == ("bf16" if bf16 else "f32"), m["options"]
    assert m["proof"]["float_compute"] == ("bf16" if bf16 else "fp32"), m["proof"]
    floor = 0.9 if bf16 else 0.999  # bf16: random-weight tiny models have nearly tied logits (~94 % measured)
    assert m["proof"]["argmax_agreement"] >= floor, m["proof"]
    # an independent input through the session API: predict_logits against eager
    x = torch.randn(2, 3, *HW, generator=torch.Generator().manual_seed(7)).numpy()
    with open_session(art, num_threads=1) as s:
        got = s.predict_logits(x)
    ref = _eager(checkpoints(_tiny.TINY), x)
    assert got.shape == ref.shape
    assert (got.argmax(1) == ref.argmax(1)).mean() >= floor
    print(f"\ntiny_ops fp32 (auto precision): max|dlogit| {np.abs(got - ref).max():.2e}, proof {m['proof']}")


# fp16 and int8 IRs are checked for their own arithmetic: float parts pinned to f32 (the auto bf16 of CPUs with native
# bf16 is test_fp32_ir_at_the_auto_precision...'s and test_inference_precision_follows_the_cpu...'s)


@pytest.mark.exports(lambda p: [("openvino", p["model"], "fp16", STRICT)])
@pytest.mark.parametrize("model", [m for m in SUBSET if m != "test_offseg_afm"])
def test_fp16_ir_has_fp16_weights_and_agrees(model, exported):
    m = _manifest(exported(model, "fp16", **STRICT))
    dtypes = m["inspection"]["constant_dtypes"]
    # weights are fp16; OffSeg keeps a few fp32 constants (OpenVINO leaves constants it cannot compress safely)
    assert dtypes.get("f16", 0) > 0 and dtypes.get("f16", 0) >= 4 * dtypes.get("f32", 0), dtypes
    print(f"\n{model} fp16: proof {m['proof']}")
    assert m["proof"]["argmax_agreement"] >= 0.98, m["proof"]


@pytest.mark.exports(lambda p: [("openvino", p["model"], "int8", STRICT)])
@pytest.mark.parametrize("model", SUBSET)
def test_int8_nncf_ir_has_fake_quantize_int8_weights_and_runs_int8(model, exported):
    m = _manifest(exported(model, "int8", **STRICT))
    insp = m["inspection"]
    assert insp["op_histogram"].get("FakeQuantize", 0) > 0
    assert insp["fake_quantize_levels"] and set(insp["fake_quantize_levels"]) <= {"255", "256"}
    assert insp["constant_dtypes"].get("i8", 0) > 0, insp["constant_dtypes"]  # int8 weights in the .bin
    conv = insp["runtime_precisions"].get("Convolution", {})
    assert conv.get("u8", 0) + conv.get("i8", 0) > 0, insp["runtime_precisions"]  # the CPU runs int8 kernels
    q = m["quantization"]
    # the overflow fix follows the exporting CPU (edgeseg.cpu): 7-bit weights only where u8 x s8 saturates
    saturates = host_cpu().int8_saturates
    assert q["overflow_fix"] == ("enable" if saturates else "disable"), q
    assert ("7-bit" in q["weights"]) == saturates and q["overflow_fix_reason"].startswith("auto:"), q
    assert m["inspection"]["host_cpu"] == host_cpu().to_json()
    assert m["calibration"]["count"] >= 1
    print(f"\n{model} int8: proof {m['proof']}, float compute layers {insp['float_compute_layers']}")
    # the float policy (NMF2D, OffsetLearning, AFM) reached NNCF as node names that exist in the IR
    assert q["float_nodes"] == insp["float_policy_nodes"]
    if model != _tiny.TINY:
        assert q["float_modules"] and q["float_nodes"] > 0, q
        assert insp["float_compute_layers"].get("MatMul", 0) > 0, insp["float_compute_layers"]
    # the proof's floor: the contract's (tests/test_export.py, FLOW.int8)


@pytest.mark.exports([("openvino", _tiny.TINY, "fp32",
                       dict(input_dtype="uint8", input_layout="NHWC", output="argmax"))])
def test_uint8_nhwc_input_with_argmax_output(exported, checkpoints):
    art = exported(_tiny.TINY, "fp32", input_dtype="uint8", input_layout="NHWC", output="argmax")
    m = _manifest(art)
    assert m["input"]["dtype"] == "uint8" and m["input"]["shape"] == [1, *HW, 3]
    assert m["output"]["kind"] == "argmax" and m["output"]["name"] == "class_map"
    # bf16 float compute where this CPU has it natively (random-weight tiny model: nearly tied logits)
    assert m["proof"]["argmax_agreement"] >= (0.9 if m["proof"]["float_compute"] == "bf16" else 0.999)
    img = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    with open_session(art) as s:
        y = s.run(np.ascontiguousarray(np.zeros((1, *HW, 3), np.uint8)))
        cmap = s.segment(img)
    assert y.dtype == np.uint8 and y.shape == (1, *HW)
    assert cmap.shape == (50, 70) and cmap.max() < len(_tiny.CLASSES)


def test_session_sets_inference_threads_and_checks_input(exported, tmp_path):
    art = exported(_tiny.TINY, "fp32")
    with open_session(art, num_threads=1) as s:
        assert int(s._compiled.get_property("INFERENCE_NUM_THREADS")) == 1
        with pytest.raises(UsageError, match="input must be float32"):
            s.run(np.zeros((1, 3, 32, 32), np.float32))
    # a changed .bin is caught before OpenVINO reads it
    import shutil
    bad = tmp_path / "tampered"  # the artifact is shared by the session: change a copy, outside its folder
    shutil.copytree(art, bad)
    with open(bad / "model.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="model.bin"):
        open_session(bad)


def test_unknown_openvino_option_values_are_usage_errors(checkpoints, tmp_path):
    with pytest.raises(UsageError, match="overflow_fix"):
        export_checkpoint(checkpoints(_tiny.TINY), "openvino", "int8", out=tmp_path / "a", overflow_fix="maybe")
    with pytest.raises(UsageError, match="route"):
        export_checkpoint(checkpoints(_tiny.TINY), "openvino", "fp32", out=tmp_path / "b", route="onnx")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------------------------
# The overflow-fix regression: u8 x s8 convolutions on AVX2 CPUs without VNNI saturate with full 8-bit weights
# ---------------------------------------------------------------------------------------------------------------
class _SameSignNet(nn.Module):
    """Convs whose weights are all positive, fed with large positive activations: every u8*s8 pair sum of
    VPMADDUBSW is near 2*255*127 > 32767, the worst case for int16 saturation."""

    output_stride = 1

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 8, 1)
        with torch.no_grad():
            self.c1.weight.abs_()
            self.c1.bias.zero_()
            self.c2.weight.abs_()

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))

    def example_input(self):
        return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 4


def _int8_rel_err(overflow_fix: str) -> float:
    import openvino as ov

    from edgeseg.targets.openvino.exporter import OpenVINOOptions, convert
    from edgeseg.targets.openvino.quantize import quantize

    torch.set_num_threads(1)
    net = _SameSignNet().eval()
    calib = CalibrationData([torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) * 4
                             for i in range(8)])
    q, _ = quantize(convert(net).model, calib, OpenVINOOptions(overflow_fix=overflow_fix))
    compiled = ov.Core().compile_model(q, "CPU", {"INFERENCE_NUM_THREADS": 1})
    x = net.example_input()
    with torch.no_grad():
        ref = net(x).numpy()
    got = compiled(x.numpy())[0]
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_overflow_fix_keeps_full_range_int8_exact():
    err = _int8_rel_err("enable")
    print(f"\noverflow_fix=enable: max rel err {err:.4f}")
    assert err < 0.05


def test_full_range_int8_saturates_exactly_where_the_cpu_flags_say():
    """Why `overflow_fix = "auto"` reads the CPU: NNCF's own default (first layer only) leaves 8-bit weights in the
    second conv, which saturate on x86 AVX2 without VNNI (VPMADDUBSW int16 sums) and stay exact on VNNI/AMX CPUs
    (int32 accumulation). Whichever CPU runs this, the hardware must behave as `edgeseg.cpu` predicts (the
    decision for the other CPU kind is tested with forced flags in test_cpu_branches.py)."""
    err_default = _int8_rel_err("first_layer_only")
    err_fixed = _int8_rel_err("enable")
    print(f"\nfirst_layer_only: {err_default:.4f}, enable: {err_fixed:.4f}, {host_cpu().summary()}")
    if host_cpu().int8_saturates:
        assert err_default > 0.15 and err_default > 5 * err_fixed
    else:
        assert err_default < 0.05, "full 8-bit weights lost accuracy on a CPU edgeseg.cpu calls exact"


def test_exporter_environment_ready():
    assert get_exporter("openvino").check_environment() == []


def test_query_model_in_child_lists_no_cpu_fallback(exported):
    from edgeseg.targets.openvino.exporter import query_in_child

    assert query_in_child(exported(_tiny.TINY, "fp32") / "model.xml", "CPU") == []


def test_segnext_ir_compiles_static_with_group_norm_decomposed(exported):
    """openvino 2026.4.1's CPU plugin segfaults in compile_model on `relu(gn1(x))` feeding `y + gn2(y)` (snippets
    GroupNormalization tokenization); the exporter decomposes GroupNormalization and keeps the IR static."""
    import openvino as ov

    art = exported("test_segnext", "fp32")
    m = _manifest(art)
    assert m["inspection"]["group_norms_decomposed"] >= 1
    model = ov.Core().read_model(str(art / "model.xml"))
    assert list(model.inputs[0].get_partial_shape().to_shape()) == [1, 3, *HW]
    assert not [op for op in model.get_ops() if op.get_type_name() == "GroupNormalization"]


def test_decompose_group_norm_matches_torch():
    import openvino as ov

    from edgeseg.targets.openvino.exporter import decompose_group_norm

    torch.manual_seed(0)
    gn1, gn2 = nn.GroupNorm(4, 16).eval(), nn.GroupNorm(2, 16).eval()
    with torch.no_grad():
        for g in (gn1, gn2):
            g.weight.uniform_(0.5, 2)
            g.bias.uniform_(-1, 1)

    class Net(nn.Module):
        def forward(self, x):
            y = torch.relu(gn1(x))
            return torch.relu(y + gn2(y))  # the pattern that crashed compile_model

    x = torch.randn(1, 16, 8, 8)
    om = ov.convert_model(torch.export.export(Net(), (x,)))
    om.reshape([1, 16, 8, 8])
    assert decompose_group_norm(om) == 2
    got = ov.Core().compile_model(om, "CPU", {"INFERENCE_NUM_THREADS": 1})(x.numpy())[0]
    with torch.no_grad():
        ref = Net()(x).numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_float_policy_that_matches_no_node_is_an_error():
    """A policy whose names do not reach the OV model must fail, never quantize everything silently."""
    from edgeseg.targets.openvino.exporter import Converted, convert
    from edgeseg.targets.openvino.quantize import float_node_names
    from edgeseg.quant.policy import FloatPolicy

    torch.set_num_threads(1)
    net = _SameSignNet().eval()
    conv = convert(net)
    assert conv.fx_graph is not None
    assert float_node_names(conv, FloatPolicy({})) == []
    assert any(n.startswith("convolution") for n in float_node_names(conv, FloatPolicy({"c2": "test"})))
    with pytest.raises(ArtifactError, match="matches no node"):
        float_node_names(conv, FloatPolicy({"decode_head.nothing": "test"}))
    with pytest.raises(ArtifactError, match="matches no node"):  # module route: __module.<fqn> patterns
        float_node_names(Converted(conv.model, "module (TorchScript)"), FloatPolicy({"decode_head.x": "test"}))


@pytest.mark.parametrize("flags, hint", [("avx2,avx512f,avx512_vnni", "f32"),
                                         ("avx2,avx512f,avx512_vnni,avx512_bf16", "bf16")])
def test_inference_precision_follows_the_cpu_and_the_session_follows_the_manifest(monkeypatch, checkpoints,
                                                                                  tmp_path, flags, hint):
    """`inference_precision = "auto"` (the default): bf16 float compute where the CPU computes bf16 natively
    (forced here by EDGESEG_CPU_FLAGS, both branches on any CPU), f32 elsewhere; the resolved hint and why are in
    the manifest, the proof says what it computed in, and a session opened on a CPU without native bf16 computes
    in f32 whatever the artifact says. An explicit "f32" (strict fp32) is kept on every CPU."""
    from edgeseg.cpu import FORCE_ENV

    monkeypatch.setenv(FORCE_ENV, flags)
    art = export_checkpoint(checkpoints(_tiny.TINY), "openvino", "fp32", out=tmp_path / "auto")
    m = _manifest(art)
    assert m["options"]["inference_precision"] == hint, m["options"]
    why = m["inspection"]["inference_precision"]
    assert why["hint"] == hint and why["why"].startswith("auto:"), why
    assert m["proof"]["float_compute"] == ("bf16" if hint == "bf16" else "fp32"), m["proof"]
    with open_session(art) as s:
        assert s.float_compute == m["proof"]["float_compute"]
        assert any("bf16" in n for n in s.notes) == (hint == "bf16"), s.notes
    monkeypatch.setenv(FORCE_ENV, "avx2")  # the same artifact on a CPU without bf16: f32
    with open_session(art) as s:
        assert s.inference_precision == "f32" and s.float_compute == "fp32"
    monkeypatch.setenv(FORCE_ENV, flags)
    strict = _manifest(export_checkpoint(checkpoints(_tiny.TINY), "openvino", "fp32", out=tmp_path / "f32",
                                         inference_precision="f32"))
    assert strict["options"]["inference_precision"] == "f32" and strict["proof"]["float_compute"] == "fp32"
    assert strict["inspection"]["inference_precision"]["why"] == "set explicitly"
    assert strict["proof"]["argmax_agreement"] >= 0.999, strict["proof"]
