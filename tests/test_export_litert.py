"""LiteRT target: real litert_torch.convert / ai-edge-quantizer / LiteRT Interpreter on tiny models at 64x64.

Exports come from the session's cache (tests/conftest.py `exports`), as in test_export.py. Without the `litert`
extra every test skips with the reason, except when EDGESEG_REQUIRE_TARGETS names litert (or is "all"/"1").
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402  (registers tiny_ops)

from edgeseg.errors import UsageError  # noqa: E402
from edgeseg.export import export_checkpoint, get_exporter  # noqa: E402
from edgeseg.export.base import MANIFEST  # noqa: E402
from edgeseg.runtime import open_session  # noqa: E402
from edgeseg.targets.litert import FLOW  # noqa: E402

TARGET = "litert"
HW = (64, 64)
# The contract round trips (fp32 and int8 of FLOW's models, against eager, with the floors the package declares) are
# tests/test_export.py's; this file checks what only LiteRT has, on the same cached exports: the .tflite's ops and
# XNNPACK partitions, the pinned threads, the int8 tensors and recipes.
INT8 = list(FLOW.int8)
REPO = Path(__file__).resolve().parents[1]


def _require() -> None:
    missing = get_exporter(TARGET).check_environment()
    if missing:
        required = [t for t in os.environ.get("EDGESEG_REQUIRE_TARGETS", "").split(",") if t]
        if required in (["1"], ["all"]) or TARGET in required:
            pytest.fail(f"{TARGET} required but missing: {missing}")
        pytest.skip(f"{TARGET}: missing {'; '.join(missing)}")


@pytest.fixture
def exported(exports):
    def get(model: str = _tiny.TINY, precision: str = "fp32", **options) -> Path:
        _require()
        return exports.get(TARGET, model, precision, **options)

    return get


def _manifest(art: Path) -> dict:
    return json.loads((art / MANIFEST).read_text())


@pytest.mark.exports([(TARGET, _tiny.TINY, "fp32")])
def test_fp32_tflite_ops_partitions_and_batch(exported, checkpoints):
    art = exported()
    m = _manifest(art)
    assert m["target"] == TARGET and m["precision"] == "fp32" and m["executed_here"] is True
    assert m["files"] == ["model.tflite"] and m["model_file"] == "model.tflite" and set(m["sha256"]) == {"model.tflite"}
    assert m["input"]["shape"] == [1, 3, 64, 64] and m["input"]["dtype"] == "float32" and m["input"]["layout"] == "NCHW"
    assert m["output"]["kind"] == "logits"
    assert {"litert_torch", "ai_edge_litert", "ai_edge_quantizer"} <= set(m["tool_versions"])
    insp = m["inspection"]
    assert insp["op_histogram"]["CONV_2D"] >= 1 and insp["io_dtypes"] == {"inputs": ["FLOAT32"], "outputs": ["FLOAT32"]}
    assert "INT8" not in insp["tensor_dtypes"]
    # XNNPACK takes the convolutions; tiny_ops' grid_sample (GATHER_ND + bounds selects) stays on builtin kernels
    xnn = insp["xnnpack"]
    assert xnn["partitions"] >= 1 and xnn["delegated"].get("CONV_2D") == insp["op_histogram"]["CONV_2D"]
    assert "GATHER_ND" in m["fallback_ops"] and m["fallback_ops"] == sorted(xnn["not_delegated"])
    assert m["options"]["float_io"] is True and m["quantization"] == {}

    x = torch.randn(1, 3, *HW).numpy()
    with open_session(checkpoints(_tiny.TINY)) as ref, open_session(art, num_threads=1) as sess:
        want, got = ref.predict_logits(x), sess.predict_logits(x)
        assert got.shape == want.shape == tuple(m["output"]["shape"]) and got.dtype == np.float32
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.999
        two = sess.run(np.concatenate([x, x]))  # static batch 1: a batch runs image by image
        assert two.shape[0] == 2 and np.allclose(two[1], got[0], atol=1e-5)
        with pytest.raises(UsageError, match=r"input must be float32 NCHW shape \(N,3,64,64\)"):
            sess.run(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.exports([(TARGET, _tiny.TINY, "fp32")])
def test_session_pins_threads(exported):
    art = exported()
    x = torch.randn(1, 3, *HW).numpy()
    outs = []
    for n in (1, 2):
        with open_session(art, num_threads=n) as sess:
            assert sess.threads_in_use == n
            outs.append(sess.run(x))
    assert np.allclose(outs[0], outs[1], atol=1e-4)


@pytest.mark.exports([(TARGET, m, "int8") for m in INT8])
@pytest.mark.parametrize("model", INT8)
def test_int8_full_integer_keeps_float_io(model, exported, checkpoints):
    art = exported(model, "int8")
    m = _manifest(art)
    q, insp = m["quantization"], m["inspection"]
    assert m["precision"] == "int8" and q["quantizer"] == "ai_edge_quantizer xnnpack"  # the default recipe
    assert q["calibration_images"] >= 1 and m["calibration"]
    # float32 in / logits out as every target: QUANTIZE after the input, DEQUANTIZE before the output, in graph
    assert insp["io_dtypes"] == {"inputs": ["FLOAT32"], "outputs": ["FLOAT32"]}
    assert insp["tensor_dtypes"]["INT8"] > 0 and insp["op_histogram"].get("QUANTIZE", 0) >= 1
    assert insp["xnnpack"]["partitions"] >= 1 and isinstance(m["fallback_ops"], list)
    # the proof's floor: the contract's (tests/test_export.py, FLOW.int8)
    print(f"\nlitert int8 {model}: proof {m['proof']}; off XNNPACK {insp['xnnpack']['not_delegated']}")
    if model == "test_offseg_lite0":
        # the float policy reached the tflite ops by their module-path tensor names
        assert q["float_modules"] == {"model.decode_head.offset_learning": q["float_modules"][
            "model.decode_head.offset_learning"]}
        assert q["float_ops_per_module"]["model.decode_head.offset_learning"] > 0
    x = np.random.default_rng(0).standard_normal((1, 3, *HW)).astype(np.float32)
    with open_session(art, num_threads=1) as sess:
        y = sess.run(x)  # random noise runs too (OffsetLearning's LayerNorm is float)
        assert y.dtype == np.float32 and np.isfinite(y).all()


@pytest.mark.exports([(TARGET, _tiny.TINY, "int8"), (TARGET, _tiny.TINY, "int8", {"recipe": "static_wi8_ai8"}),
                      (TARGET, _tiny.TINY, "fp32")])
def test_default_int8_recipe_quantizes_conv_fc_and_keeps_gelu_norms_float(exported):
    """recipe "xnnpack" (default): conv / FC int8; GELU, LayerNorm (RSQRT, SQUARED_DIFFERENCE and the module's
    MEAN/SUB/MUL/ADD) and softmax float, read from the .tflite's op output dtypes. "static_wi8_ai8" quantizes them."""
    from edgeseg.targets.litert.inspection import op_output_dtypes, read_model

    art = exported(_tiny.TINY, "int8")
    m = _manifest(art)
    assert m["options"]["recipe"] == "xnnpack" and m["quantization"]["recipe"]["name"] == "xnnpack"
    dt = op_output_dtypes(read_model((art / "model.tflite").read_bytes()))
    assert dt == m["inspection"]["op_output_dtypes"]
    assert {"GELU", "RSQRT", "SOFTMAX", "CONV_2D", "BATCH_MATMUL"} <= set(dt), dt  # tiny_ops' nn.Linear: BATCH_MATMUL
    for op in ("GELU", "RSQRT", "SQUARED_DIFFERENCE", "SOFTMAX", "DIV", "SQRT"):
        assert set(dt.get(op, {"FLOAT32": 0})) == {"FLOAT32"}, (op, dt[op])
    assert "FLOAT32" not in dt["CONV_2D"] and "FLOAT32" not in dt.get("FULLY_CONNECTED", {}), dt
    # a BATCH_MATMUL with a constant operand (tiny_ops' Linear) is int8; one of two activations is float (XNNPACK
    # leaves int8 ones off the delegate): the count the manifest records, read back from the .tflite
    from edgeseg.targets.litert.quantize import activation_matmul_scopes

    fp32 = read_model((exported(_tiny.TINY, "fp32") / "model.tflite").read_bytes())
    n_act = len(activation_matmul_scopes(fp32))
    assert m["quantization"]["float_activation_matmuls"] == n_act
    assert dt["BATCH_MATMUL"].get("FLOAT32", 0) == n_act and dt["BATCH_MATMUL"].get("INT8", 0) >= 1, (n_act, dt)
    assert n_act >= 1  # tiny_ops' attention-like product
    # the LayerNorm module's own ops (its mean/variance arithmetic) are float too: no int8 MEAN in tiny_ops
    assert set(dt.get("MEAN", {"FLOAT32": 0})) == {"FLOAT32"}, dt.get("MEAN")
    assert not {"GELU", "RSQRT"} & set(m["fallback_ops"]), m["fallback_ops"]  # XNNPACK runs them (float)

    old = op_output_dtypes(read_model((exported(_tiny.TINY, "int8", recipe="static_wi8_ai8") / "model.tflite")
                                      .read_bytes()))
    assert "INT8" in old["GELU"] and "INT8" in old["RSQRT"], old


def test_float_module_scopes_match_litert_torch_tensor_names():
    """The float policy reaches the .tflite's ops by litert-torch's tensor names: `<module>.<Class>_<attribute>` per
    level, and a ModuleList item as `<Class>_<index>` without the list's level (offseg_t's FreqFusion samplers were
    quantized against the policy until the regex knew that: 94.5 % int8 agreement on CamVid val)."""
    import re

    from edgeseg.targets.litert.inspection import scope_regex

    w = "edgeseg.models.wrapper.ExportWrapper/edgeseg.models.offseg.OffSeg_model/"
    gather = (w + "edgeseg.models.offseg.OffSegHead_decode_head/edgeseg.models.freqfusion.FreqFusion_0/"
              "edgeseg.models.freqfusion.LocalSimGuidedSampler_dysampler/"
              "edgeseg.models.freqfusion.BilinearGather_bilinear_gather;8")
    named_list = w + "a.Head_decode_head/torch.nn.modules.container.ModuleList_freqfusions/a.FreqFusion_0/x.S_dysampler"
    head = w + "edgeseg.models.offseg.OffSegHead_decode_head/edgeseg.models.offset.OffsetLearning_offset_learning;3"
    for module, scope, hit in (
            ("model.decode_head.freqfusions.0.dysampler.bilinear_gather", gather, True),
            ("model.decode_head.freqfusions.1.dysampler.bilinear_gather", gather, False),  # another item
            ("model.decode_head.freqfusions.0", gather, True),  # ops of a sub-module are inside it
            ("model.decode_head.freqfusions.0.dysampler", named_list, True),  # a list level that is named
            ("model.decode_head.offset_learning", head, True),
            ("model.decode_head.offset_learning", head.replace(";3", "_x;3"), False),  # a prefix is not the module
            ("model.decode_head.offset_learning", gather, False)):
        assert bool(re.search(scope_regex(module), scope)) == hit, (module, scope)


def test_bad_option_is_one_line_usage_error(checkpoints, tmp_path):
    _require()
    with pytest.raises(UsageError, match=r"options\.recipe: 'dynamic' is not one of 'xnnpack', 'static_wi8_ai8'"):
        export_checkpoint(checkpoints(_tiny.TINY), TARGET, "int8", out=tmp_path / "a", recipe="dynamic")
    assert not (tmp_path / "a").exists()
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import _tiny; "
                        "from edgeseg.cli import main; raise SystemExit(main(sys.argv[2:]))", str(REPO / "tests"),
                        "export", "--checkpoint", str(checkpoints(_tiny.TINY)), "--target", TARGET,
                        "--precision", "fp16", "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "supports fp32, int8" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "b").exists()


def test_int8_scheme_is_simulated_for_quant_report():
    from edgeseg.export.schemes import scheme_for_target

    s = scheme_for_target(TARGET)  # needs no vendor tool
    assert (s.w_qmin, s.w_qmax, s.per_channel, s.activations, s.a_qmin, s.a_qmax) == (-127, 127, True, "asymmetric",
                                                                                     -128, 127)
