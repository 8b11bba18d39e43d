"""The CPU training recipe's options, each on a tiny model and synthetic CamVid-layout data: bf16 autocast +
channels_last chosen from the CPU flags (both branches, forced with EDGESEG_CPU_FLAGS), --threads, ENet class
weights from a known histogram (cached), OHEM's kept fraction, the weight EMA that validation and the checkpoints
use, distillation from a teacher checkpoint, several training splits joined with '+' (never overlapping
val/holdout), native-resolution crops padded with ignore, and --max-minutes with an exact --resume."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_train import FAST, TINY, _weights, make_camvid

from edgeseg.errors import UsageError
from edgeseg.models.registry import list_models, register_model
from edgeseg.train.state import load_state

PROBE = "_recipe_probe"
SEEN: list[dict] = []  # what the probe model saw in training forwards


class _Probe(nn.Module):
    """A stride-4 conv model that records, in training mode, whether it runs under CPU autocast and in which
    memory layout its input and weights are."""

    output_stride = 4

    def __init__(self, num_classes: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.decode_head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        f = self.backbone(x)
        if self.training:
            w = self.backbone[0].weight
            SEEN.append({"autocast": torch.is_autocast_enabled("cpu"), "dtype": f.dtype,
                         "x_cl": x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                         "w_cl": w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()})
        return self.decode_head(f)


if PROBE not in list_models():
    @register_model
    def _recipe_probe(num_classes: int, **kw) -> nn.Module:
        """Records autocast / channels_last in training forwards (tests only)."""
        return _Probe(num_classes)


@pytest.fixture
def data(tmp_path) -> Path:
    """Synthetic CamVid: train (6), val (3) and a held-out sequence 0006R0 (3 pairs in train/)."""
    root = make_camvid(tmp_path / "camvid")
    other = make_camvid(tmp_path / "other", n_train=3, n_val=0, seed=5)
    for p in sorted((other / "train").iterdir()):
        shutil.copy(p, root / "train" / f"0006R0_{p.name}")
        shutil.copy(other / "trainannot" / p.name, root / "trainannot" / f"0006R0_{p.name}")
    return root


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- precision

def test_precision_chosen_from_cpu_flags(monkeypatch):
    from edgeseg.cpu import FORCE_ENV
    from edgeseg.train.precision import resolve

    monkeypatch.setenv(FORCE_ENV, "avx2,avx512f")
    p = resolve("auto", "cpu")
    assert (p.name, p.channels_last) == ("fp32", False) and "no avx512_bf16/amx_bf16" in p.reason
    monkeypatch.setenv(FORCE_ENV, "avx2,avx512_bf16")
    p = resolve("auto", "cpu")
    assert (p.name, p.channels_last) == ("bf16", True) and p.reason.startswith("auto: avx512_bf16")
    assert resolve("fp32", "cpu").name == "fp32" and resolve("auto", "cuda").name == "bf16"
    assert resolve("auto", "cpu", channels_last=False).channels_last is False  # QAT's explicit choice wins
    assert resolve(None, "cpu").name == "fp32" and resolve(None, "cuda").channels_last  # fit's old default
    with pytest.raises(UsageError, match="--precision"):
        resolve("fp16", "cpu")


@pytest.mark.parametrize("flags,want", [("avx2,avx512f", "fp32"), ("avx2,avx512_bf16,amx_bf16", "bf16")])
def test_precision_branch_runs_and_is_recorded(data, tmp_path, monkeypatch, flags, want):
    """Whichever branch this CPU takes, both run: bf16 under CPU autocast with channels_last input and weights,
    fp32 without; the choice, the threads and the CPU are in log.jsonl and model.json."""
    from edgeseg.checkpoint import load_spec
    from edgeseg.cpu import FORCE_ENV
    from edgeseg.train.loop import fit

    monkeypatch.setenv(FORCE_ENV, flags)
    SEEN.clear()
    out = tmp_path / want
    fit(PROBE, data, out_dir=out, iters=2, val_interval=2, precision="auto", threads=1, **FAST)
    assert torch.get_num_threads() == 1 and len(SEEN) == 2
    bf16 = want == "bf16"
    assert all(s["autocast"] == bf16 and s["x_cl"] == bf16 and s["w_cl"] == bf16 for s in SEEN), SEEN
    assert all(s["dtype"] == (torch.bfloat16 if bf16 else torch.float32) for s in SEEN)
    prov = load_spec(out / "best").provenance
    assert prov["precision"] == want and prov["channels_last"] == bf16 and prov["threads"] == 1
    assert "flags forced" in prov["precision_reason"] and prov["device"] == "cpu" and prov["device_name"]
    head = _log(out)[0]
    assert head["step"] == 0 and head["run"]["precision"] == want


# ----------------------------------------------------------------------------------------------- the loss

def test_enet_class_weights_from_a_known_histogram(tmp_path, monkeypatch):
    from edgeseg.data.classes import CAMVID_INFO
    from edgeseg.train import data as tdata
    from edgeseg.train.losses import enet_weights, seg_loss

    counts = [600, 300, 90, 0, 10] + [0] * 6  # 1000 labelled pixels; class 3 never seen
    flat = np.concatenate([np.full(n, k, np.uint8) for k, n in enumerate(counts)] + [np.full(200, 11, np.uint8)])
    labels = torch.from_numpy(np.random.default_rng(0).permutation(flat).reshape(3, 20, 20))
    w = tdata.class_weights("enet", tmp_path, labels, CAMVID_INFO, "train", progress=False)
    want = [1 / math.log(1.02 + n / 1000) for n in counts]
    assert w.tolist() == pytest.approx(want, rel=1e-6) and enet_weights(counts) == pytest.approx(want)
    assert w[3] == pytest.approx(1 / math.log(1.02)) and w[0] < w[1] < w[2] < w[4] < w[3]
    cached = json.loads((tmp_path / "class_weights.json").read_text())
    assert cached["counts"] == counts and cached["weights"] == pytest.approx(want) and cached["method"] == "enet"
    monkeypatch.setattr(tdata, "class_counts", lambda *a, **k: pytest.fail("recomputed despite the cache"))
    assert tdata.class_weights("enet", tmp_path, labels, CAMVID_INFO, "train", progress=False).tolist() == \
        pytest.approx(want)
    assert tdata.class_weights("none", tmp_path, labels, CAMVID_INFO, "train") is None
    # the loss weighs each labelled pixel by its class: sum w·l / sum w
    logits = torch.randn(3, 11, 20, 20)
    y = labels.long()
    got, _ = seg_loss(logits, y, 11, class_weight=w)
    ce = F.cross_entropy(logits, y.clamp(max=10), reduction="none")
    wp = w[y.clamp(max=10)] * (y != 11)
    assert float(got) == pytest.approx(float((ce * wp).sum() / wp.sum()), rel=1e-5)


def test_ohem_keeps_the_hard_pixels_and_at_least_the_minimum():
    from edgeseg.train.losses import Ohem, ohem_keep, seg_loss

    torch.manual_seed(0)
    y = torch.randint(0, 4, (2, 32, 32))
    y[:, :4] = 255  # 256 ignored of 2048: 1792 valid
    easy = F.one_hot(y.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 8  # p(class) ~ 0.999: loss << -ln 0.7
    easy = easy + 0.01 * torch.randn_like(easy)  # distinct losses, no ties
    pix = F.cross_entropy(easy, y.clamp(max=3), reduction="none")
    keep = ohem_keep(pix, y != 255, Ohem(0.7, 1 / 16))
    assert int(keep.sum()) == math.ceil(1792 / 16) and not keep[y == 255].any()
    assert float(pix[keep].min()) >= float(pix[(y != 255) & ~keep].max())  # the hardest ones
    hard = torch.zeros_like(easy)  # p = 1/4 everywhere: every valid pixel is above the threshold
    assert int(ohem_keep(F.cross_entropy(hard, y.clamp(max=3), reduction="none"), y != 255, Ohem()).sum()) == 1792
    # half easy, half hard: the hard half is kept (more than the minimum)
    mixed = torch.where(torch.arange(32)[None, None, :, None] < 16, easy, hard)
    pm = F.cross_entropy(mixed, y.clamp(max=3), reduction="none")
    km = ohem_keep(pm, y != 255, Ohem())
    assert int(km.sum()) == int(((y != 255) & (torch.arange(32)[None, :, None] >= 16)).sum())
    loss, _ = seg_loss(mixed, y, 255, ohem=Ohem())
    assert float(loss) == pytest.approx(float(pm[km].mean()), rel=1e-5)
    assert float(loss) > float(seg_loss(mixed, y, 255)[0])  # the easy pixels no longer dilute it


def test_class_weights_and_ohem_in_a_run(data, tmp_path):
    from edgeseg.checkpoint import load_spec
    from edgeseg.train.loop import fit

    out = tmp_path / "r"
    res = fit(TINY, data, out_dir=out, iters=3, val_interval=3, class_weights="enet", ohem=True, **FAST)
    cw = json.loads((out / "class_weights.json").read_text())
    assert sum(cw["counts"]) > 0 and cw["num_images"] == 6 and res["step"] == 3
    prov = load_spec(out / "last").provenance
    assert prov["class_weights"] == "enet" and prov["ohem"] == {"thresh": 0.7, "min_kept": 1 / 16}
    assert all(np.isfinite(r["loss"]) for r in _log(out) if "loss" in r)


# ----------------------------------------------------------------------------------------------- EMA

def test_ema_weights_are_validated_and_saved(data, tmp_path):
    from edgeseg.checkpoint import load_checkpoint, load_spec
    from edgeseg.data.datasets import open_dataset
    from edgeseg.eval.evaluate import evaluate, torch_predictor
    from edgeseg.train.ema import ModelEma, ema_decay
    from edgeseg.train.loop import fit

    assert ema_decay(0.999, 1) == pytest.approx(2 / 11) and ema_decay(0.999, 10**6) == 0.999
    m = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    ema = ModelEma(m, 0.5)
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[1].num_batches_tracked.fill_(7)
    old = float(ema.module[0].weight)
    d = ema.update(m, 100)
    assert d == 0.5 and float(ema.module[0].weight) == pytest.approx(0.5 * old + 0.5)
    assert int(ema.module[1].num_batches_tracked) == 7 and not ema.module[0].weight.requires_grad

    out = tmp_path / "ema"
    res = fit(TINY, data, out_dir=out, iters=6, val_interval=6, ema=0.9, **{**FAST, "lr": 5e-3})
    state = load_state(out / "train_state.safetensors")
    best, last = _weights(out / "best"), _weights(out / "last")
    assert set(best) == set(state["ema"])
    assert all(torch.equal(best[k], state["ema"][k]) and torch.equal(last[k], state["ema"][k]) for k in best)
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in best if "weight" in k)
    # what training reported is the score of the EMA weights that best/ holds
    model, spec = load_checkpoint(out / "best")
    got = evaluate(torch_predictor(model, "cpu"), open_dataset(data, "val"), spec.input_hw, spec.mean, spec.std,
                   progress=False)
    assert got["miou"] == pytest.approx(res["best"]["miou"], abs=1e-9)
    assert load_spec(out / "best").provenance["ema"] == 0.9


# ----------------------------------------------------------------------------------------------- distillation

def test_kd_loss():
    from edgeseg.train.losses import kd_loss

    torch.manual_seed(0)
    s = torch.randn(2, 5, 8, 8)
    assert float(kd_loss(s, s.clone(), 1.0)) == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(2, 5, 16, 16)  # the teacher at another stride: resized to the student's 8x8
    ref = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(F.interpolate(t, size=(8, 8), mode="bilinear",
                                                                      align_corners=False) / 2, 1),
                   reduction="none").sum(1).mean() * 4
    assert float(kd_loss(s, t, 2.0)) == pytest.approx(float(ref), rel=1e-5) and float(ref) > 0
    labels = torch.full((2, 32, 32), 255)
    labels[:, :16] = 1  # only the top half is labelled: the bottom half does not count
    s2 = s.clone()
    s2[:, :, 4:] = -s2[:, :, 4:]
    assert float(kd_loss(s2, s, 1.0, labels, 255)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_from_a_teacher_checkpoint(data, tmp_path):
    from edgeseg.checkpoint import load_spec
    from edgeseg.data.classes import CAMVID_INFO
    from edgeseg.train.distill import load_teacher
    from edgeseg.train.loop import fit

    first = fit(TINY, data, out_dir=tmp_path / "teacher", iters=3, val_interval=3, **FAST)
    t = load_teacher(first["checkpoint_last"], CAMVID_INFO, FAST.get("mean", (123.675, 116.28, 103.53)),
                     (58.395, 57.12, 57.375), torch.device("cpu"), False)
    assert not t.model.training and not any(p.requires_grad for p in t.model.parameters())
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    assert not t(x).requires_grad
    out = tmp_path / "student"
    fit(TINY, data, out_dir=out, iters=3, val_interval=3, teacher=first["checkpoint_last"], kd_temp=2.0,
        kd_weight=0.5, **{**FAST, "seed": 9})
    kd = [r["kd"] for r in _log(out) if "kd" in r]
    assert kd and all(v > 0 and np.isfinite(v) for v in kd)
    prov = load_spec(out / "last").provenance
    assert prov["teacher"] == first["checkpoint_last"] and (prov["kd_temp"], prov["kd_weight"]) == (2.0, 0.5)
    import _tiny

    other = _tiny.make_checkpoint(tmp_path / "four_classes")
    with pytest.raises(UsageError, match="--teacher .* 4 classes"):
        fit(TINY, data, out_dir=tmp_path / "bad", iters=1, teacher=other, **FAST)


# ----------------------------------------------------------------------------------------------- data

def test_several_training_splits_never_overlap_the_scored_ones(data, tmp_path, capsys):
    from edgeseg.checkpoint import load_spec
    from edgeseg.cli import main
    from edgeseg.train.loop import fit

    out = tmp_path / "tv"
    res = fit(TINY, data, out_dir=out, iters=2, val_interval=2, train_split="train+val", val_split=None,
              holdout_split="holdout", **FAST)
    prov = load_spec(out / "best").provenance
    assert prov["num_train"] == 9 and prov["train_split"] == "train+val"  # 6 train (holdout out) + 3 val
    assert res["best"] is None and res["best_holdout"]["num_images"] == 3
    with pytest.raises(UsageError, match="overlaps the validation split 'val'.*--val-split none"):
        fit(TINY, data, out_dir=tmp_path / "a", iters=1, train_split="train+val", **FAST)
    with pytest.raises(UsageError, match="overlaps the holdout split 'holdout' \\(3 shared"):
        fit(TINY, data, out_dir=tmp_path / "b", iters=1, train_split="train-all", holdout_split="holdout", **FAST)
    argv = ["train", "--model", TINY, "--data", str(data), "--iters", "1", "--batch-size", "2", "--crop", "32x64",
            "--input-size", "64x96", "--device", "cpu", "--no-progress", "--train-split", "train+val"]
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "overlaps the validation split 'val'" in err
    assert main(argv + ["--out", str(tmp_path / "d"), "--val-split", "none"]) == 0  # holdout: auto
    printed = capsys.readouterr().out
    assert "last holdout mIoU" in printed and "no validation split" not in printed


def test_native_resolution_crops_padded_with_ignore(data, tmp_path, monkeypatch):
    """Crops come from the labels' own resolution (no resize on load), scaled by --scale-range, and a crop bigger
    than the scaled image is padded with the ignore index."""
    from edgeseg.checkpoint import load_spec
    from edgeseg.cli import main
    from edgeseg.train import steps

    seen = []
    real = steps.gpu_augment

    def spy(images, labels, crop_hw, *a, **k):
        x, y = real(images, labels, crop_hw, *a, **k)
        seen.append((images.shape, labels.clone(), y.clone(), k["scale_range"]))
        return x, y

    monkeypatch.setattr(steps, "gpu_augment", spy)
    out = tmp_path / "crop"
    assert main(["train", "--model", TINY, "--data", str(data), "--iters", "2", "--batch-size", "2", "--crop",
                 "96x128", "--scale-range", "1", "1", "--input-size", "64x96", "--device", "cpu", "--out", str(out),
                 "--no-progress", "--holdout-split", "none"]) == 0
    assert len(seen) == 2
    for shape, lab_in, lab_out, sr in seen:
        assert tuple(shape[2:]) == (64, 96) and sr == (1.0, 1.0)  # the data's native 64x96
        assert lab_out.shape[1:] == (96, 128)
        for i in range(lab_in.shape[0]):
            got = lab_out[i]
            assert int((got[64:] != 11).sum()) == 0  # rows below the image: ignore
            inner = got[:64]
            inner = inner[:, :96] if torch.equal(inner[:, :96], lab_in[i].long()) else inner[:, 32:].flip(-1)
            assert torch.equal(inner, lab_in[i].long())  # scale 1: the labels pixel for pixel (flipped or not)
    assert load_spec(out / "last").provenance["scale_range"] == [1.0, 1.0]
    assert main(["train", "--model", TINY, "--data", str(data), "--scale-range", "2", "1",
                 "--out", str(tmp_path / "x")]) == 2


# ----------------------------------------------------------------------------------------------- chunks

def test_max_minutes_stops_and_resume_continues_exactly(data, tmp_path, monkeypatch, capsys):
    """Everything on (bf16, EMA, ENet weights, OHEM): a run stopped by --max-minutes after its first step and
    resumed reaches the weights, EMA weights and log of an uninterrupted run."""
    from edgeseg.cli import main
    from edgeseg.cpu import FORCE_ENV

    monkeypatch.setenv(FORCE_ENV, "avx512_bf16")
    base = ["train", "--model", TINY, "--data", str(data), "--iters", "5", "--batch-size", "2", "--crop", "32x64",
            "--input-size", "64x96", "--device", "cpu", "--val-interval", "2", "--save-interval", "100",
            "--warmup-iters", "1", "--lr", "2e-3", "--seed", "3", "--no-progress", "--ema", "0.8",
            "--class-weights", "enet", "--ohem", "--threads", "2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(base + ["--out", str(ref)]) == 0
    capsys.readouterr()
    assert main(base + ["--out", str(run), "--max-minutes", "1e-6"]) == 0
    assert "1 / 5  (stopped; rerun with --resume)" in capsys.readouterr().out
    state = load_state(run / "train_state.safetensors")
    assert state["step"] == 1 and "ema" in state and state["config"]["precision"] == "bf16"
    assert main(base + ["--out", str(run), "--resume"]) == 0
    assert "5 / 5" in capsys.readouterr().out
    a, b = (load_state(p / "train_state.safetensors") for p in (ref, run))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    wa, wb = _weights(ref / "last"), _weights(run / "last")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["step"] for r in _log(ref)] == [r["step"] for r in _log(run)]
    assert a["best_metrics"] == b["best_metrics"]
