"""Training: optimizer groups, schedule, loss on a fixed batch, checkpoints that `eval` reproduces, exact resume
after a crash or a stop, packs, the `train` command, and a 2-process gloo DDP run (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

from edgeseg.errors import UsageError
from edgeseg.models.registry import list_models, register_model
from edgeseg.train.state import load_state

TINY = "_train_tiny"
REPO = Path(__file__).resolve().parents[1]


class _Tiny(nn.Module):
    """conv stem (stride 4) + BN + a 1x1 head; `aux_loss` records that the trainer called it."""

    output_stride = 4

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, 2, 1), nn.ReLU(), nn.Dropout(0.1))
        self.decode_head = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(),
                                         nn.Conv2d(width, num_classes, 1))
        self.aux_calls = 0
        self._feat = None

    def forward(self, x):
        f = self.backbone(x)
        self._feat = f
        return self.decode_head(f)

    def aux_loss(self, labels, ignore_index):
        self.aux_calls += 1
        return 1e-3 * self._feat.pow(2).mean()


if TINY not in list_models():
    @register_model
    def _train_tiny(num_classes: int, **kw) -> nn.Module:
        """Tiny stride-4 conv model for training tests."""
        return _Tiny(num_classes, **kw)


COLORS = {0: (70, 130, 230), 1: (200, 60, 40), 3: (120, 120, 120), 8: (240, 220, 40)}


def make_camvid(root: Path, n_train: int = 6, n_val: int = 3, hw=(64, 96), seed: int = 0) -> Path:
    """Synthetic CamVid-layout data: sky above, road below, a building block and a car, some ignore pixels."""
    rng = np.random.default_rng(seed)
    h, w = hw
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            lab = np.zeros((h, w), np.uint8)
            horizon = int(rng.integers(h // 3, 2 * h // 3))
            lab[horizon:] = 3
            x0 = int(rng.integers(0, w // 2))
            lab[horizon // 3:horizon, x0:x0 + w // 4] = 1
            cx = int(rng.integers(0, w - 20))
            lab[horizon + 2:horizon + 12, cx:cx + 20] = 8
            lab[rng.random((h, w)) < 0.02] = 11  # ignore
            img = np.zeros((h, w, 3), np.float32)
            for c, col in COLORS.items():
                img[lab == c] = col
            img += rng.normal(0, 12, img.shape)
            img = np.clip(img, 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / split / f"s{i:03d}.png"), img[:, :, ::-1])
            cv2.imwrite(str(root / f"{split}annot" / f"s{i:03d}.png"), lab)
    return root


@pytest.fixture
def data(tmp_path) -> Path:
    return make_camvid(tmp_path / "camvid")


FAST = dict(batch_size=2, crop_hw=(32, 64), input_hw=(64, 96), warmup_iters=2, lr=2e-3, seed=3,
            device="cpu", progress=False)


def _weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


# ----------------------------------------------------------------------------------------------- units

def test_param_groups_and_schedule():
    from edgeseg.train.schedule import build_optimizer, build_scheduler, lr_factor

    m = _Tiny(4)
    opt = build_optimizer(m, lr=1e-3, weight_decay=0.05, head_lr_mult=10)
    by = {g["name"]: g for g in opt.param_groups}
    assert set(by) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert by["head"]["lr"] == pytest.approx(1e-2) and by["backbone"]["lr"] == pytest.approx(1e-3)
    assert by["backbone_no_decay"]["weight_decay"] == 0 and by["backbone"]["weight_decay"] == 0.05
    nd = {id(p) for p in by["backbone_no_decay"]["params"]}
    assert id(m.backbone[1].weight) in nd and id(m.backbone[0].bias) in nd  # BN weight, conv bias
    assert id(m.backbone[0].weight) not in nd
    # warm-up is linear, then poly(1) to 0
    assert lr_factor(0, 100, 10, 0.0) == 0 and lr_factor(5, 100, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0) and lr_factor(55, 100, 10) == pytest.approx(0.5)
    sch = build_scheduler(opt, 100, 10, 0.0)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs[5] == pytest.approx(0.5 * 1e-3) and max(lrs) == pytest.approx(1e-3) and lrs[-1] < 2e-5


def test_loss_decreases_on_fixed_batch():
    from edgeseg.train.losses import seg_loss
    from edgeseg.train.schedule import build_optimizer

    torch.manual_seed(0)
    m = _Tiny(11)
    x = torch.randn(2, 3, 32, 32)
    y = (x[:, 0] > 0).long() * 3  # learnable: class from the sign of channel 0
    y[:, :2] = 11  # ignore rows
    opt = build_optimizer(m, lr=1e-2, weight_decay=0.01)
    losses = []
    for _ in range(25):
        loss, parts = seg_loss(m(x), y, 11, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert "aux" in parts and m.aux_calls == 25
    assert losses[-1] < 0.5 * losses[0], losses
    # ignored pixels do not count: the loss is the mean CE over the labelled pixels only
    m.eval()
    with torch.no_grad():
        logits = m(x)
        got, _ = seg_loss(logits, y, 11)
        up = torch.nn.functional.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        ce = torch.nn.functional.cross_entropy(up, y.clamp(max=10), reduction="none")
    assert float(got) == pytest.approx(float(ce[y != 11].mean()), rel=1e-6)


def test_preload_and_augment_on_cpu(data):
    from edgeseg.data.datasets import open_dataset
    from edgeseg.train.loop import preload

    ds = open_dataset(data, "train")
    images, labels = preload(ds, num_workers=2, progress=False)
    assert images.shape == (6, 64, 96, 3) and images.dtype == torch.uint8 and labels.dtype == torch.uint8
    img0, lab0 = ds[0]
    assert torch.equal(images[0], torch.from_numpy(img0)) and torch.equal(labels[0].long(), torch.from_numpy(lab0))


# ----------------------------------------------------------------------------------------------- fit

def test_fit_checkpoints_and_eval_reproduces(data, tmp_path):
    from edgeseg.checkpoint import load_checkpoint, load_spec
    from edgeseg.data.datasets import open_dataset
    from edgeseg.eval.evaluate import evaluate, torch_predictor
    from edgeseg.train.loop import fit

    out = tmp_path / "run"
    res = fit(TINY, data, iters=6, val_interval=3, out_dir=out, **FAST)
    for p in ("last/model.safetensors", "last/model.json", "best/model.json", "train_state.safetensors", "log.jsonl"):
        assert (out / p).is_file(), p
    assert res["step"] == 6 and res["best"] is not None
    state = load_state(out / "train_state.safetensors")  # safe to load
    assert state["step"] == 6 and set(state["rng"]) >= {"torch", "numpy", "python"}
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    vals = [r for r in recs if "val" in r]
    assert [r["step"] for r in vals] == [3, 6]
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r)

    spec = load_spec(out / "best")
    assert spec.model == TINY and spec.num_classes == 11 and spec.ignore_index == 11
    assert spec.class_names[0] == "Sky" and tuple(spec.input_hw) == (64, 96)
    reported = spec.metrics["val"]
    assert reported["miou"] == max(r["val"]["miou"] for r in vals)
    # an independent evaluation of the saved best checkpoint gives the metrics training reported
    model, spec = load_checkpoint(out / "best")
    got = evaluate(torch_predictor(model, "cpu"), open_dataset(data, "val"), spec.input_hw, spec.mean, spec.std,
                   progress=False)
    assert got["miou"] == pytest.approx(reported["miou"], abs=1e-9)
    assert got["per_class_iou"] == reported["per_class_iou"]
    assert got["aacc"] == pytest.approx(reported["aacc"], abs=1e-9) and got["num_images"] == 3


def test_fit_learns(data, tmp_path):
    """A few dozen steps on the synthetic data beat the chance level clearly (the loop really trains)."""
    from edgeseg.train.loop import fit

    res = fit(TINY, data, iters=40, val_interval=40, out_dir=tmp_path / "r", **{**FAST, "lr": 5e-3})
    recs = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < losses[0]
    assert res["last"]["aacc"] > 0.6, res["last"]


class _Crash(RuntimeError):
    pass


def test_kill_and_resume_is_exact(data, tmp_path):
    from edgeseg.train.loop import fit

    kw = dict(FAST, iters=7, val_interval=3, save_interval=2)
    ref = fit(TINY, data, out_dir=tmp_path / "ref", **kw)

    def crash_at_5(step):
        if step == 5:
            raise _Crash  # a crash after step 5: the last save is step 4

    run = tmp_path / "run"
    with pytest.raises(_Crash):
        fit(TINY, data, out_dir=run, on_step=crash_at_5, **kw)
    assert load_state(run / "train_state.safetensors")["step"] == 4
    with pytest.raises(UsageError, match="not empty"):
        fit(TINY, data, out_dir=run, **kw)
    # resume, stop cleanly after step 6 (a chunk), resume again to the end
    r1 = fit(TINY, data, out_dir=run, resume=True, stop_after=6, **kw)
    assert r1["stopped"] == "stopped" and r1["step"] == 6
    r2 = fit(TINY, data, out_dir=run, resume=True, **kw)
    assert r2["step"] == 7 and r2["stopped"] is None
    wa, wb = _weights(tmp_path / "ref" / "last"), _weights(run / "last")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert r2["best"]["miou"] == ref["best"]["miou"] and r2["last"] == ref["last"]
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(line)["step"] for line in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    assert steps == ref_steps  # the log has no duplicated lines from the crashed run


def test_resume_refuses_changed_setup(data, tmp_path):
    from edgeseg.train.loop import fit

    fit(TINY, data, out_dir=tmp_path / "r", iters=2, val_interval=2, **FAST)
    with pytest.raises(UsageError, match="batch_size"):
        fit(TINY, data, out_dir=tmp_path / "r", iters=2, resume=True, **{**FAST, "batch_size": 4})
    with pytest.raises(UsageError, match="nothing to resume"):
        fit(TINY, data, out_dir=tmp_path / "empty", iters=2, resume=True, **FAST)


def test_pack_roundtrip_and_train_from_pack(data, tmp_path):
    from edgeseg.data.datasets import open_dataset
    from edgeseg.train.loop import fit
    from edgeseg.train.pack import open_pack, pack_dataset

    npz = tmp_path / "camvid.npz"
    s = pack_dataset(data, npz, progress=False)
    assert s["items"] == {"train": 6, "val": 3} and npz.stat().st_size < 2**20
    with pytest.raises(UsageError, match="exists"):
        pack_dataset(data, npz, progress=False)
    src, pk = open_dataset(data, "val"), open_pack(npz, "val")
    assert len(pk) == 3 and pk.info.class_names == src.info.class_names and pk.info.ignore_index == 11
    for (a, la), (b, lb) in zip(src, pk):
        assert np.array_equal(a, b) and np.array_equal(la, lb)  # PNG sources: original bytes, lossless
    small = tmp_path / "small.npz"
    pack_dataset(data, small, size=(32, 48), progress=False)
    img, lab = open_pack(small, "train")[0]
    assert img.shape == (32, 48, 3) and lab.shape == (32, 48)
    assert set(np.unique(lab)) <= {0, 1, 3, 8, 11}  # nearest only: no invented label values
    res = fit(TINY, npz, iters=2, val_interval=2, out_dir=tmp_path / "r", **FAST)
    assert res["best"]["num_images"] == 3
    # a truncated pack is a clear error
    bad = tmp_path / "bad.npz"
    bad.write_bytes(npz.read_bytes()[:1000])
    from edgeseg.errors import ArtifactError

    with pytest.raises(ArtifactError, match="bad.npz"):
        open_pack(bad, "train")


def test_train_command(data, tmp_path, capsys):
    from edgeseg.cli import main

    out = tmp_path / "cli"
    argv = ["train", "--model", TINY, "--data", str(data), "--iters", "2", "--batch-size", "2", "--crop", "32x64",
            "--input-size", "64x96", "--device", "cpu", "--out", str(out), "--val-interval", "2", "--seed", "1",
            "--warmup-iters", "1", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and str(out / "best") in printed
    assert main(argv) == 2  # refuses to overwrite
    assert "not empty" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse: --iters and --epochs are exclusive
        main(argv + ["--epochs", "1"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert main(["train", "--model", "nope_model", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["train", "--model", TINY, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "y"),
                 "--device", "cpu"]) == 1
    assert "missing" in capsys.readouterr().err


def test_init_from_checkpoint_and_class_count_change(data, tmp_path, capsys):
    """--init: the run starts from the given weights (its first validation equals eval of those weights);
    a checkpoint with another class count keeps everything but the classifier; a wrong model is refused."""
    from edgeseg.cli import main
    from edgeseg.models import create_model
    from edgeseg.train.loop import fit, init_weights

    first = fit(TINY, data, iters=3, out_dir=tmp_path / "a", val_interval=3, **FAST)
    src = Path(first["checkpoint_last"])
    # zero steps of training are impossible, so check the loaded weights directly, then through the CLI
    net = create_model(TINY, num_classes=11)
    assert init_weights(net, src) == []
    ref = _weights(src)
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items() if k in ref)
    other = create_model(TINY, num_classes=5)
    reset = init_weights(other, src)
    assert reset == ["decode_head.2.weight", "decode_head.2.bias"]
    assert torch.equal(other.state_dict()["backbone.0.weight"], ref["backbone.0.weight"])
    assert not torch.equal(other.state_dict()["decode_head.2.weight"][:5], ref["decode_head.2.weight"][:5])
    with pytest.raises(UsageError, match="does not match this model"):
        init_weights(create_model(TINY, num_classes=11, width=8).backbone, src)
    argv = ["train", "--model", TINY, "--data", str(data), "--iters", "1", "--batch-size", "2", "--crop", "32x64",
            "--input-size", "64x96", "--device", "cpu", "--val-interval", "1", "--warmup-iters", "1",
            "--no-progress", "--lr", "1e-12", "--head-lr-mult", "1"]
    assert main(argv + ["--out", str(tmp_path / "b"), "--init", str(src)]) == 0
    capsys.readouterr()
    ft = _weights(tmp_path / "b" / "last")  # lr 1e-12: one step barely moves the loaded weights
    params = [k for k in ref if ref[k].is_floating_point() and "running_" not in k]  # BN stats move with data
    assert params and all(torch.allclose(ft[k].float(), ref[k].float(), atol=1e-6) for k in params)
    assert main(argv + ["--out", str(tmp_path / "c"), "--init", str(tmp_path / "nothing")]) == 1
    assert "nothing" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import test_train
from edgeseg.train.loop import fit
res = fit(test_train.TINY, {data!r}, out_dir={out!r}, iters=3, val_interval=3, **test_train.FAST)
import os
if os.environ.get("RANK", "0") == "0":
    print("RESULT " + json.dumps({{"world": res["world_size"], "keys": sorted(res["best"])}}))
"""


@pytest.mark.slow
def test_ddp_two_processes_gloo(data, tmp_path):
    script = tmp_path / "ddp_fit.py"
    out = tmp_path / "ddp"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests"), data=str(data), out=str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(line) == 1, p.stdout  # only rank 0 reports
    r = json.loads(line[0][7:])
    assert r["world"] == 2
    # the same metrics format as a single-process run
    from edgeseg.checkpoint import load_spec
    from edgeseg.train.loop import fit

    single = fit(TINY, data, out_dir=tmp_path / "single", iters=3, val_interval=3, **FAST)
    assert r["keys"] == sorted(single["best"])
    assert set(load_spec(out / "best").metrics["val"]) == set(load_spec(tmp_path / "single" / "best").metrics["val"])
    kinds = lambda path: [sorted(json.loads(s)) for s in (path / "log.jsonl").read_text().splitlines()]  # noqa
    assert kinds(out) == kinds(tmp_path / "single")
    assert load_spec(out / "best").provenance["world_size"] == 2


def test_holdout_split_is_validated_and_picks_best(data, tmp_path):
    """With a holdout split, every validation scores val and holdout side by side (log, model.json), and `best/`
    is the step with the best holdout mIoU, not val's."""
    import shutil

    from edgeseg.checkpoint import load_spec
    from edgeseg.train.loop import fit

    other = make_camvid(tmp_path / "other", n_val=4, seed=7)  # different images: a sequence training never saw
    shutil.copytree(other / "val", data / "test")
    shutil.copytree(other / "valannot", data / "testannot")
    out = tmp_path / "run"
    res = fit(TINY, data, iters=6, val_interval=2, holdout_split="test", out_dir=out, **{**FAST, "lr": 5e-3})
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    vals = [r for r in recs if "holdout" in r]
    assert [r["step"] for r in vals] == [2, 4, 6] and all("val" in r for r in vals)
    assert all(r["holdout"]["num_images"] == 4 and r["val"]["num_images"] == 3 for r in vals)
    best = max(vals, key=lambda r: r["holdout"]["miou"])  # the first of equal ones, as training keeps it
    spec = load_spec(out / "best")
    assert spec.metrics["holdout"]["step"] == best["step"] and spec.metrics["val"]["step"] == best["step"]
    assert spec.metrics["holdout"]["miou"] == best["holdout"]["miou"]
    assert spec.provenance["holdout_split"] == "test" and res["selected_on"] == "test"
    assert res["best_holdout"]["miou"] == best["holdout"]["miou"]
    assert set(load_spec(out / "last").metrics) == {"val", "holdout"}
