"""The side-by-side timing tools of bench/ on tiny inputs: bench/interleaved.py (artifact folders, round-robin, the
ratio to the first) and bench/carafe_forms.py (CARAFE's export forms per runtime, checked against mmcv's
definition). Timings are not checked, only that the tools run the real runtimes and report what they measured."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import _tiny  # noqa: E402

import carafe_forms  # noqa: E402
import interleaved  # noqa: E402


@pytest.mark.exports([("onnx", _tiny.TINY, "fp32"), ("onnx", _tiny.TINY, "int8")])
def test_interleaved_times_every_artifact_and_names_the_cpu(exports, capsys):
    a, b = exports.get("onnx", _tiny.TINY, "fp32"), exports.get("onnx", _tiny.TINY, "int8")
    assert interleaved.main([str(a), str(b), "--runs", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 runs interleaved, 1 thread(s), input (1, 3, 64, 64); CPU: " in out
    rows = [line for line in out.splitlines() if line.startswith((str(a), str(b)))]
    assert len(rows) == 2 and " fp32 " in rows[0] and " int8 " in rows[1], out
    assert rows[0].rstrip().endswith("x first 1.00")
    ratio = float(rows[1].split("x first")[1])
    p50 = [float(re.search(r"p50\s+([\d.]+) ms", r).group(1)) for r in rows]
    assert ratio == pytest.approx(p50[1] / p50[0], rel=0.05, abs=0.01)  # both printed rounded


def test_carafe_forms_exact_on_every_runtime(capsys):
    assert carafe_forms.main(["--channels", "3", "--hw", "4x6", "--kernel", "3", "--scale", "2", "--runs", "2",
                              "--runtimes", "onnxruntime,openvino,executorch"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(onnxruntime|openvino f32|executorch)\s+(\w+)\s+([\d.]+)\s+([\d.e+-]+)$", out, re.M)
    assert {(rt, form) for rt, form, _, _ in rows} == {
        (rt, form) for rt in ("onnxruntime", "openvino f32", "executorch") for form in carafe_forms.CARAFE_FORMS}
    assert all(float(err) < 1e-5 for *_, err in rows), out
    # the gather form's row lookup is the one op XNNPACK does not take
    assert re.search(r"executorch gather: ops outside XNNPACK \(portable kernels\): .*embedding", out), out


def test_carafe_forms_runs_only_the_runtimes_asked_for(capsys):
    assert carafe_forms.main(["--channels", "3", "--hw", "4x6", "--kernel", "3", "--scale", "2", "--runs", "2",
                              "--runtimes", "openvino"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(onnxruntime|openvino f32|executorch|litert)\s+(\w+)\s+[\d.]+\s+[\d.e+-]+$", out, re.M)
    assert {rt for rt, _ in rows} == {"openvino f32"}, out
    with pytest.raises(SystemExit):
        carafe_forms.main(["--runtimes", "openvino,tflite"])
    assert "--runtimes: unknown tflite" in capsys.readouterr().err
