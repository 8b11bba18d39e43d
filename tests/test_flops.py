"""FLOP counting: the conv bucket equals a hand count, the matmul bucket counts known matmuls, CPU SDPA counted."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from edgeseg.models.flops import count


class ConvOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)           # 32x32 -> 16x16
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)            # depth-wise
        self.c = nn.Conv2d(8, 5, 1, bias=False)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x))))


def test_conv_only_matches_hand_count():
    r = count(ConvOnly(), (32, 32))
    hw = 16 * 16
    macs = hw * 8 * 3 * 3 * 3 + hw * 8 * 3 * 3 * 1 + hw * 5 * 8
    assert r["gmac_conv"] == pytest.approx(macs / 1e9, rel=1e-12)
    assert r["gmac_total"] == pytest.approx(macs / 1e9, rel=1e-12) and r["gmac_matmul"] == 0
    assert r["params"] == (8 * 27 + 8) + (8 * 9 + 8) + 5 * 8


class MatmulToy(nn.Module):
    """(1, 16, 4) @ (4, 6) via nn.Linear, then a bmm of (1, 16, 6) x (1, 6, 16), plus one 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)  # (1, 16, 4)
        q = self.lin(t)  # 16*4*6 MACs
        a = q @ q.transpose(1, 2)  # 16*16*6 MACs
        return a


def test_matmul_bucket_counts_known_matmul():
    m = MatmulToy()
    r = count(m, (4, 4))
    assert r["gmac_conv"] * 1e9 == pytest.approx(16 * 3 * 4)
    assert r["gmac_matmul"] * 1e9 == pytest.approx(16 * 4 * 6 + 16 * 16 * 6)
    assert r["gmac_total"] == pytest.approx(r["gmac_conv"] + r["gmac_matmul"])
    assert m.training  # mode restored


class Sdpa(nn.Module):
    def forward(self, x):
        q = x.flatten(2).transpose(1, 2)[:, None]  # (1, 1, HW, 3)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_cpu_sdpa_counted_as_matmul():
    r = count(Sdpa(), (4, 8))
    n, d = 32, 3
    assert r["gmac_matmul"] * 1e9 == pytest.approx(2 * n * n * d)  # Q K^T and A V


@pytest.mark.parametrize("name", ["test_offseg", "test_segnext"])
def test_registered_models_count(name):
    from edgeseg.models import create_model, list_models

    assert name in list_models()
    r = count(create_model(name, num_classes=11), (64, 64))
    assert r["gmac_conv"] > 0 and r["gmac_total"] >= r["gmac_conv"] and r["params"] > 0


def test_models_command(tmp_path, capsys):
    import json

    from edgeseg.cli import main
    from edgeseg.models import list_models

    assert "test_segnext" in list_models()
    out = tmp_path / "models.json"
    assert main(["models", "--pattern", "test_segnext", "--input-size", "360x480", "--num-classes", "11",
                 "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "test_segnext" in printed and "counted as 384x480" in printed
    rows = json.loads(out.read_text())["models"]
    assert [r["name"] for r in rows] == ["test_segnext"]
    r = rows[0]
    assert r["counted_hw"] == [384, 480] and r["params"] > 0
    g = r["gmac_512"]
    assert g["gmac_total"] == pytest.approx(g["gmac_conv"] + g["gmac_matmul"])
    assert r["gmac_input"]["gmac_total"] < g["gmac_total"]  # 384x480 < 512x512
    assert main(["models", "--pattern", "no_such_*"]) == 2
    assert "matches no model" in capsys.readouterr().err


class NeedsData(nn.Module):
    """A forward that reads a value (as some models do): impossible on the meta device."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return self.conv(x) * float(x.abs().sum() >= 0)


def test_meta_count_equals_cpu_count(caplog):
    """`count_registered` builds on the meta device (shapes only) and must give the real forward's numbers."""
    from edgeseg.models import create_model, list_models
    from edgeseg.models.flops import count_registered

    # one variant per family of hard modules (SegNeXt: NMF; OffSeg backbone + FreqFusion + offset learning + AFM);
    # meta kernels are slow Python, so not all six
    names = ["test_segnext", "test_offseg_afm"]
    assert set(names) <= set(list_models("test_*"))
    sizes = [(64, 96)]
    for name in names:
        with caplog.at_level("DEBUG", logger="edgeseg.models.flops"):
            caplog.clear()
            fast = count_registered(name, 11, sizes)
        assert not [r for r in caplog.records if "counting on the CPU" in r.getMessage()], (name, caplog.text)
        torch.manual_seed(0)
        cpu = create_model(name, num_classes=11)
        assert fast == [count(cpu, hw) for hw in sizes], name


def test_segnext_builds_on_meta_and_cpu_bases_are_the_seeded_draw():
    from edgeseg.models import create_model
    from edgeseg.models.ham_head import default_bases

    with torch.device("meta"):
        m = create_model("test_segnext", num_classes=11)
    assert {t.device.type for t in (*m.parameters(), *m.buffers())} == {"meta"}
    ham = create_model("test_segnext", num_classes=11).decode_head.hamburger.ham
    assert ham.bases.device.type == "cpu" and torch.equal(ham.bases, default_bases(ham.S, ham.D, ham.R))


def test_model_that_needs_data_falls_back_to_the_cpu(monkeypatch, caplog):
    from edgeseg.models import registry
    from edgeseg.models.flops import count_registered

    monkeypatch.setattr(registry, "create_model", lambda name, num_classes, **kw: NeedsData(num_classes))
    import edgeseg.models as models_pkg

    monkeypatch.setattr(models_pkg, "create_model", lambda name, num_classes, **kw: NeedsData(num_classes))
    with caplog.at_level("DEBUG", logger="edgeseg.models.flops"):
        (r,) = count_registered("needs_data", 2, [(8, 8)])
    assert "counting on the CPU" in caplog.text
    assert r == count(NeedsData(2), (8, 8)) and r["gmac_conv"] * 1e9 == pytest.approx(64 * 3 * 2)


def _readme_gmac_rows() -> dict[str, list[float]]:
    """The README's model table: variant -> [params K=150, GMAC 512², conv, matmul, params K=11, GMAC 384×480, conv,
    matmul]."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\| `(\w+)` \| ([\d.]+) \| ([\d.]+) \(([\d.]+) conv \+ ([\d.]+) matmul\) \| ([\d.]+) \| "
                     r"([\d.]+) \(([\d.]+) \+ ([\d.]+)\) \|$", line)
        if m:
            rows[m.group(1)] = [float(v) for v in m.groups()[1:]]
    return rows


@pytest.mark.slow
def test_readme_gmac_table_matches_the_counter():
    """Every number of the README's params / GMAC table is what `count_registered` gives (2 decimals)."""
    from edgeseg.models.flops import count_registered

    rows = _readme_gmac_rows()
    assert {"offseg_t", "segnext_t", "segnext_t_offset", "segnext_t_ssa", "offseg_t_afm"} <= set(rows), rows
    for name, want in rows.items():
        (k150,) = count_registered(name, 150, [(512, 512)])
        (k11,) = count_registered(name, 11, [(384, 480)])
        got = []
        for r in (k150, k11):
            got += [r["params"] / 1e6, r["gmac_total"], r["gmac_conv"], r["gmac_matmul"]]
        assert [round(g, 2) for g in got] == pytest.approx(want, abs=0.011), (name, got, want)
