"""CPU-dependent choices (edgeseg.cpu): both branches on whichever CPU runs the suite. The branch this CPU takes is
checked against the real hardware elsewhere (test_export_openvino's saturation test); here EDGESEG_CPU_FLAGS forces
each CPU kind, and the choices, the manifest record and the runtime's warning must follow."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402

from edgeseg.cpu import FORCE_ENV, host_cpu  # noqa: E402
from edgeseg.export import export_checkpoint  # noqa: E402
from edgeseg.runtime import open_session  # noqa: E402
from edgeseg.runtime.base import full_range_int8_notes  # noqa: E402

AVX2 = "avx2,fma"  # seen here: AMD EPYC
INTEL_AMX = "avx2,avx512f,avx512bw,avx512_vnni,amx_int8,amx_bf16"  # seen here: Intel Xeon


def test_host_cpu_reads_this_machine():
    cpu = host_cpu()
    assert cpu.model and cpu.machine and not cpu.forced
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx2" in text.split():
        assert "avx2" in cpu.flags
    assert cpu.model in cpu.summary()


@pytest.mark.parametrize("flags, saturates", [(AVX2, True), (INTEL_AMX, False), ("avx2,avx_vnni", False),
                                              ("", False)])
def test_forced_flags_decide_saturation(monkeypatch, flags, saturates):
    monkeypatch.setenv(FORCE_ENV, flags)
    cpu = host_cpu()
    assert cpu.forced and "flags forced" in cpu.summary()
    if cpu.machine == "x86_64":
        assert cpu.int8_saturates == saturates
        assert ("no VNNI" in cpu.summary()) == (not cpu.vnni)


@pytest.mark.parametrize("flags, fix, reduce", [(AVX2, "enable", True), (INTEL_AMX, "disable", False)])
def test_auto_options_follow_the_cpu(monkeypatch, flags, fix, reduce):
    from edgeseg.targets.onnx.quantize import resolve_reduce_range
    from edgeseg.targets.openvino.quantize import resolve_overflow_fix

    monkeypatch.setenv(FORCE_ENV, flags)
    if host_cpu().machine != "x86_64":
        pytest.skip("the int8 saturation rule is about x86 CPUs")
    got_fix, why = resolve_overflow_fix("auto")
    assert got_fix == fix and why.startswith("auto:") and host_cpu().model in why
    got_reduce, why = resolve_reduce_range("auto")
    assert got_reduce is reduce and why.startswith("auto:")
    # an explicit choice is kept whatever the CPU
    assert resolve_overflow_fix("first_layer_only") == ("first_layer_only", "set explicitly")
    assert resolve_reduce_range(True) == (True, "set explicitly")


@pytest.mark.parametrize("flags", [AVX2, INTEL_AMX])
def test_onnx_int8_export_records_the_forced_branch_and_runs(monkeypatch, checkpoints, tmp_path, flags):
    """A real ORT int8 export under each CPU kind's flags: the manifest says which weight range and why, and the
    artifact runs here. A full-range artifact opened on a CPU that saturates gets a note saying so."""
    monkeypatch.setenv(FORCE_ENV, flags)
    saturates = host_cpu().int8_saturates
    out = export_checkpoint(checkpoints(_tiny.TINY), "onnx", "int8", out=tmp_path / "a")
    m = json.loads((Path(out) / "manifest.json").read_text())
    q = m["quantization"]
    assert q["reduce_range"] is saturates and q["reduce_range_reason"].startswith("auto:"), q
    assert ("7-bit" in q["weights"]) == saturates
    monkeypatch.setenv(FORCE_ENV, AVX2)  # open it on a CPU that saturates
    with open_session(out) as s:
        y = s.run(np.zeros(m["input"]["shape"], np.float32))
        assert np.isfinite(y).all()
        assert any("full 8-bit range" in n for n in s.notes) == (not saturates), s.notes


def test_full_range_note_only_for_full_range_weights(monkeypatch):
    monkeypatch.setenv(FORCE_ENV, AVX2)
    if not host_cpu().int8_saturates:
        pytest.skip("the int8 saturation rule is about x86 CPUs")
    assert full_range_int8_notes({"reduce_range": False})
    assert full_range_int8_notes({"overflow_fix": "disable"})
    assert not full_range_int8_notes({"reduce_range": True})
    assert not full_range_int8_notes({"overflow_fix": "enable"})
    assert not full_range_int8_notes({})
    monkeypatch.setenv(FORCE_ENV, INTEL_AMX)
    assert not full_range_int8_notes({"reduce_range": False})
