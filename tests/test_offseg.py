"""OffSeg family: official parity (strict load, params, logits), CARAFE/similarity/offset-learning numerics,
bias-table resize for non-square inputs, prepare_for_export and torch.export."""
import copy

import pytest
import torch
import torch.nn.functional as F

from edgeseg.models import create_model, prepare_for_export
from edgeseg.models.efficientformer_v2 import Attention4D, Attention4DDownsample
from edgeseg.models.freqfusion import carafe, carafe_reference, local_cosine_similarity
from edgeseg.models.offset_learning import OffsetLearning

OFFSEG_T_PARAMS = 6_222_176


@pytest.fixture(scope="module")
def parity(parity_dir):
    sd = torch.load(parity_dir / "offseg_t_k150.state_dict.pt", weights_only=True)
    x = torch.load(parity_dir / "input_512.pt", weights_only=True)
    logits = torch.load(parity_dir / "offseg_t_k150.logits.pt", weights_only=True)
    feats = torch.load(parity_dir / "offseg_t_k150.backbone_feats.pt", weights_only=True)
    keys = [ln.split("\t")[0] for ln in (parity_dir / "offseg_t_k150.keys.txt").read_text().splitlines()
            if ln and not ln.startswith("#")]
    return dict(sd=sd, x=x, logits=logits, feats=feats, keys=keys)


@pytest.fixture(scope="module")
def offseg_t_official(parity):
    model = create_model("offseg_t", 150)
    model.load_state_dict(parity["sd"], strict=True)
    return model.eval()  # eval after loading, as the protocol says


def _single_thread(fn):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return fn()
    finally:
        torch.set_num_threads(n)


def test_offseg_t_state_dict_keys_and_params(parity):
    model = create_model("offseg_t", 150)
    assert sorted(model.state_dict().keys()) == sorted(parity["keys"])
    assert sum(p.numel() for p in model.parameters()) == OFFSEG_T_PARAMS
    res = model.load_state_dict(parity["sd"], strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert model.output_stride == 4


def test_offseg_t_backbone_features_match(parity, offseg_t_official):
    feats = _single_thread(lambda: offseg_t_official.backbone(parity["x"]))
    assert len(feats) == 4
    for ours, ref in zip(feats, parity["feats"]):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4


def test_offseg_t_logits_match_official(parity, offseg_t_official):
    out = _single_thread(lambda: offseg_t_official(parity["x"]))
    ref = parity["logits"]
    assert out.shape == ref.shape == (1, 150, 128, 128)
    max_diff = (out - ref).abs().max().item()
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert max_diff <= 3e-4, f"max |dlogits| {max_diff:.3e}"
    assert agree >= 0.999, f"argmax agreement {agree:.5f}"


def test_offseg_t_non_square_bias_resize_and_export_prep(parity, offseg_t_official):
    model = copy.deepcopy(offseg_t_official).eval()
    x = torch.randn(1, 3, 256, 384)
    attn = [m for m in model.modules() if isinstance(m, (Attention4D, Attention4DDownsample))]
    assert len(attn) == 5
    # 1/16 of 256x384 is 16x24: stride-2 attention sees 8x12 = 96 tokens vs the 256-token table of 512.
    a4 = model.backbone.network[4][-1].token_mixer
    assert a4.attention_bias_idxs_seg.shape == (256, 256)
    assert a4.attention_bias(96, 96).shape == (1, 8, 96, 96)
    eager = _single_thread(lambda: model(x))
    assert eager.shape == (1, 150, 64, 96)
    assert torch.isfinite(eager).all()
    prepare_for_export(model, (256, 384))
    assert a4._baked_bias is not None and a4._baked_bias.shape == (1, 8, 96, 96)
    down = model.backbone.network[5].attn
    assert down._baked_bias.shape == (1, 8, 8 * 12, 16 * 24)
    baked = _single_thread(lambda: model(x))
    assert torch.allclose(baked, eager, atol=1e-6, rtol=0)
    # the baked table is not part of the state dict: strict loading still works and drops it
    assert not any("_baked" in k for k in model.state_dict())
    model.load_state_dict(parity["sd"], strict=True)
    assert a4._baked_bias is None


def test_bias_cache_follows_loaded_weights(parity):
    model = create_model("offseg_t", 150).eval()
    x = torch.randn(1, 3, 128, 192)
    _single_thread(lambda: model(x))  # fills the eval cache with the random init's tables
    model.load_state_dict(parity["sd"], strict=True)
    after_load = _single_thread(lambda: model(x))
    fresh = create_model("offseg_t", 150)
    fresh.load_state_dict(parity["sd"], strict=True)
    ref = _single_thread(lambda: fresh.eval()(x))
    assert torch.equal(after_load, ref)


@pytest.mark.parametrize("kernel,scale,hw", [(3, 1, (5, 7)), (5, 2, (4, 6)), (5, 2, (3, 3)), (3, 2, (2, 5))])
@pytest.mark.parametrize("grad", [False, True])
def test_carafe_matches_direct_loop(kernel, scale, hw, grad):
    g = torch.Generator().manual_seed(kernel * 10 + scale)
    x = torch.randn(2, 3, *hw, generator=g)
    # unnormalised random weights make the zero-padding semantics visible at the border
    mask = torch.randn(2, kernel * kernel, hw[0] * scale, hw[1] * scale, generator=g)
    with torch.set_grad_enabled(grad):
        ours = carafe(x, mask, kernel, scale)
    ref = carafe_reference(x, mask, kernel, scale)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_carafe_border_is_zero_padding():
    x = torch.ones(1, 1, 3, 3)
    mask = torch.ones(1, 9, 3, 3)  # sum of the 3x3 neighbourhood that lies inside the image
    out = carafe(x, mask, 3, 1)
    expected = torch.tensor([[4.0, 6, 4], [6, 9, 6], [4, 6, 4]])
    assert torch.equal(out[0, 0], expected)


def _official_similarity(t, k=3, dilation=2):
    b, c, h, w = t.shape
    unf = F.unfold(t, k, padding=(k // 2) * dilation, dilation=dilation).reshape(b, c, k * k, h, w)
    sim = F.cosine_similarity(unf[:, :, k * k // 2:k * k // 2 + 1], unf, dim=1)
    return torch.cat((sim[:, :k * k // 2], sim[:, k * k // 2 + 1:]), dim=1)


def test_local_cosine_similarity_matches_unfold_form():
    x = torch.randn(2, 8, 6, 9)
    assert torch.allclose(local_cosine_similarity(x, 3, 2), _official_similarity(x), atol=1e-6)


def _official_offset_learning(mod, x):
    b, c, h, w = x.shape
    cls = mod.cls_repr.expand(b, -1, -1)
    feat = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    a = (feat @ cls.transpose(1, 2)).permute(0, 2, 1)
    cls2 = cls + mod.cls_offset_proj(a.softmax(dim=2) @ feat)
    feat2 = feat + mod.feat_offset_proj(a.softmax(dim=1).transpose(1, 2) @ cls)
    masks = mod.mask_norm(feat2 @ cls2.transpose(1, 2))
    return masks.permute(0, 2, 1).reshape(b, -1, h, w)


def test_offset_learning_matches_official_formula():
    torch.manual_seed(1)
    mod = OffsetLearning(7, 16)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 16, 5, 6)
    assert torch.allclose(mod(x), _official_offset_learning(mod, x), atol=1e-4)


def test_test_offseg_trains_and_exports():
    torch.manual_seed(0)
    model = create_model("test_offseg", 5)
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert out.shape == (2, 5, 16, 24)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:10])
    assert model.backbone.network[4][0].token_mixer.attention_biases_seg.grad is not None

    model.eval()
    x1 = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        eager = model(x1)
    prepare_for_export(model, (64, 96))
    with torch.no_grad():
        assert torch.allclose(model(x1), eager, atol=1e-6, rtol=0)
    ep = torch.export.export(model, (x1,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("bicubic" in t for t in targets), "baked bias table must remove bicubic interpolation"
    with torch.no_grad():
        exported = ep.module()(x1)
    assert torch.allclose(exported, eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel,scale", [(3, 1), (5, 2)])
def test_carafe_gradients(kernel, scale):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 3, 4, dtype=torch.double, requires_grad=True)
    mask = torch.randn(1, kernel * kernel, 3 * scale, 4 * scale, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: carafe(a, b, kernel, scale), (x, mask))


def test_flop_counter_runs_under_no_grad():
    # module-tracking hooks (FlopCounterMode, used by `edgeseg models`) must accept every submodule call
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model("test_offseg", 5).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 64, 64))
    assert counter.get_total_flops() > 0


# ----------------------------------------------------------------------------------------------------------------
# FreqFusion export form (FreqFusion.prepare_for_export): few-node CARAFE / similarity / constant sampler grid
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel,scale,hw", [(3, 1, (5, 7)), (5, 2, (4, 6)), (5, 2, (3, 3)), (3, 2, (2, 5)),
                                             (5, 1, (2, 2))])
def test_carafe_export_form_matches_reference_and_training_form(kernel, scale, hw):
    from edgeseg.models.freqfusion import carafe_export, unfold_kernel

    g = torch.Generator().manual_seed(kernel * 10 + scale + hw[0])
    x = torch.randn(2, 3, *hw, generator=g)
    mask = torch.randn(2, kernel * kernel, hw[0] * scale, hw[1] * scale, generator=g)  # unnormalised: borders show
    ours = carafe_export(x, mask, kernel, scale, unfold_kernel(kernel))
    assert ours.shape == (2, 3, hw[0] * scale, hw[1] * scale)
    assert torch.allclose(ours, carafe_reference(x, mask, kernel, scale), atol=1e-5, rtol=0)
    assert torch.allclose(ours, carafe(x, mask, kernel, scale), atol=1e-5, rtol=0)
    ones = carafe_export(torch.ones(1, 1, 3, 3), torch.ones(1, 9, 3, 3), 3, 1)  # zero padding at the border
    assert torch.equal(ones[0, 0], torch.tensor([[4.0, 6, 4], [6, 9, 6], [4, 6, 4]]))


@pytest.mark.parametrize("kernel,scale,hw", [(3, 1, (5, 7)), (5, 2, (4, 6)), (5, 2, (3, 3)), (3, 2, (2, 5)),
                                             (5, 1, (2, 2))])
def test_carafe_channels_last_form_matches_reference(kernel, scale, hw):
    """The channels-last export form (OpenVINO's) computes CARAFE exactly like mmcv's definition."""
    from edgeseg.models.freqfusion import carafe_export_channels_last

    g = torch.Generator().manual_seed(kernel * 10 + scale + hw[0] + 1)
    x = torch.randn(2, 3, *hw, generator=g)
    mask = torch.randn(2, kernel * kernel, hw[0] * scale, hw[1] * scale, generator=g)
    ours = carafe_export_channels_last(x, mask, kernel, scale)
    assert ours.shape == (2, 3, hw[0] * scale, hw[1] * scale)
    assert torch.allclose(ours, carafe_reference(x, mask, kernel, scale), atol=1e-5, rtol=0)
    ones = carafe_export_channels_last(torch.ones(1, 1, 3, 3), torch.ones(1, 9, 3, 3), 3, 1)
    assert torch.equal(ones[0, 0], torch.tensor([[4.0, 6, 4], [6, 9, 6], [4, 6, 4]]))


def test_freqfusion_channels_last_form_traced_equals_eager():
    """prepare_for_export(..., carafe="channels_last") changes only the traced graph's CARAFE (no conv-im2col
    left in the fusion stages) and the traced model equals eager; an unknown form is refused."""
    torch.manual_seed(0)
    model = create_model("test_offseg", 5).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        eager = model(x)
    prepare_for_export(model, (64, 96), carafe="channels_last")
    assert all(f.carafe_form == "channels_last" for f in model.decode_head.freqfusions)
    ep = torch.export.export(model, (x,), strict=False)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), eager, atol=2e-5, rtol=0)
    convs = [n for n in _fusion_nodes(ep) if "conv" in str(n.target)]
    onehot = [n for n in convs if "unfold_kernel" in str(n.args[1])]  # the conv_bmm form's im2col weights
    assert convs and not onehot, [str(n.args[1]) for n in convs]
    plain = create_model("test_offseg", 5).eval()
    prepare_for_export(plain, (64, 96))
    ref = [n for n in _fusion_nodes(torch.export.export(plain, (x,), strict=False)) if "conv" in str(n.target)]
    assert any("unfold_kernel" in str(n.args[1]) for n in ref)  # the check above can fail
    with pytest.raises(ValueError, match="carafe form"):
        prepare_for_export(create_model("test_offseg", 5), (64, 96), carafe="nope")
    from edgeseg.models.carafe import CARAFE_FORMS
    from edgeseg.targets import EXPORT_FORMS

    assert EXPORT_FORMS["carafe"] == CARAFE_FORMS  # profiles may name exactly the forms the model has


@pytest.mark.parametrize("kernel,scale,hw,n", [(3, 1, (5, 7), 1), (5, 2, (4, 6), 1), (5, 2, (3, 3), 2),
                                               (3, 2, (2, 5), 2), (5, 1, (2, 2), 1)])
def test_carafe_gather_form_matches_reference(kernel, scale, hw, n):
    """The row-gather export form (ONNX Runtime's and ExecuTorch's) computes CARAFE exactly like mmcv's definition, with its baked
    index or without, for one image (the export batch) and several."""
    from edgeseg.models.carafe import carafe_export_gather, gather_index

    g = torch.Generator().manual_seed(kernel * 10 + scale + hw[0] + 2)
    x = torch.randn(n, 5, *hw, generator=g)
    mask = torch.randn(n, kernel * kernel, hw[0] * scale, hw[1] * scale, generator=g)
    ref = carafe_reference(x, mask, kernel, scale)
    ours = carafe_export_gather(x, mask, kernel, scale, gather_index(*hw, kernel))
    assert ours.shape == (n, 5, hw[0] * scale, hw[1] * scale)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert torch.allclose(carafe_export_gather(x, mask, kernel, scale), ref, atol=1e-5, rtol=0)
    ones = carafe_export_gather(torch.ones(1, 1, 3, 3), torch.ones(1, 9, 3, 3), 3, 1)
    assert torch.equal(ones[0, 0], torch.tensor([[4.0, 6, 4], [6, 9, 6], [4, 6, 4]]))


def test_freqfusion_gather_form_traced_equals_eager_and_exports_to_onnx(tmp_path):
    """prepare_for_export(..., carafe="gather") bakes the im2col row indices, leaves no one-hot im2col conv in the
    traced fusion stages, and the traced model equals eager; through ONNX Runtime too (fp32, the onnx profile's
    form), where the im2col is a Gather."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = create_model("test_offseg", 5).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        eager = model(x)
    prepare_for_export(model, (64, 96), carafe="gather")
    assert all(f.carafe_form == "gather" for f in model.decode_head.freqfusions)
    assert any(name.startswith("gather_index_") for name, _ in model.decode_head.freqfusions[0].named_buffers())
    ep = torch.export.export(model, (x,), strict=False)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), eager, atol=2e-5, rtol=0)
    convs = [n for n in _fusion_nodes(ep) if "conv" in str(n.target)]
    assert convs and not [n for n in convs if "unfold_kernel" in str(n.args[1])]
    assert any("index_select" in str(n.target) for n in _fusion_nodes(ep))
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, input_names=["x"])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Gather" in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    assert abs(got - eager.numpy()).max() < 1e-4


@pytest.mark.parametrize("n,hw,out_hw,spread", [(1, (5, 7), (10, 14), 1.2), (2, (3, 4), (6, 8), 3.0),
                                               (4, (1, 6), (2, 12), 1.0), (1, (6, 6), (5, 9), 0.2)])
def test_grid_sample_gather_form_equals_grid_sample(n, hw, out_hw, spread):
    """The gather form of the sampler's resampling (ExecuTorch's) is bilinear grid_sample with border padding,
    align_corners=False: grids that reach past every border (clamped), land exactly on the last row/column and on
    pixel centres."""
    from edgeseg.models.freqfusion import grid_sample_gather

    g = torch.Generator().manual_seed(n * 100 + hw[0])
    src = torch.randn(n, 5, *hw, generator=g)
    grid = (torch.rand(n, *out_hw, 2, generator=g) * 2 - 1) * spread
    h, w = hw
    grid[:, 0, 0] = torch.tensor([1 - 1 / w, 1 - 1 / h])  # exactly the last pixel centre: neighbour weight 0
    grid[:, 0, 1] = torch.tensor([-1 + 1 / w, -1 + 3 / h])  # exactly pixel centres
    grid[:, -1, -1] = torch.tensor([5.0, -7.0])  # far outside: the border pixel
    ref = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ours = grid_sample_gather(src, grid)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=2e-6, rtol=0), (ours - ref).abs().max()
    assert torch.equal(ours[:, :, -1, -1], src[:, :, 0, -1])  # x past the right border, y past the top


def test_freqfusion_gather_sampler_form_traced_equals_eager():
    """prepare_for_export(..., sampler="gather") replaces every traced grid_sample of the fusion stages by row
    gathers, the traced model equals eager, and an unknown form is refused."""
    torch.manual_seed(0)
    model = create_model("test_offseg", 5).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        eager = model(x)
    prepare_for_export(model, (64, 96), sampler="gather")
    assert all(f.dysampler.sampler_form == "gather" for f in model.decode_head.freqfusions)
    ep = torch.export.export(model, (x,), strict=False)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), eager, atol=2e-5, rtol=0)
    targets = [str(n.target) for n in _fusion_nodes(ep)]
    assert not any("grid_sampler" in t for t in targets) and sum("embedding" in t for t in targets) == 4 * 3
    plain = create_model("test_offseg", 5).eval()
    prepare_for_export(plain, (64, 96))
    assert any("grid_sampler" in str(n.target) for n in _fusion_nodes(torch.export.export(plain, (x,), strict=False)))
    # no state of its own; int8 exports keep its coordinate / weight arithmetic float (the class's default)
    from edgeseg.quant.policy import float_policy

    assert set(model.state_dict()) == set(plain.state_dict())
    gathers = [n for n, m in model.named_modules() if type(m).__name__ == "BilinearGather"]
    assert len(gathers) == 3 and all(float_policy(model).covers(n) for n in gathers)
    assert not any(type(m).__name__ == "BilinearGather" for m in plain.modules())
    with pytest.raises(ValueError, match="sampler form"):
        prepare_for_export(create_model("test_offseg", 5), (64, 96), sampler="nope")
    from edgeseg.models.freqfusion import SAMPLER_FORMS
    from edgeseg.targets import EXPORT_FORMS

    assert EXPORT_FORMS["sampler"] == SAMPLER_FORMS


def test_local_cosine_similarity_export_form_matches_unfold_form():
    from edgeseg.models.freqfusion import local_cosine_similarity_export

    x = torch.randn(2, 8, 6, 9)
    assert torch.allclose(local_cosine_similarity_export(x, 3, 2), _official_similarity(x), atol=1e-6)


def _fusion_nodes(ep) -> list:
    out = []
    for n in ep.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if n.op == "call_function" and any("freqfusions" in v[0] for v in stack.values()):
            out.append(n)
    return out


def test_freqfusion_export_form_is_small_and_equal():
    """prepare_for_export switches FreqFusion's traced graph to the export form (CARAFE as conv-im2col + matmul,
    similarity as one conv, constant sampler grid): the traced test_offseg graph at 64x64 had ~1,635 FreqFusion
    nodes (CARAFE unrolled into 25 taps) and > 20 min of ExecuTorch lowering; eager stays bit-identical."""
    torch.manual_seed(0)
    model = create_model("test_offseg", 5).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        eager = model(x)
    prepare_for_export(model, (64, 96))
    assert all(f.export_form for f in model.decode_head.freqfusions)
    with torch.no_grad():
        assert torch.equal(model(x), eager)  # eager keeps the training form
    ep = torch.export.export(model, (x,), strict=False)
    fusion = _fusion_nodes(ep)
    targets = {str(n.target) for n in fusion}
    assert len(fusion) < 550, len(fusion)
    # ops XNNPACK does not delegate (each splits a partition) are gone from the fusion stages
    assert not any(op in t for t in targets for op in ("arange", "group_norm", "sum", "linalg", "expand")), targets
    assert sum("bmm" in t for t in targets) >= 1
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), eager, atol=2e-5, rtol=0)
    # the training form would trace into many more nodes
    fresh = create_model("test_offseg", 5).eval()
    big = _fusion_nodes(torch.export.export(fresh, (x,), strict=False))
    assert len(big) > 3 * len(fusion), (len(big), len(fusion))


def test_freqfusion_state_dict_unchanged_by_export_form():
    model = create_model("test_offseg", 5).eval()
    keys = set(model.state_dict())
    prepare_for_export(model, (64, 64))
    assert set(model.state_dict()) == keys  # the constants are non-persistent buffers
