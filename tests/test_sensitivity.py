"""Sensitivity report: layers sorted, an artificially fragile layer ranks first."""
import math

import torch
import torch.nn as nn

from edgeseg.quant.sensitivity import format_table, layer_sensitivity, plot, sqnr_db


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
