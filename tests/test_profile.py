"""`edgeseg bench --profile`: op time on the artifact's own runtime, rolled up to model parts through the module
paths the exporters record. Checked on test_offseg (backbone stages, FreqFusion stages, offset head)."""
from __future__ import annotations

import json

import pytest

from edgeseg.cli import main
from edgeseg.eval.profile import INSERTED, UNKNOWN, part_of, profile_artifact

MODEL = "test_offseg"


def _profiled_targets() -> list[str]:
    """The targets whose own runtime package has a per-op profiler (`profile_ops` in its session.py)."""
    from edgeseg.targets import all_profiles, session_module

    return [t for t, p in all_profiles().items()
            if p.runtime == p.exporter and hasattr(session_module(p.runtime), "profile_ops")]


def test_part_of_groups_stages_and_drops_the_wrapper():
    assert part_of("model.backbone.network.3.1.mlp.fc1") == "backbone.network.3"
    assert part_of("model.decode_head.freqfusions.2.dysampler") == "decode_head.freqfusions.2"
    assert part_of("decode_head.offset_learning.norm") == "decode_head.offset_learning"
    assert part_of("model") == UNKNOWN


def _check(rec: dict) -> None:
    assert rec["status"] == "ok", rec
    parts = {r["part"]: r for r in rec["parts"]}
    assert abs(sum(r["share"] for r in rec["parts"]) - 1.0) < 0.01
    # the time of the model's ops lands on the model's own parts, not on unattributed rows; the runtime's own
    # overhead (delegate calls) is its own row, which at 64x64 can be half of the time (ExecuTorch: a dozen calls)
    inserted = parts[INSERTED]["share"] if INSERTED in parts else 0.0
    assert inserted < 0.9, rec["parts"]
    attributed = sum(r["share"] for p, r in parts.items() if p not in (INSERTED, UNKNOWN))
    assert attributed / (1.0 - inserted) > 0.5, rec["parts"]
    assert any(p.startswith("backbone.") for p in parts) and any(p.startswith("decode_head.freqfusions.")
                                                                  for p in parts), sorted(parts)
    assert rec["total_ms"] > 0 and rec["wall_ms"] > 0


def test_the_profiled_targets_are_found():
    assert len(_profiled_targets()) >= 3  # ONNX Runtime, OpenVINO, ExecuTorch today


@pytest.mark.exports(lambda p: [(p["target"], MODEL, "fp32")])
@pytest.mark.parametrize("target", _profiled_targets())
def test_profile_attributes_time_to_model_parts(exports, target):
    _check(profile_artifact(exports.get(target, MODEL, "fp32"), num_threads=1, runs=2))


@pytest.mark.exports(lambda p: [("onnx", MODEL, "fp32")])
def test_bench_profile_cli_writes_table_and_json(exports, tmp_path, capsys):
    art = exports.get("onnx", MODEL, "fp32")
    out = tmp_path / "profile.json"
    assert main(["bench", str(art), "--profile", "--runs", "2", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "decode_head.freqfusions." in printed and "share" in printed
    rec = json.loads(out.read_text())
    _check(rec["profiles"][0])


@pytest.mark.exports(lambda p: [("onnx", MODEL, "int8")])
def test_ort_int8_runs_fused_qlinear_ops(exports):
    """ONNX Runtime fuses the int8 QDQ graph: convolutions and matmuls run as QLinearConv / QLinearMatMul, not as
    dequantize -> float op -> quantize (read from the ops ORT actually ran)."""
    from edgeseg.targets.onnx.session import profile_ops

    art = exports.get("onnx", MODEL, "int8")
    op_times, _ = profile_ops(art / "model.onnx", num_threads=1, runs=1)
    ran = {op for _, op, _ in op_times}
    assert "QLinearConv" in ran, sorted(ran)
    assert "QLinearMatMul" in ran or "MatMulIntegerToFloat" in ran or "QLinearMul" in ran, sorted(ran)
