"""Sensitivity report: layers sorted, an artificially fragile layer ranks first; the simulation is the target's
own int8 scheme (recorded in the JSON), and a scheme it cannot reproduce is refused."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn

from edgeseg.errors import UsageError
from edgeseg.export.schemes import scheme_for_target
from edgeseg.quant.sensitivity import GENERIC, format_table, layer_sensitivity, plot, sqnr_db


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_fragile_layer_ranks_first(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # one huge weight per output channel of `b`: per-channel int8 crushes the rest
        net.b.weight[:, 0, 0, 0] = 1e4
        net.a.weight[0].zero_()  # ...on an input channel that is always 0, so float ignores it
        net.a.bias[0] = -1.0
    xs = [torch.randn(1, 3, 16, 16) for _ in range(2)]
    rows = layer_sensitivity(net, xs)
    assert [r["layer"] for r in rows][0] == "b"
    assert [r["sqnr_db"] for r in rows] == sorted(r["sqnr_db"] for r in rows)
    assert rows[0]["sqnr_db"] < rows[-1]["sqnr_db"] - 10
    # the model is restored after the probe
    assert float(net.b.weight[0, 0, 0, 0]) == 1e4
    plot(rows, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
    assert "b" in format_table(rows).splitlines()[1]


def test_miou_delta_sorts_first():
    torch.manual_seed(0)
    net = Net().eval()
    xs = [torch.randn(1, 3, 8, 8)]
    orig = net.c.weight.detach().clone()
    rows = layer_sensitivity(net, xs, miou_fn=lambda m: 0.5 - (0.3 if not torch.equal(m.c.weight, orig) else 0.0))
    assert rows[0]["layer"] == "c" and math.isclose(rows[0]["miou_delta"], -0.3)


def test_sqnr():
    x = torch.randn(100)
    assert sqnr_db(x, x) == math.inf
    assert 19 < sqnr_db(x, x * 1.1) < 21


def test_chunked_float_capture_matches_one_layer_at_a_time(monkeypatch):
    """Float references are captured for several layers in one pass (bounded by REF_BYTES); the rows equal
    those of a one-layer-per-pass run, and the model is called fewer times."""
    import edgeseg.quant.sensitivity as sens

    torch.manual_seed(0)
    net = Net().eval()
    xs = [torch.randn(1, 3, 16, 16) for _ in range(3)]
    calls = []
    net.register_forward_pre_hook(lambda m, a: calls.append(1))
    together = layer_sensitivity(net, xs)
    n_together = len(calls)
    calls.clear()
    monkeypatch.setattr(sens, "REF_BYTES", 1)  # every layer its own chunk: the old two passes per layer
    alone = layer_sensitivity(net, xs)
    assert together == alone
    assert n_together == 1 + 3 * (1 + 3) and len(calls) == 1 + 3 * (3 + 3)


# ----------------------------------------------------------------------------------------------------------------
# the target's own int8 scheme
# ----------------------------------------------------------------------------------------------------------------
NO_VNNI, VNNI = "avx2", "avx2,avx512f,avx512_vnni"


def test_scheme_follows_the_target_and_the_cpu(monkeypatch):
    monkeypatch.setenv("EDGESEG_CPU_FLAGS", NO_VNNI)  # ORT's u8s8 kernels saturate: 7-bit weights
    onnx7 = scheme_for_target("onnx")
    assert onnx7.options["reduce_range"] is True and (onnx7.w_qmin, onnx7.w_qmax, onnx7.w_div) == (-64, 64, 64.0)
    assert onnx7.activations == "asymmetric" and (onnx7.a_qmin, onnx7.a_qmax) == (0, 255)
    ov = scheme_for_target("openvino")
    assert ov.options["overflow_fix"] == "enable" and ov.w_qmax == 63 and ov.activations == "signed_by_range"
    monkeypatch.setenv("EDGESEG_CPU_FLAGS", VNNI)
    onnx8 = scheme_for_target("onnx")
    assert onnx8.options["reduce_range"] is False and onnx8.w_qmax == 127
    assert scheme_for_target("openvino").w_qmax == 127
    trt = scheme_for_target("jetson-tensorrt")  # symmetric, full range, whatever the host CPU
    assert trt.activations == "symmetric" and (trt.a_qmin, trt.a_qmax, trt.w_qmax) == (-127, 127, 127)
    xnn = scheme_for_target("executorch-xnnpack")
    assert xnn.activations == "asymmetric" and (xnn.a_qmin, xnn.a_qmax) == (-128, 127)
    assert scheme_for_target("coreml", {"int8_mode": "weights"}).activations == "none"
    assert scheme_for_target("onnx", {"per_channel": False}).per_channel is False
    json.dumps(onnx8.to_json())


def test_unsimulable_targets_are_refused():
    with pytest.raises(UsageError, match="calibrate_method 'Entropy' cannot be simulated"):
        scheme_for_target("onnx", {"calibrate_method": "Entropy"})
    with pytest.raises(UsageError, match="unknown target"):
        scheme_for_target("tpu")



def test_every_profile_exporter_gives_its_scheme_or_is_refused():
    """The scheme is the exporter's hook (`Exporter.int8_scheme`): every int8 profile's exporter gives an Int8Scheme
    named after the target, or None and scheme_for_target refuses the target; schemes.py names no exporter."""
    from pathlib import Path

    from edgeseg.export import get_exporter
    from edgeseg.export import schemes
    from edgeseg.export.profiles import load_profile
    from edgeseg.quant.sensitivity import Int8Scheme
    from edgeseg.targets import list_profiles

    for name in list_profiles():
        profile = load_profile(name)
        if "int8" not in profile.precisions:
            with pytest.raises(UsageError, match="no int8 precision"):
                scheme_for_target(name)
            continue
        exporter = get_exporter(name)
        opts = exporter.Options.from_dict({**profile.io_options(), **profile.options})
        scheme = exporter.int8_scheme(name, opts)
        if scheme is None:
            with pytest.raises(UsageError, match="cannot be simulated"):
                scheme_for_target(name)
        else:
            assert isinstance(scheme, Int8Scheme) and scheme.target == name, (name, scheme)
            assert scheme_for_target(name) == scheme
            assert name in schemes.simulated_targets()
    text = Path(schemes.__file__).read_text().lower()
    named = [n for n in ("onnx", "tensorrt", "openvino", "executorch", "coreml", "litert") if n in text]
    assert not named, f"schemes.py names exporters: {named}"

def test_simulation_uses_the_scheme(monkeypatch):
    """7-bit weights lose ~6 dB against 8-bit; asymmetric uint8 on a ReLU output beats symmetric int8 (which
    wastes the negative half); weight-only int8 leaves the input alone."""
    torch.manual_seed(0)
    net = Net().eval()
    xs = [torch.randn(1, 3, 16, 16) for _ in range(2)]

    def sqnr(scheme):
        return {r["layer"]: r["sqnr_db"] for r in layer_sensitivity(net, xs, scheme=scheme)}

    monkeypatch.setenv("EDGESEG_CPU_FLAGS", NO_VNNI)
    onnx7 = scheme_for_target("onnx")
    monkeypatch.setenv("EDGESEG_CPU_FLAGS", VNNI)
    onnx8 = scheme_for_target("onnx")
    s7, s8, generic = sqnr(onnx7), sqnr(onnx8), sqnr(GENERIC)
    # the weights alone (activations left float): one bit less is ~6 dB less
    w7 = sqnr(dataclasses.replace(onnx7, activations="none"))
    w8 = sqnr(dataclasses.replace(onnx8, activations="none"))
    weight_only = sqnr(scheme_for_target("coreml", {"int8_mode": "weights"}))
    for layer in ("a", "b"):  # c has 32 weights: too few for the statistical 6 dB
        assert w8[layer] > w7[layer] + 4, (layer, w8, w7)
        assert s8[layer] > s7[layer], (layer, s8, s7)
    for layer in ("a", "b", "c"):
        assert weight_only[layer] > s8[layer], (layer, weight_only, s8)
    assert s8["b"] > generic["b"] + 3 and s8["c"] > generic["c"] + 3, (s8, generic)  # b, c read ReLU outputs


SENS_TINY = "sens_tiny"


def test_cli_records_the_simulated_scheme(tmp_path, capsys, monkeypatch):
    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.cli import main
    from edgeseg.data.datasets import CAMVID_INFO
    from edgeseg.data.embedded import default_data_dir
    from edgeseg.models.registry import list_models, register_model
    from edgeseg.types import ModelSpec

    if SENS_TINY not in list_models(SENS_TINY):
        @register_model
        def sens_tiny(num_classes: int, **kw) -> nn.Module:
            """Three convs (quant-report tests only)."""
            m = Net()
            m.c = nn.Conv2d(8, num_classes, 1)
            m.output_stride = 1
            return m
    from edgeseg.models import create_model

    torch.manual_seed(0)
    spec = ModelSpec(model=SENS_TINY, num_classes=11, class_names=CAMVID_INFO.class_names,
                     palette=CAMVID_INFO.palette, ignore_index=CAMVID_INFO.ignore_index, input_hw=(32, 32))
    ckpt = save_checkpoint(tmp_path / "ck", create_model(SENS_TINY, num_classes=11).eval(), spec)
    monkeypatch.setenv("EDGESEG_CPU_FLAGS", NO_VNNI)
    args = ["quant-report", "--checkpoint", str(ckpt), "--data", str(default_data_dir()), "--limit", "1"]
    assert main(args + ["--target", "onnx", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "7-bit (reduce_range)" in out
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["scheme"]["target"] == "onnx" and d["scheme"]["options"]["reduce_range"] is True
    assert [r["layer"] for r in d["rows"]] and all(r["miou_delta"] is not None for r in d["rows"])
    assert main(args + ["--target", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'tpu'" in err and len(err.strip().splitlines()) == 1
