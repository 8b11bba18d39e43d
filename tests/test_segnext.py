"""SegNeXt-T (+ offset learning, + SSA): official names and parity with the official code; NMF bases modes;
tiny variants export with torch.export and match eager."""
import pytest
import torch

import edgeseg.models as M
from edgeseg.models.ham_head import NMF2D, default_bases

PARITY = {
    # name: (model, params, tolerance on max |logits diff|)
    "segnext_t_k150": ("segnext_t", 4_263_414, 2e-4),
    "segnext_t_offset_k150": ("segnext_t_offset", 4_433_186, 1e-3),
}


def _load(parity_dir, name):
    model_name, _, _ = PARITY[name]
    m = M.create_model(model_name, 150)
    sd = torch.load(parity_dir / f"{name}.state_dict.pt", weights_only=True)
    res = m.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    return m.eval(), sd


@pytest.mark.parametrize("name", sorted(PARITY))
def test_param_count_and_names(parity_dir, name):
    m, sd = _load(parity_dir, name)
    assert sum(p.numel() for p in m.parameters()) == PARITY[name][1]
    # every official key exists with the same shape; ours adds only the stored NMF bases
    ours = m.state_dict()
    for k, v in sd.items():
        assert ours[k].shape == v.shape, k
    assert set(ours) - set(sd) == {"decode_head.hamburger.ham.bases"}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_logits_match_official(parity_dir, name):
    torch.set_num_threads(1)
    m, _ = _load(parity_dir, name)
    x = torch.load(parity_dir / "input_512.pt", weights_only=True)
    ref = torch.load(parity_dir / f"{name}.logits.pt", weights_only=True)
    rand = torch.load(parity_dir / f"{name}.nmf_rand.pt", weights_only=True)
    m.decode_head.hamburger.ham.set_bases(rand)  # the official draw, normalised over D
    with torch.no_grad():
        out = m(x)
    assert out.shape == ref.shape == (1, 150, 64, 64)
    diff = (out - ref).abs().max().item()
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert diff <= PARITY[name][2], diff
    assert agree >= 0.999, agree


def test_parity_detects_a_broken_weight(parity_dir):
    """The comparison is sensitive: one perturbed weight pushes the logits out of tolerance."""
    torch.set_num_threads(1)
    m, _ = _load(parity_dir, "segnext_t_k150")
    x = torch.load(parity_dir / "input_512.pt", weights_only=True)[:, :, :256, :256]
    with torch.no_grad():
        a = m(x)
        m.backbone.block3[2].attn.spatial_gating_unit.conv1_2.weight[5, 0, 3, 0] += 0.05
        b = m(x)
    assert (a - b).abs().max().item() > 2e-4


def test_default_bases_equal_official_seeded_draw(parity_dir):
    rand = torch.load(parity_dir / "segnext_t_k150.nmf_rand.pt", weights_only=True)
    assert torch.equal(default_bases(1, 256, 16), torch.nn.functional.normalize(rand, dim=1))


def test_official_random_mode_equals_fixed_mode_with_same_bases():
    torch.manual_seed(1)
    nmf = NMF2D(MD_S=1, MD_R=4, channels=16).eval()
    x = torch.rand(2, 16, 5, 7)
    nmf.bases_mode = "random"
    torch.manual_seed(42)
    a = nmf(x[:1])
    torch.manual_seed(42)
    drawn = torch.rand((1, 16, 4))
    nmf.bases_mode = "fixed"
    nmf.set_bases(drawn)
    b = nmf(x[:1])
    assert torch.equal(a, b)
    # the fixed mode is deterministic and batch-independent
    c = nmf(x)
    assert torch.allclose(c[:1], b, atol=1e-6)
    assert torch.equal(nmf(x), c)
    # ... and the random mode is not deterministic
    nmf.bases_mode = "random"
    assert not torch.equal(nmf(x[:1]), nmf(x[:1]))


def test_official_state_dict_without_bases_keeps_buffer():
    m = M.create_model("test_segnext", 5)
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("ham.bases")}
    before = m.decode_head.hamburger.ham.bases.clone()
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.decode_head.hamburger.ham.bases, before)
    with pytest.raises(RuntimeError):
        m.load_state_dict({k: v for k, v in sd.items() if "squeeze" not in k}, strict=True)


def test_ssa_head_names_and_shapes():
    m = M.create_model("segnext_t_ssa", 150)
    keys = set(m.state_dict())
    for k in ("decode_head.get_feat_pos.weight", "decode_head.center_pos.weight",
              "decode_head.center_content_proj.0.weight", "decode_head.center_content_proj.2.bias",
              "decode_head.gt_center_content_proj.0.weight", "decode_head.center_pos_proj.2.weight",
              "decode_head.gt_center_pos_proj.2.bias", "decode_head.center_proj.weight",
              "decode_head.gt_center_proj.weight", "decode_head.ssa_loss.criterion.empty_weight",
              "decode_head.conv_seg.weight"):
        assert k in keys, k
    m = M.create_model("test_segnext_ssa", 7).eval()
    with torch.no_grad():
        y = m(torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 7, 8, 12)
    assert y.abs().max() <= 15.0 + 1e-4  # 15 x cosine similarity


def test_ssa_uses_adaptive_prototypes():
    """The SSA output depends on the coarse classifier through the adapted centres, not only via conv_seg."""
    torch.manual_seed(0)
    m = M.create_model("test_segnext_ssa", 5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = m(x)
        m.decode_head.center_content_proj[2].bias.add_(0.5)
        b = m(x)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["test_segnext", "test_segnext_offset", "test_segnext_ssa"])
def test_tiny_export_matches_eager(name):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = M.create_model(name, 6)
    x = torch.randn(1, 3, 64, 96)
    m.eval()
    with torch.no_grad():
        before = m(x)
    M.prepare_for_export(m, (64, 96))
    with torch.no_grad():
        eager = m(x)
    assert torch.allclose(before, eager, atol=1e-6)
    ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("rand" in t for t in targets), targets
    with torch.no_grad():
        out = ep.module()(x)
    assert torch.allclose(out, eager, atol=1e-5)


@pytest.mark.parametrize("name", ["test_segnext", "test_segnext_offset", "test_segnext_ssa"])
def test_tiny_train_step(name):
    torch.manual_seed(0)
    m = M.create_model(name, 4).train()
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 4, (2, 8, 8))
    loss = torch.nn.functional.cross_entropy(m(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert m.backbone.patch_embed1.proj[0].weight.grad is not None
