"""AFM (MPLSeg): the matmul-DFT back-end equals torch.fft (forward, inverse, magnitude, phase, spectral
padding, gradients); portable atan2; PSL; the AFM carriers train, export and keep outputs under
prepare_for_export."""
import math

import pytest
import torch

import edgeseg.models as M
from edgeseg.models.afm import (AFM, atan2, dft_forward, dft_inverse, dft_matrices, fft_forward, fft_inverse,
                                psl_loss)

SIZES = [  # (in_hw, out_hw): square, odd, non-square, with and without spectral padding
    ((8, 8), (8, 8)), ((7, 9), (7, 9)), ((6, 10), (6, 10)), ((5, 12), (5, 12)),
    ((6, 10), (12, 20)), ((5, 7), (10, 14)), ((4, 6), (16, 24)), ((3, 5), (6, 11)), ((16, 12), (32, 24)),
]


@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_dft_forward_equals_fft(in_hw, out_hw):
    x = torch.randn(2, 3, *in_hw)
    re1, im1 = fft_forward(x)
    re2, im2 = dft_forward(x, dft_matrices(in_hw, out_hw))
    assert (re1 - re2).abs().max() < 1e-5
    assert (im1 - im2).abs().max() < 1e-5
    z = torch.fft.rfft2(x, norm="ortho")
    assert (torch.sqrt(re2 ** 2 + im2 ** 2) - z.abs()).abs().max() < 1e-5  # magnitude
    ph_ref = torch.angle(z + 1e-3)
    ph = atan2(im2, re2 + 1e-3)
    d = (ph - ph_ref).abs()
    d = torch.minimum(d, 2 * math.pi - d)  # +-pi are the same angle on the real bins
    assert d.max() < 1e-4


@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_dft_inverse_equals_fft(in_hw, out_hw):
    wr = in_hw[1] // 2 + 1
    re, im = torch.randn(2, 3, in_hw[0], wr), torch.randn(2, 3, in_hw[0], wr)
    y1 = fft_inverse(re, im, in_hw, out_hw)
    y2 = dft_inverse(re, im, dft_matrices(in_hw, out_hw))
    assert y1.shape == y2.shape == (2, 3, *out_hw)
    assert (y1 - y2).abs().max() < 1e-5
    if in_hw == out_hw:  # plain irfft2
        ref = torch.fft.irfft2(torch.complex(re, im), s=out_hw, norm="ortho")
        assert (y2 - ref).abs().max() < 1e-5


@pytest.mark.parametrize("in_hw,out_hw", [((6, 10), (12, 20)), ((5, 7), (10, 14)), ((4, 4), (16, 16))])
def test_spectral_padding_is_fourier_interpolation(in_hw, out_hw):
    x = torch.randn(1, 2, *in_hw, dtype=torch.float64)
    f = out_hw[0] // in_hw[0]
    for y in (fft_inverse(*fft_forward(x), in_hw, out_hw),
              dft_inverse(*dft_forward(x, m := dft_matrices(in_hw, out_hw, dtype=torch.float64)), m)):
        assert (y[..., ::f, ::f] - x).abs().max() < 1e-10  # samples kept
    c = torch.full((1, 1, *in_hw), 3.0, dtype=torch.float64)
    assert (fft_inverse(*fft_forward(c), in_hw, out_hw) - 3.0).abs().max() < 1e-10  # scale kept


def test_atan2_matches_torch_and_has_its_gradients():
    y = torch.randn(2000, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2000, dtype=torch.float64, requires_grad=True)
    x2 = torch.cat([x, torch.zeros(3, dtype=torch.float64), -torch.ones(2, dtype=torch.float64)])
    y2 = torch.cat([y, torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)])
    assert (atan2(y2, x2) - torch.atan2(y2, x2)).abs().max() < 1e-12
    g1 = torch.autograd.grad(atan2(y, x).sum(), (x, y))
    g2 = torch.autograd.grad(torch.atan2(y, x).sum(), (x, y))
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() < 1e-10
    # -0.0 is treated as +0.0: the branch cut gives +pi
    assert atan2(torch.tensor(-0.0), torch.tensor(-1.0)).item() == pytest.approx(math.pi)


@pytest.mark.parametrize("hw,out_hw", [((8, 12), None), ((7, 9), None), ((4, 6), (8, 12)), ((5, 5), (10, 10))])
def test_afm_backends_agree_forward_and_backward(hw, out_hw):
    torch.manual_seed(0)
    afm = AFM(8, 6).train()
    x = torch.randn(2, 8, *hw)
    outs, grads = [], []
    for backend in ("fft", "dft"):
        afm.backend = backend
        afm.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = afm(xi, out_hw=out_hw)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in afm.parameters()])
    assert outs[0].shape == (2, 6, *(out_hw or hw))
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())


def test_afm_prepare_for_export_bakes_matrices():
    torch.manual_seed(0)
    afm = AFM(4, 4, stride=16, out_stride=8).eval()
    x = torch.randn(1, 4, 4, 6)
    with torch.no_grad():
        a = afm(x, out_hw=(8, 12))
        afm.prepare_for_export((64, 96))
        assert afm.backend == "dft" and afm.dft_inv_w.shape == (2 * 4, 12)
        b = afm(x, out_hw=(8, 12))
    assert (a - b).abs().max() < 1e-5
    assert "dft_fw_w" not in afm.state_dict()  # constants, not checkpoint content


def test_psl_zero_for_perfect_prediction_and_positive_otherwise():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 16, 20))
    labels[0, :3] = 255
    perfect = torch.nn.functional.one_hot(labels.clamp(0, 3), 4).permute(0, 3, 1, 2).float() * 50
    random = torch.randn(2, 4, 16, 20, requires_grad=True)
    lp = psl_loss(perfect, labels, 255).item()
    lr = psl_loss(random, labels, 255)
    assert lr.item() > lp + 0.1
    lr.backward()
    assert random.grad is not None and torch.isfinite(random.grad).all()


AFM_TINY = ["test_segnext_afm", "test_offseg_afm"]


@pytest.mark.parametrize("name", AFM_TINY)
def test_afm_carrier_trains_with_psl(name):
    torch.manual_seed(0)
    m = M.create_model(name, 5).train()
    x = torch.randn(2, 3, 64, 96)
    y = m(x)
    labels = torch.randint(0, 6, (2, 64, 96))
    aux = m.aux_loss(labels, 5)
    assert torch.isfinite(aux) and aux.item() > 0
    up = torch.nn.functional.interpolate(y, size=(64, 96), mode="bilinear")
    (torch.nn.functional.cross_entropy(up, labels, ignore_index=5) + aux).backward()
    afm = next(mod for mod in m.modules() if isinstance(mod, AFM))
    assert afm.mp[0].weight.grad is not None and afm.pa[3].weight.grad is not None


@pytest.mark.parametrize("name", AFM_TINY)
def test_afm_carrier_export_matches_eager(name):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = M.create_model(name, 5).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = m(x)
    M.prepare_for_export(m, (64, 96))
    assert all(a.backend == "dft" for a in m.modules() if isinstance(a, AFM))
    with torch.no_grad():
        eager = m(x)
    assert (ref - eager).abs().max() < 1e-4
    ep = torch.export.export(m, (x,))
    targets = " ".join(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    assert "fft" not in targets and "complex" not in targets and "atan2" not in targets
    with torch.no_grad():
        out = ep.module()(x)
    assert (out - eager).abs().max() < 1e-5
