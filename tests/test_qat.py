"""QAT round trip on a tiny model: fake-quant training lowers the loss, and the int8 artifact carries the learned
scales of the QAT observers."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeseg.models.registry import list_models, register_model

QAT_TINY = "qat_tiny"


class QatTiny(nn.Module):
    output_stride = 4

    def __init__(self, num_classes: int = 11, width: int = 8, bn: bool = True):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), norm(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, 2, 1), norm(width), nn.ReLU())
        self.decode_head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


if QAT_TINY not in list_models(QAT_TINY):
    @register_model
    def qat_tiny(num_classes: int, **kw) -> nn.Module:
        """Two conv-BN-ReLU layers and a 1x1 classifier (QAT tests only)."""
        return QatTiny(num_classes, **kw)


@pytest.fixture(scope="module")
def tiny_camvid(camvid_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("camvid_tiny")
    for split, n in (("train", 8), ("val", 4)):
        (root / split).mkdir()
        (root / f"{split}annot").mkdir()
        for p in sorted((camvid_root / split).iterdir())[:n]:
            shutil.copy(p, root / split / p.name)
            shutil.copy(camvid_root / f"{split}annot" / (p.stem + ".png"), root / f"{split}annot" / (p.stem + ".png"))
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.data.datasets import CAMVID_INFO
    from edgeseg.models import create_model
    from edgeseg.types import ModelSpec

    torch.manual_seed(0)
    m = create_model(QAT_TINY, num_classes=11)
    spec = ModelSpec(model=QAT_TINY, num_classes=11, class_names=CAMVID_INFO.class_names,
                     palette=CAMVID_INFO.palette, ignore_index=CAMVID_INFO.ignore_index, input_hw=(64, 64))
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "qat_tiny", m, spec)


@pytest.fixture(scope="module")
def tiny_ckpt_nobn(tmp_path_factory):
    """qat_tiny without BatchNorm: torchao 0.18's conv-BN QAT fusion traces ~130 pattern graphs per prepare and
    per convert (~1 min of CPU here, whatever the model); the hand-off tests below do not need BN."""
    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.data.datasets import CAMVID_INFO
    from edgeseg.models import create_model
    from edgeseg.types import ModelSpec

    torch.manual_seed(0)
    m = create_model(QAT_TINY, num_classes=11, bn=False)
    spec = ModelSpec(model=QAT_TINY, num_classes=11, class_names=CAMVID_INFO.class_names,
                     palette=CAMVID_INFO.palette, ignore_index=CAMVID_INFO.ignore_index, input_hw=(64, 64),
                     model_kwargs={"bn": False})
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "qat_tiny_nobn", m, spec)


@pytest.fixture(scope="module")
def qat_run(tiny_ckpt, tiny_camvid, tmp_path_factory):
    from edgeseg.train.qat import qat

    out = tmp_path_factory.mktemp("qat") / "run"
    res = qat(tiny_ckpt, "executorch-xnnpack", tiny_camvid, out, iters=12, batch_size=4, lr=5e-3, val_interval=12,
              log_interval=1, progress=False, scale_range=(1.0, 1.0), photometric=False)
    return res, out


def test_fake_quant_model_trains(qat_run):
    res, out = qat_run
    losses = [r["loss"] for r in map(json.loads, (out / "train" / "log.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert res["fit"]["last"] is not None and 0.0 <= res["fit"]["last"]["miou"] <= 1.0  # fake-quant val mIoU
    assert res["observer_scales"]


def test_qat_keeps_float_batchnorm_statistics(qat_run, tiny_ckpt):
    """QAT trains with frozen BN statistics (a short QAT at a small batch otherwise replaces them: offseg_t lost
    1.6 mIoU in the fake-quant graph alone); qat_run's 12 steps at lr 5e-3 would move every running mean."""
    from edgeseg.checkpoint import load_checkpoint

    _, out = qat_run
    before, _ = load_checkpoint(tiny_ckpt)
    after, _ = load_checkpoint(out / "checkpoint")
    sd0, sd1 = before.state_dict(), after.state_dict()
    stats = [k for k in sd0 if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 4
    for k in stats:
        assert torch.equal(sd0[k], sd1[k]), k
    # ...while the weights did train
    assert not torch.equal(sd0["backbone.0.weight"], sd1["backbone.0.weight"])


def test_frozen_bn_survives_train_eval_switches_and_deepcopy():
    import copy

    from edgeseg.export.qat_graph import _set_bn_stats_frozen, freeze_bn_stats

    class BN(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x) * 2

    from torchao.quantization.pt2e import allow_exported_model_train_eval

    gm = torch.export.export(BN().train(), (torch.randn(2, 3, 4, 4),), strict=False).module()
    allow_exported_model_train_eval(gm)
    assert _set_bn_stats_frozen(copy.deepcopy(gm)) == 1  # the graph has one training-mode batch norm
    freeze_bn_stats(gm)
    twin = copy.deepcopy(gm)
    for m in (gm, twin):
        m.eval()
        m.train()
        x = torch.randn(2, 3, 4, 4) * 5 + 3
        m(x)
        assert torch.equal(m.bn.running_mean, torch.zeros(3)) and torch.equal(m.bn.running_var, torch.ones(3))
        assert torch.allclose(m(x), x * 2 / (1 + 1e-5) ** 0.5)  # normalized by the running statistics
    assert _set_bn_stats_frozen(gm) == 0


def test_qat_graph_has_no_stochastic_layers():
    """DropPath/dropout in train mode would be exported as random ops (segnext_t's DropPath reached a QAT ONNX
    artifact as RandomUniformLike): prepare_qat switches them off, and a random graph is refused."""
    from edgeseg.errors import ArtifactError
    from edgeseg.models.mscan import DropPath
    from edgeseg.train.qat import check_deterministic, convert_qat, prepare_qat

    class Drop(nn.Module):
        output_stride = 1

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.drop_path, self.drop = DropPath(0.5), nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x.mean(1, keepdim=True) + self.drop_path(self.conv(x)))

    with pytest.raises(ArtifactError, match="random"):
        gm = torch.export.export(Drop().train(), (torch.randn(2, 3, 8, 8),), strict=False).module()
        check_deterministic(gm, "train-mode export")
    prepared = prepare_qat(Drop(), "executorch-xnnpack", (8, 8))
    from edgeseg.models import create_model

    seg = create_model("test_segnext", num_classes=3)  # LightHamHead's NMF draws random bases in training
    check_deterministic(prepare_qat(seg, "onnx", (32, 32)), "segnext")
    for _ in range(2):  # torchao's train switch would turn the eval-mode dropout into a random one again
        prepared.train()
        check_deterministic(prepared, "prepared, train mode")
        prepared.eval()
        check_deterministic(prepared, "prepared, eval mode")
    prepared.train()
    ep = convert_qat(prepared, (8, 8))
    check_deterministic(ep.module(), "converted")
    assert not [n for n in ep.graph.nodes if "bernoulli" in str(n.target) or "rand" in str(n.target)]


@pytest.mark.parametrize("name,stride", [("test_segnext_offset", 8), ("test_offseg", 4)])
def test_openvino_qat_trains_the_real_architectures(name, stride):
    """OpenVINOQuantizer annotates inputs torchao's observers cannot take: normalisation biases (1-D) with a
    per-channel spec (segnext_t_offset's OpenVINO QAT died at its first step with IndexError) and the dynamic
    batch size, a SymInt, in offseg's shape arithmetic ("'int' object has no attribute 'detach'"). Both stay
    float; the real (tiny) models train a step."""
    pytest.importorskip("nncf")
    from edgeseg.models import create_model
    from edgeseg.train.qat import prepare_qat

    prepared = prepare_qat(create_model(name, num_classes=11), "openvino", (64, 64))
    prepared.train()
    out = prepared(torch.randn(2, 3, 64, 64))
    out.mean().backward()
    assert out.shape == (2, 11, 64 // stride, 64 // stride)


def test_qat_checkpoint_records_scheme(qat_run):
    from edgeseg.checkpoint import load_checkpoint, load_spec

    res, _ = qat_run
    spec = load_spec(res["checkpoint"])
    assert spec.quant["target"] == "executorch-xnnpack" and spec.quant["format"] == "edgeseg-qat/2"
    assert spec.quant["params"] == "qat_params.safetensors" and "program" not in spec.quant
    assert spec.quant["export_form"] == {"carafe": "gather", "sampler": "gather"}  # the profile's: what PTQ exports
    assert spec.quant["bn_stats"].startswith("frozen")
    load_checkpoint(res["checkpoint"])  # the float weights still load into the eager model


def test_program_carries_learned_scales(qat_run):
    from edgeseg.train.qat import load_qat_program, program_scales

    res, _ = qat_run
    gm, quant = load_qat_program(res["checkpoint"])
    scales = program_scales(gm)
    learned = list(res["observer_scales"].values())
    assert scales and learned
    hits = sum(any(abs(s - l) <= 1e-6 * max(l, 1e-12) for s in scales) for l in learned)
    assert hits >= len(learned) // 2, (scales[:5], learned[:5])
    y = gm(torch.randn(3, 3, 64, 64))  # dynamic batch survives
    assert y.shape == (3, 11, 16, 16)


def test_onnx_artifact_carries_learned_scales(qat_run, tmp_path):
    import onnx
    from onnx import numpy_helper

    from edgeseg.export import export_checkpoint

    res, _ = qat_run
    art = export_checkpoint(res["checkpoint"], "onnx", "int8", out=tmp_path / "onnx-int8", progress=False)
    m = onnx.load(str(art / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    consts = {}
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    vals = {**inits, **consts}
    onnx_scales = [float(vals[n.input[1]]) for n in m.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[1] in vals and vals[n.input[1]].size == 1]
    learned = list(res["observer_scales"].values())
    assert onnx_scales
    assert any(abs(s - l) <= 1e-6 * l for s in onnx_scales for l in learned)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quantization"]["format"] == "edgeseg-qat/2" and manifest["quantization"]["fake_quant_count"]
    assert manifest["proof"]["argmax_agreement"] > 0.5


def test_max_miou_drop_unrunnable_target_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """--max-miou-drop needs an mIoU of the int8 artifact: for Core ML on Linux the CLI must say so at once (exit 2,
    one line), before loading, training or writing anything."""
    import sys

    import edgeseg.train.qat as qat_mod
    from edgeseg.cli import main

    def no_training(*a, **k):
        raise AssertionError("qat() ran although the budget cannot be checked for coreml here")

    monkeypatch.setattr(qat_mod, "qat", no_training)
    monkeypatch.setattr(sys, "platform", "linux")
    ckpt, data, out = tmp_path / "ckpt", tmp_path / "data", tmp_path / "out"
    rc = main(["qat", "--checkpoint", str(ckpt), "--target", "coreml", "--data", str(data), "--out", str(out),
               "--iters", "1", "--max-miou-drop", "0.01"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeseg: error: --max-miou-drop"), err
    assert "macOS" in err and "--keep-float" in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_qat_runs_to_the_end_and_writes_its_table_and_json(tiny_ckpt_nobn, tiny_camvid, tmp_path, capsys):
    """`edgeseg qat` end to end (the CLI's own path: TrainConfig + QatOptions): exit 0, the summary table, the
    JSON record, and the checkpoint it names."""
    from edgeseg.cli import main

    out, rec = tmp_path / "run", tmp_path / "qat.json"
    rc = main(["qat", "--checkpoint", str(tiny_ckpt_nobn), "--target", "onnx", "--data", str(tiny_camvid),
               "--out", str(out), "--iters", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu",
               "--json", str(rec)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    table = dict(line.split(None, 1) for line in captured.out.splitlines() if line.startswith(("checkpoint ", "target ")))
    assert table["target"].strip() == "onnx" and table["checkpoint"].strip() == str(out / "checkpoint")
    r = json.loads(rec.read_text())
    assert r["fit"]["step"] == 2 and r["target"] == "onnx" and Path(r["params"]).is_file()
    assert json.loads((out / "checkpoint" / "model.json").read_text())["quant"]["target"] == "onnx"


def test_qat_takes_a_train_config_and_refuses_unknown_keywords(tiny_ckpt_nobn, tiny_camvid, tmp_path):
    from edgeseg.train.qat import QatOptions, qat, qat_train_config

    cfg = qat_train_config(iters=1, batch_size=2, progress=False)
    assert cfg.lr == 1e-5 and cfg.warmup_iters == 0 and cfg.channels_last is False
    with pytest.raises(TypeError, match="bogus"):
        qat(tiny_ckpt_nobn, "onnx", tiny_camvid, tmp_path / "x", config=cfg, bogus=1)
    assert not (tmp_path / "x").exists()
    res = qat(tiny_ckpt_nobn, "onnx", tiny_camvid, tmp_path / "run", config=cfg,
              options=QatOptions(freeze_ranges=True), val_interval=1)
    quant = json.loads((Path(res["checkpoint"]) / "model.json").read_text())["quant"]
    assert res["fit"]["step"] == 1 and quant["activation_ranges"] == "fixed after initialisation"


def _qat_tiny_run(tiny_ckpt, tiny_camvid, out, target, iters=2):
    from edgeseg.train.qat import qat

    return qat(tiny_ckpt, target, tiny_camvid, out, iters=iters, batch_size=2, lr=1e-3, val_interval=iters,
               progress=False, scale_range=(1.0, 1.0), photometric=False)


def test_openvino_artifact_carries_learned_scales(tiny_ckpt_nobn, tiny_camvid, tmp_path):
    """OpenVINO QAT (OpenVINOQuantizer placement, fake-quantized in training) -> IR without NNCF PTQ: the
    FakeQuantize ranges are the learned scales and the IR agrees with the fake-quant eager graph."""
    import openvino as ov

    from edgeseg.export import export_checkpoint
    from edgeseg.train.qat import load_qat_program, program_scales

    res = _qat_tiny_run(tiny_ckpt_nobn, tiny_camvid, tmp_path / "run", "openvino")
    learned = list(res["observer_scales"].values())
    assert learned  # fake-quant modules (not bare observers) trained
    gm, _ = load_qat_program(res["checkpoint"])
    assert sorted(set(program_scales(gm))) == sorted(set(learned))
    # strict f32 float parts: the comparison is of the int8 arithmetic (bf16 float parts: 98.7 % measured here)
    art = export_checkpoint(res["checkpoint"], "openvino", "int8", out=tmp_path / "ov-int8", progress=False,
                            inference_precision="f32")
    m = json.loads((art / "manifest.json").read_text())
    assert m["quantization"]["format"] == "edgeseg-qat/2" and m["calibration"] is None
    assert "NNCF post-training" not in m["quantization"]["scheme"]
    assert m["proof"]["argmax_agreement"] >= 0.999, m["proof"]  # IR vs the fake-quant eager graph
    ir = ov.Core().read_model(str(art / "model.xml"))
    ir_scales = []
    for op in ir.get_ops():
        if op.get_type_name() == "FakeQuantize":
            lo, hi = (op.input_value(i).get_node().get_data() for i in (1, 2))
            ir_scales.append(float((hi - lo).ravel()[0]) / (int(op.get_attributes()["levels"]) - 1))
    assert len(ir_scales) == len(learned)
    assert all(any(abs(s - l) <= 1e-5 * l for l in learned) for s in ir_scales), (ir_scales, learned)
    assert m["inspection"]["constant_dtypes"].get("i8")  # int8 weights


def test_jetson_artifact_is_symmetric_qdq_from_qat(tiny_ckpt_nobn, tiny_camvid, tmp_path):
    import onnx

    from edgeseg.export import export_checkpoint
    from edgeseg.targets.tensorrt.exporter import asymmetric_quantize_nodes

    res = _qat_tiny_run(tiny_ckpt_nobn, tiny_camvid, tmp_path / "run", "jetson-tensorrt")
    art = export_checkpoint(res["checkpoint"], "jetson-tensorrt", "int8", out=tmp_path / "trt", progress=False)
    m = json.loads((art / "manifest.json").read_text())
    assert m["quantization"]["quantizer"] == "xnnpack-symmetric" and m["calibration"] is None
    hist = m["inspection"]["op_histogram"]
    assert hist.get("QuantizeLinear") and hist.get("DequantizeLinear"), hist
    assert asymmetric_quantize_nodes(art / "model.onnx") == []
    assert m["inspection"]["onnxruntime_check"]["argmax_agreement"] > 0.9
    onnx.checker.check_model(str(art / "model.onnx"))
    # its graph (int8 constants behind lone dequantize ops) is refused for openvino, before any export
    from edgeseg.errors import UsageError
    with pytest.raises(UsageError, match="jetson-tensorrt"):
        export_checkpoint(res["checkpoint"], "openvino", "int8", out=tmp_path / "no", progress=False)


@pytest.mark.slow
def test_openvino_qat_with_batchnorm(tiny_ckpt, tiny_camvid, tmp_path):
    """conv+BN under OpenVINOQuantizer QAT (torchao's conv-BN fusion needs the explicit None input entry; minutes:
    the fusion's pattern tracing): the IR still matches the fake-quant graph."""
    from edgeseg.export import export_checkpoint

    res = _qat_tiny_run(tiny_ckpt, tiny_camvid, tmp_path / "run", "openvino")
    # strict f32 float parts: the comparison is of the int8 arithmetic (bf16 float parts measured 98.7 % here)
    art = export_checkpoint(res["checkpoint"], "openvino", "int8", out=tmp_path / "ov", progress=False,
                            inference_precision="f32")
    m = json.loads((art / "manifest.json").read_text())
    assert m["inspection"]["op_histogram"].get("FakeQuantize") == len(res["observer_scales"])
    assert m["proof"]["argmax_agreement"] >= 0.999, m["proof"]


@pytest.mark.slow
def test_coreml_program_from_qat_has_quantized_ops(tiny_ckpt_nobn, tiny_camvid, tmp_path):
    """Core ML QAT (CoreMLQuantizer; minutes: its pattern matching) -> ct.convert of the converted graph: the
    program holds activation quantize/dequantize ops and int8 weights (Core ML cannot run on Linux)."""
    from edgeseg.export import export_checkpoint

    res = _qat_tiny_run(tiny_ckpt_nobn, tiny_camvid, tmp_path / "run", "coreml", iters=1)
    art = export_checkpoint(res["checkpoint"], "coreml", "int8", out=tmp_path / "cm", progress=False)
    m = json.loads((art / "manifest.json").read_text())
    q = m["inspection"]["quantized_ops"]
    assert q.get("quantize") and q.get("dequantize") and q.get("constexpr_affine_dequantize"), q
    assert any("INT8" in k for k in m["inspection"]["weight_dtypes"]), m["inspection"]["weight_dtypes"]
    assert m["quantization"]["format"] == "edgeseg-qat/2" and m["calibration"] is None


def test_checkpoint_with_shared_tensors_saves_and_loads(tmp_path):
    """A prepared QAT graph shares observer modules between names (concat/add inputs of the SegNeXt head):
    safetensors refused to save it ("Some tensors share memory") at the end of a real `edgeseg qat` run."""
    from safetensors.torch import load_file

    from edgeseg.checkpoint import WEIGHTS, save_checkpoint
    from edgeseg.types import ModelSpec

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.obs_a = nn.Linear(3, 3)
            self.obs_b = self.obs_a  # one module under two names, as PT2E's shared observers are

    m = Shared()
    spec = ModelSpec(model="shared", num_classes=2, class_names=("a", "b"), palette=((0, 0, 0), (1, 1, 1)),
                     ignore_index=255, input_hw=(32, 32))
    save_checkpoint(tmp_path / "ck", m, spec)
    sd = load_file(str(tmp_path / "ck" / WEIGHTS))
    assert set(sd) == set(m.state_dict())
    assert torch.equal(sd["obs_a.weight"], sd["obs_b.weight"])
    fresh = Shared()
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh.obs_a.weight, m.obs_a.weight)


def test_onnx_qat_uses_7bit_weights_like_its_ptq():
    """ONNX Runtime's int8 kernels saturate with full-range weights on AVX2 without VNNI; the onnx exporter's PTQ
    uses reduce_range, and QAT for onnx must train with the same 7-bit weight range (executorch keeps 8 bits)."""
    pytest.importorskip("executorch")
    from edgeseg.train.qat import QAT_TARGETS, check_export_target, target_quantizer

    for target in QAT_TARGETS:  # every QAT scheme exports at least to the target it was trained for
        check_export_target({"target": target}, target, "ckpt")
    onnx_w = target_quantizer("onnx").global_config.weight
    et_w = target_quantizer("executorch-xnnpack").global_config.weight
    assert (onnx_w.quant_min, onnx_w.quant_max) == (-64, 63)
    assert et_w.quant_max == 127


def test_init_observers_sets_the_mean_range_and_restores_the_constants():
    """Activation ranges start at the mean of the per-input min/max (a PTQ-like calibration), not at the first
    batch's range moved 1 % per step (offseg_t's uncalibrated 20-step QAT lost 0.9 mIoU on CamVid val)."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    from edgeseg.quant.policy import FloatPolicy
    from edgeseg.train.qat import init_observers, prepare_qat

    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 1, bias=False)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    prepared = prepare_qat(Lin(), "executorch-xnnpack", (4, 4), FloatPolicy({}), freeze_bn=False)
    inputs = [(v * torch.linspace(0, 1, 16).view(1, 1, 4, 4)).expand(1, 3, 4, 4) for v in (1.0, 3.0, 8.0)]
    fqs = [m for m in prepared.modules() if isinstance(m, FakeQuantizeBase)]
    consts = [m.activation_post_process.averaging_constant for m in fqs]
    prepared.train()
    assert init_observers(prepared, inputs) == len(fqs)
    assert prepared.training  # the mode it was in
    assert [m.activation_post_process.averaging_constant for m in fqs] == consts
    # the input observer saw ranges [0, 1], [0, 3], [0, 8]: its max is their mean, 4 (a plain moving average from
    # the first input would give 1 + 0.01 * (3 - 1) + ... ~ 1.1)
    maxes = sorted(float(m.activation_post_process.max_val) for m in fqs
                   if m.activation_post_process.max_val.numel() == 1)
    assert any(abs(v - 4.0) < 1e-5 for v in maxes), maxes
    # --freeze-ranges: a wider training batch no longer moves the activation ranges; the weight's observer still runs
    from edgeseg.train.qat import freeze_activation_ranges

    assert freeze_activation_ranges(prepared) >= 1
    before = {id(m): float(m.activation_post_process.max_val.max()) for m in fqs}
    prepared(torch.full((2, 3, 4, 4), 50.0))
    assert all(float(m.activation_post_process.max_val.max()) == before[id(m)] for m in fqs)
    assert sum(int(m.observer_enabled) for m in fqs) == 1  # the weight's (ranges follow the trained weights)


def test_eval_mode_freezes_ranges_and_computes_what_convert_freezes():
    """Validation of the fake-quant graph must not move the activation ranges (it did: torchao's eval switch leaves
    observers on, offseg_t's ONNX QAT validated at 45.75 mIoU while its converted program scored 45.32), and in
    eval mode the fake-quant graph must compute what the converted int8 program computes."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    from edgeseg.quant.policy import FloatPolicy
    from edgeseg.train.qat import convert_qat, init_observers, prepare_qat

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    prepared = prepare_qat(Net(), "onnx", (8, 8), FloatPolicy({}), freeze_bn=False)
    init_observers(prepared, [torch.randn(1, 3, 8, 8) for _ in range(4)])
    fqs = [m for m in prepared.modules() if isinstance(m, FakeQuantizeBase)]
    ranges = lambda: [(m.activation_post_process.min_val.clone(), m.activation_post_process.max_val.clone())
                      for m in fqs]
    before = ranges()
    prepared.eval()
    x = 5 * torch.randn(2, 3, 8, 8)  # far wider than the calibration inputs
    with torch.no_grad():
        fake = prepared(x)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(before, ranges()))
    converted = convert_qat(prepared, (8, 8)).module()
    assert torch.allclose(fake, converted(x), atol=1e-5)
    prepared.train()  # training observes again
    prepared(x)
    assert any(not torch.equal(b, d) for (_, b), (_, d) in zip(before, ranges()))


def test_qat_calibration_set_defaults_to_train_and_refuses_val(tiny_camvid, tmp_path):
    from edgeseg.errors import DataError
    from edgeseg.quant.calibration import calibration_for_training

    cal = calibration_for_training(None, tiny_camvid, (32, 32), (0, 0, 0), (1, 1, 1))
    assert len(cal) == 8 and all("/train/" in f.replace("\\", "/") for f in cal.files)
    recipe = tmp_path / "val-4.toml"
    recipe.write_text('name = "val-4"\nsource = "data"\nsplit = "val"\ncount = 4\nselection = "random"\n'
                      'seed = 0\nmin_count = 1\n')
    with pytest.raises(DataError, match="are in the evaluation split"):
        calibration_for_training(str(recipe), tiny_camvid, (32, 32), (0, 0, 0), (1, 1, 1))


def test_qat_run_records_its_range_init(qat_run):
    from edgeseg.checkpoint import load_spec

    res, _ = qat_run
    init = load_spec(res["checkpoint"]).quant["range_init"]
    assert init["split"] == "train" and init["count"] == 8 and len(init["files"]) == 8


class _PadThenFloat(nn.Module):  # the CARAFE pattern: pad, flatten, shifted slices times a float mask
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        p = F.pad(y, (1, 1, 1, 2)).reshape(n, c, -1)
        return (p[:, :, :h * w] * self.b(y).reshape(n, c, -1) + p[:, :, 1:h * w + 1]).reshape(n, c, h, w)


def _float_output_pads(gm) -> list:
    """Zero pads of a dequantized tensor whose output is not re-quantized (what XNNPACK refuses)."""
    return [n for n in gm.graph.nodes if "pad" in str(n.target) and "dequantize" in str(n.args[0].target)
            and not all("quantize_per_tensor" in str(u.target) for u in n.users)]


def test_executorch_qat_zero_pad_of_a_dequantized_tensor_loads_and_matches(tmp_path):
    """offseg_t's ExecuTorch QAT .pte was refused at load: FreqFusion zero-pads a dequantized tensor whose pad
    output stays float, XNNPACK's partitioner still takes the pad as quantized ("Failed to create
    StaticConstantPad node ... xnn_status_invalid_parameter"). The ExecuTorch exporter re-quantizes such pads
    (exactly) in the QAT program it is given; the program itself stays target-neutral."""
    pytest.importorskip("executorch.runtime")
    from executorch.runtime import Runtime
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    from edgeseg.export.base import ExportJob, ExportWrapper
    from edgeseg.quant.policy import FloatPolicy
    from edgeseg.targets.executorch.exporter import ExecutorchExporter
    from edgeseg.train.qat import convert_qat, init_observers, prepare_qat

    torch.manual_seed(0)
    prepared = prepare_qat(_PadThenFloat(), "executorch-xnnpack", (8, 8), FloatPolicy({}))
    init_observers(prepared, [torch.randn(1, 3, 8, 8) for _ in range(4)])
    program = convert_qat(prepared, (8, 8)).module()
    allow_exported_model_train_eval(program)  # as load_qat_program does
    assert _float_output_pads(program)  # what XNNPACK refuses, left to the exporter
    wrapper = ExportWrapper(program, (8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).eval()
    exporter = ExecutorchExporter()
    job = ExportJob(model=wrapper, spec=None, precision="int8", input_hw=(8, 8), out_dir=tmp_path,
                    options=exporter.Options(), qat={"target": "executorch-xnnpack"})
    result = exporter.export(job)
    assert not _float_output_pads(program)
    pte = (tmp_path / result.files[0]).read_bytes()  # kept alive: the loaded program reads from it
    method = Runtime.get().load_program(pte).load_method("forward")  # raised before the fix
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(method.execute([x])[0], wrapper(x), atol=1e-5)


def test_executorch_exporter_requantizes_zero_pads_of_an_older_qat_program(tmp_path):
    """A QAT program converted before convert_qat re-quantized such pads: the ExecuTorch exporter runs the pass
    on the QAT graph it is given, so the .pte still loads and matches the graph."""
    pytest.importorskip("executorch.runtime")
    from executorch.runtime import Runtime
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from edgeseg.export.base import ExportJob, ExportWrapper
    from edgeseg.targets.executorch.exporter import ExecutorchExporter

    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    exporter = ExecutorchExporter()
    prepared = prepare_pt2e(torch.export.export(_PadThenFloat().eval(), (x,)).module(), exporter.quantizer())
    for _ in range(4):
        prepared(torch.randn(1, 3, 8, 8))
    old_program = convert_pt2e(prepared)  # as QAT's convert wrote it before the pass
    assert _float_output_pads(old_program)
    allow_exported_model_train_eval(old_program)  # as load_qat_program does
    wrapper = ExportWrapper(old_program, (8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).eval()
    job = ExportJob(model=wrapper, spec=None, precision="int8", input_hw=(8, 8), out_dir=tmp_path,
                    options=exporter.Options(), qat={"target": "executorch-xnnpack"})
    result = exporter.export(job)
    assert not _float_output_pads(old_program)
    pte = (tmp_path / result.files[0]).read_bytes()  # kept alive: the loaded program reads from it
    program = Runtime.get().load_program(pte)
    method = program.load_method("forward")
    assert torch.allclose(method.execute([x])[0], wrapper(x), atol=1e-5)


def test_executorch_qat_shared_conv_weight_is_quantized_per_use_and_runs():
    """offseg_t's ExecuTorch QAT .pte (after the zero-pad fix) failed at its first run ("Propagating input shapes
    failed"): FreqFusion's content encoders run on two inputs, the XNNPACK quantizer left the second conv float
    behind a dequantized input. prepare_qat gives each extra use a clone of the one trained parameter (gradients
    still reach it), convert_qat freezes the clone as an int8 constant."""
    pytest.importorskip("executorch.runtime")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from edgeseg.targets.executorch.exporter import delegate_friendly_decompositions
    from edgeseg.quant.policy import FloatPolicy
    from edgeseg.train.qat import convert_qat, init_observers, prepare_qat

    class SharedEncoder(nn.Module):  # FreqFusion's content_encoder on the hr and the lr features
        def __init__(self):
            super().__init__()
            self.hr, self.lr = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.encoder = nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            return self.encoder(self.hr(x)) + self.encoder(self.lr(x) * 2)

    torch.manual_seed(0)
    prepared = prepare_qat(SharedEncoder(), "executorch-xnnpack", (8, 8), FloatPolicy({}), freeze_bn=False)
    assert sum(1 for p in prepared.parameters()) == 6  # still one encoder weight to train
    prepared(torch.randn(2, 3, 8, 8)).sum().backward()
    assert prepared.encoder.weight.grad is not None
    init_observers(prepared, [torch.randn(1, 3, 8, 8) for _ in range(4)])
    ep = convert_qat(prepared, (8, 8))
    convs = [n for n in ep.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 4 and all("dequantize" in str(n.args[1].target) for n in convs), "a conv kept fp32 weights"
    x = torch.randn(1, 3, 8, 8)
    gm = ep.module()
    prog = to_edge_transform_and_lower(delegate_friendly_decompositions(torch.export.export(gm, (x,))),
                                       partitioner=[XnnpackPartitioner()]).to_executorch()
    got = Runtime.get().load_program(prog.buffer).load_method("forward").execute([x])[0]  # raised before the fix
    want = gm(x)
    assert (got - want).abs().max() <= 3 * want.abs().max() / 127


def test_qat_trains_the_export_form_the_target_lowers(tiny_camvid, tmp_path):
    """QAT prepares the model in its target's export form (the profile's [export_form], as PTQ exports it): for
    ExecuTorch, FreqFusion's sampler as row gathers (no grid_sampler on XNNPACK's one-thread portable kernel), whose
    coordinate arithmetic the float policy keeps float; the form is recorded and rebuilt on export."""
    from edgeseg.models import create_model, prepare_for_export
    from edgeseg.quant.policy import float_policy
    from edgeseg.targets import load_profile
    from edgeseg.train.qat import prepare_qat

    forms = dict(load_profile("executorch-xnnpack").export_form)
    assert forms == {"carafe": "gather", "sampler": "gather"}, forms
    model = create_model("test_offseg", num_classes=5)
    prepare_for_export(model, (64, 96), **forms)
    policy = float_policy(model)
    gathers = [n for n in policy.names if n.endswith("bilinear_gather")]
    assert len(gathers) == 3, policy.names
    ops = [str(n.target) for n in prepare_qat(model, "executorch-xnnpack", (64, 96), policy).graph.nodes
           if n.op == "call_function"]
    # row lookups: the sampler's 4 per fusion and CARAFE's im2col, 5 calls per fusion; no one-hot im2col conv
    assert not any("grid_sampler" in o for o in ops) and sum("embedding" in o for o in ops) == 3 * (4 + 5)
