"""bench/peer_models.py (torchvision's mobile segmentation peers written from their papers) against torchvision's
model cards, and bench/peers.py end to end on a tiny configuration."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import peer_models
import peers

from edgeseg.models import create_model, list_models, register_model
from edgeseg.models.flops import count_registered

# the FCN aux head of torchvision's released DeepLabV3 weights: 3x3 conv 40->10 (no bias), BN(10), 1x1 conv 10->21
AUX_PARAMS_21 = 40 * 10 * 9 + 2 * 10 + 10 * 21 + 21


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_param_counts_equal_torchvision_model_cards():
    with torch.device("meta"):
        lraspp = create_model("lraspp_mobilenet_v3_large", num_classes=21)
        dl_aux = create_model("deeplabv3_mobilenet_v3_large", num_classes=21, aux=True)
        dl = create_model("deeplabv3_mobilenet_v3_large", num_classes=21)
    # torchvision weights meta "num_params" (LRASPP_MobileNet_V3_Large_Weights / DeepLabV3_MobileNet_V3_Large_Weights
    # .COCO_WITH_VOC_LABELS_V1); the DeepLabV3 card counts its released weights, which carry the aux head
    assert _params(lraspp) == peer_models.CARD_PARAMS["lraspp_mobilenet_v3_large"] == 3_221_538
    assert _params(dl_aux) == peer_models.CARD_PARAMS["deeplabv3_mobilenet_v3_large"] == 11_029_328
    assert _params(dl) == 11_029_328 - AUX_PARAMS_21 == 11_025_477
    # the backbone: the mobilenet_v3_large card (5,483,032) less its classifier (960*1280+1280 + 1280*1000+1000)
    assert _params(lraspp.backbone) == _params(dl.backbone) == 2_971_952


def test_macs_equal_torchvision_card_ops_at_520():
    """The cards' `_ops` (GMAC at 520x520): LR-ASPP 2.086, DeepLabV3 10.452 (with the aux head, which
    torchvision's forward always runs). edgeseg.models.flops counts the peers' convolutions."""
    lr = count_registered("lraspp_mobilenet_v3_large", 21, [(520, 520)])[0]
    dl = count_registered("deeplabv3_mobilenet_v3_large", 21, [(520, 520)])[0]
    assert round(lr["gmac_total"], 3) == 2.086 and lr["gmac_matmul"] == 0
    with torch.device("meta"):
        aux = create_model("deeplabv3_mobilenet_v3_large", num_classes=21, aux=True).aux_classifier.eval()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as c, torch.no_grad():
        aux(torch.zeros(1, 40, 65, 65, device="meta"))  # stride-8 features of a 520x520 input
    assert round(dl["gmac_total"] + c.get_total_flops() / 2e9, 3) == 10.452


@pytest.mark.parametrize("name,stride", [("lraspp_mobilenet_v3_large", 8), ("deeplabv3_mobilenet_v3_large", 16)])
def test_forward_shapes_at_64(name, stride):
    m = create_model(name, num_classes=21).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        up = create_model(name, num_classes=21, upsample=True).eval()(x)
    assert m.output_stride == stride and y.shape == (1, 21, 64 // stride, 64 // stride)
    assert torch.isfinite(y).all() and y.std() > 0
    assert up.shape == (1, 21, 64, 64)


def test_yolo26n_sem_peer_is_ultralytics_or_a_one_line_install_hint(tmp_path, monkeypatch):
    """yolo26n_sem is built from ultralytics' own YAML where ultralytics imports (installed for the benchmark only,
    never an edgeseg dependency); elsewhere building it names the install command, the default model list leaves
    it out, and a named --ultralytics-site that does not exist is a usage error."""
    from edgeseg.errors import UsageError

    assert "yolo26n_sem" in peer_models.PEERS and "yolo26n_sem" in list_models()
    if peer_models.ultralytics_available():
        m = create_model("yolo26n_sem", num_classes=11).eval()
        with torch.no_grad():
            y = m(torch.zeros(1, 3, 64, 96))
        assert m.output_stride == 8 and y.shape == (1, 11, 8, 12)
        assert 1_500_000 < _params(m) < 1_800_000  # 1.63 M at 11 classes (Ultralytics: 1.6 M)
    else:
        with pytest.raises(ImportError, match="pip install --no-deps --target .bench-site ultralytics==8.4.190"):
            create_model("yolo26n_sem", num_classes=11)
        args = peers.build_parser().parse_args(["--out", str(tmp_path / "o"), "--ultralytics-site", ""])
        peers._check_args(args)
        assert "yolo26n_sem" not in args.models and "offseg_t" in args.models
    monkeypatch.setenv("PYTHONPATH", "")
    args = peers.build_parser().parse_args(["--out", str(tmp_path / "o"), "--ultralytics-site", str(tmp_path / "x")])
    with pytest.raises(UsageError, match="--ultralytics-site"):
        peers._check_args(args)


def test_deeplab_aux_head_only_in_training():
    m = create_model("deeplabv3_mobilenet_v3_large", num_classes=5, aux=True)
    out, aux = m.train()(torch.randn(2, 3, 64, 64))  # batch 2: BN statistics over the 1x1 image-pool branch
    assert out.shape == (2, 5, 4, 4) and aux.shape == (2, 5, 8, 8)
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5, 4, 4)


def test_mobilenet_v3_large_shapes_and_strides():
    bb = peer_models.MobileNetV3Large(dilated=True).eval()
    with torch.no_grad():
        low, high = bb(torch.randn(1, 3, 128, 160))
    assert low.shape == (1, 40, 16, 20) and high.shape == (1, 960, 8, 10)
    with torch.no_grad():
        _, high32 = peer_models.MobileNetV3Large(dilated=False).eval()(torch.randn(1, 3, 128, 160))
    assert high32.shape == (1, 960, 4, 5)
    assert [peer_models.make_divisible(c // 4) for c in (72, 120, 480, 672, 960)] == [24, 32, 120, 168, 240]


def test_ratios_use_the_fastest_peer_on_the_same_runtime():
    def row(model, role, target, p50, p90, status="ok"):
        return {"model": model, "role": role, "target": target, "precision": "fp32", "status": status,
                "p50_ms": p50, "p90_ms": p90, "gmac": 1.0}

    rows = [row("a", "peer", "onnx", 10.0, 12.0), row("b", "peer", "onnx", 5.0, 8.0),
            row("b", "peer", "openvino", 4.0, 4.0), row("ours", "ours", "onnx", 4.0, 6.0),
            row("ours", "ours", "openvino", 8.0, 9.0), row("a", "peer", "openvino", 1.0, 1.0, status="FAILED")]
    ratios = peers.add_ratios(rows)
    onnx, ov = ratios
    assert onnx["best_peer"] == "b" and onnx["ratio_p50_vs_best_peer"] == pytest.approx(0.8)
    assert onnx["ratio_p90_vs_best_peer"] == pytest.approx(0.75)
    assert onnx["ratio_p50_vs_peer"] == pytest.approx({"a": 0.4, "b": 0.8})
    assert ov["best_peer"] == "b" and ov["ratio_p50_vs_best_peer"] == pytest.approx(2.0)  # the FAILED peer is out
    assert rows[3]["ratio_p50_vs_best_peer"] == pytest.approx(0.8)


UNEXPORTABLE = "peers_test_unexportable"


def _register_unexportable():
    # registered in this process only: the export child cannot build it, so its export fails there
    if UNEXPORTABLE not in list_models():
        def peers_test_unexportable(num_classes: int) -> nn.Module:
            """A model only the test process knows (its export child cannot build it)."""
            return nn.Conv2d(3, num_classes, 1)

        register_model(peers_test_unexportable)


def test_main_tiny_run_writes_rows_ratios_and_records_failures(tmp_path, capsys):
    _register_unexportable()
    out = tmp_path / "peers"
    argv = ["--input-size", "64x64", "--runs", "2", "--warmup", "0", "--threads", "1", "--targets", "onnx",
            "--precisions", "fp32,fp16", "--models", f"lraspp_mobilenet_v3_large,test_offseg,{UNEXPORTABLE}",
            "--weights", "random", "--calib-count", "1", "--out", str(out), "--no-progress"]
    rc = peers.main(argv)
    assert rc == 1  # the unexportable model's row failed; the others ran
    res = json.loads((out / "peers.json").read_text())
    rows = {(r["model"], r["precision"]): r for r in res["rows"]}
    assert set(rows) == {(m, p) for m in ("lraspp_mobilenet_v3_large", "test_offseg", UNEXPORTABLE)
                         for p in ("fp32", "fp16")}
    peer, ours, bad = (rows[(m, "fp32")] for m in ("lraspp_mobilenet_v3_large", "test_offseg", UNEXPORTABLE))
    for r in (peer, ours):
        assert r["status"] == "ok" and r["target"] == "onnx" and r["latency_ms"]["n"] == 2
        assert 0 < r["p50_ms"] <= r["p90_ms"] and r["gmac"] > 0
    assert peer["role"] == "peer" and ours["role"] == "ours"
    assert ours["best_peer"] == "lraspp_mobilenet_v3_large"
    assert ours["ratio_p50_vs_best_peer"] == pytest.approx(ours["p50_ms"] / peer["p50_ms"])
    assert ours["ratio_p90_vs_best_peer"] == pytest.approx(ours["p90_ms"] / peer["p90_ms"])
    assert res["models"]["lraspp_mobilenet_v3_large"]["params"] == _params(
        create_model("lraspp_mobilenet_v3_large", num_classes=11))
    assert bad["status"] == "FAILED" and bad["stage"] == "export" and "\n" not in bad["error"]
    assert UNEXPORTABLE in bad["error"] and not bad["error"].startswith("ArtifactError")
    assert rows[("test_offseg", "fp16")]["status"] == "skipped"  # the onnx profile has no fp16
    [ratio] = [x for x in res["ratios"] if x["model"] == "test_offseg" and x["precision"] == "fp32"]
    assert ratio["ratio_p50_vs_best_peer"] == pytest.approx(ours["ratio_p50_vs_best_peer"])
    assert res["input_hw"] == [64, 64] and res["threads"] == 1 and res["cpu"]["model"] and res["cpu_summary"]
    assert (out / "peers.png").stat().st_size > 0 and (out / "logs" / "test_offseg-onnx-fp32.log").is_file()
    table = (out / "table.txt").read_text()
    assert "vs lraspp_mobilenet_v3_large" in table and "FAILED" in table and res["cpu_summary"] in table
    assert table in capsys.readouterr().out

    before = (out / "peers.json").read_bytes()
    assert peers.main(argv) == 2  # refuses to overwrite without --force
    assert (out / "peers.json").read_bytes() == before


def test_num_classes_gives_random_checkpoints_of_that_many_classes(tmp_path):
    """--num-classes 150 (the official ADE20K checkpoints' head): every model, the shipped ones included, gets a
    seeded random checkpoint with 150 classes; CamVid's 11 keeps the shipped checkpoint."""
    from edgeseg.checkpoint import load_spec

    ck, weights = peers.make_checkpoint("offseg_t", tmp_path, (64, 64), "shipped", num_classes=150)
    spec = load_spec(ck)
    assert weights.startswith("random") and spec.num_classes == 150 == len(spec.class_names) == len(spec.palette)
    assert len({tuple(c) for c in spec.palette}) > 100  # distinguishable colours
    _, weights = peers.make_checkpoint("offseg_t", tmp_path / "b", (64, 64), "shipped", num_classes=11)
    assert weights.startswith("shipped")
    with pytest.raises(Exception, match="--num-classes"):
        peers.run(peers.build_parser().parse_args(["--num-classes", "1", "--out", str(tmp_path / "x")]))
