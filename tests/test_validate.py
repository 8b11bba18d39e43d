"""validate / bench / report on artifact folders run by a real (eager PyTorch) session, on real CamVid images.

The artifact folders here hold a real manifest (sha256 of their file, mean/std, input size, source checkpoint) and
are run by `TorchSession` built from that manifest, so these tests exercise validate's logic (preprocessing from
the manifest, reference resolution, metrics, agreement, boundary split, failure records) without waiting for a
vendor export; tests/test_pipeline.py runs the same code on real exported artifacts.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeseg.checkpoint import load_checkpoint, save_checkpoint
from edgeseg.data.datasets import CAMVID_INFO
from edgeseg.data.embedded import default_data_dir
from edgeseg.eval.bench import bench, flag_int8_not_faster
from edgeseg.eval.validate import boundary_mask, latency_stats, resolve_reference, validate
from edgeseg.export.base import ExportWrapper, Manifest, verify_manifest, write_manifest
from edgeseg.fileio import sha256_tree
from edgeseg.models import create_model
from edgeseg.report.render import merge, render, text_table
from edgeseg.types import ModelSpec

HW = (96, 128)
N_IMAGES = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("test_segnext", num_classes=CAMVID_INFO.num_classes).eval()
    spec = ModelSpec(model="test_segnext", num_classes=CAMVID_INFO.num_classes, class_names=CAMVID_INFO.class_names,
                     palette=CAMVID_INFO.palette, ignore_index=CAMVID_INFO.ignore_index, input_hw=HW)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "test_segnext_camvid", model, spec)


def make_artifact(root: Path, ckpt: Path, name: str, precision: str = "fp32", target: str = "onnx",
                  mean=None, std=None, executed_here: bool = True, noise: float = 0.0) -> Path:
    """An artifact folder whose model file is a (possibly perturbed) copy of the checkpoint weights."""
    model, spec = load_checkpoint(ckpt)
    out = root / name
    out.mkdir(parents=True)
    if noise:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.abs().mean() * torch.randn(p.shape, generator=g))
    save_checkpoint(out / "weights", model, spec)
    w = ExportWrapper(model, HW, spec.mean, spec.std)
    m = Manifest(target=target, precision=precision, model=spec.model, model_file="weights",
                 input=w.input_contract(), output=w.output_contract(spec.num_classes),
                 mean=list(mean or spec.mean), std=list(std or spec.std), class_names=list(spec.class_names),
                 palette=[list(c) for c in spec.palette], ignore_index=spec.ignore_index, input_hw=list(HW),
                 files=["weights"], fallback_ops=["aten.grid_sampler_2d.default"] if target == "onnx" else [],
                 executed_here=executed_here,
                 not_executed_reason=None if executed_here else "Core ML needs macOS",
                 source_checkpoint={"path": str(ckpt), "sha256": sha256_tree(ckpt)})  # as export records it
    write_manifest(out, m)
    return out


def torch_opener(path, num_threads=None):
    """Open an artifact made by make_artifact: sha256 checked, then eager PyTorch with the manifest's contract."""
    from edgeseg.runtime.torch import TorchSession

    m = verify_manifest(path)
    if not m.executed_here:
        raise RuntimeError("coremltools cannot load a model on Linux")
    model, spec = load_checkpoint(Path(path) / m.model_file)
    sess = TorchSession.from_model(model, spec, path=path, input_hw=tuple(m.input_hw), num_threads=num_threads)
    sess.manifest = m  # the artifact's manifest (its mean/std drive segment's preprocessing)
    return sess


def test_boundary_mask_by_hand():
    lm = np.zeros((9, 9), np.uint8)
    lm[:, 5:] = 2  # one vertical edge between columns 4 and 5
    m1 = boundary_mask(lm, 1)
    assert m1[:, 4].all() and m1[:, 5].all() and not m1[:, :4].any() and not m1[:, 6:].any()
    m2 = boundary_mask(lm, 2)
    assert m2[:, 3:7].all() and not m2[:, :3].any() and not m2[:, 7:].any()
    assert not boundary_mask(np.ones((5, 5), np.int64), 3).any()


def test_latency_stats():
    s = latency_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["p50"] == 3.0 and s["p50"] <= s["p90"] and s["n"] == 5 and s["mean"] == pytest.approx(22.0)


def test_validate_fp32_matches_eager_and_catches_broken_manifest(tmp_path, ckpt):
    from edgeseg.data.datasets import open_dataset
    from edgeseg.eval.evaluate import evaluate, torch_predictor

    arts = tmp_path / "artifacts"
    good = make_artifact(arts, ckpt, "onnx-fp32")
    # wrong mean/std written into the manifest and re-hashed: the sha256 check still passes
    broken = make_artifact(arts, ckpt, "onnx-int8", precision="int8", mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    verify_manifest(broken)
    coreml = make_artifact(arts, ckpt, "coreml-fp32", target="coreml", executed_here=False)
    corrupt = make_artifact(arts, ckpt, "openvino-fp32", target="openvino")
    (corrupt / "weights" / "model.safetensors").write_bytes(b"tampered")

    data = default_data_dir()
    recs = validate([good, broken, coreml, corrupt], data, max_images=N_IMAGES, maps_dir=tmp_path / "maps",
                    num_maps=2, progress=False, open_session=torch_opener)
    g, b, c, x = recs
    for r in recs:
        for k in ("target", "precision", "miou", "per_class_iou", "miou_drop", "agreement", "boundary_disagreement",
                  "interior_disagreement", "latency_ms", "size_bytes", "fallback_ops", "executed", "artifact",
                  "passed", "reasons"):
            assert k in r, k
    json.dumps(recs)  # JSON-able

    # fp32 against its source checkpoint: identical maps, and the same mIoU as eager evaluate()
    model, spec = load_checkpoint(ckpt)
    ds = open_dataset(data, "val")
    ds.image_paths, ds.label_paths = ds.image_paths[:N_IMAGES], ds.label_paths[:N_IMAGES]
    eager = evaluate(torch_predictor(model), ds, HW, spec.mean, spec.std, progress=False)
    assert g["status"] == "ok" and g["executed"] is True and g["passed"] is True, g["reasons"]
    assert g["miou"] == pytest.approx(eager["miou"], abs=1e-4)
    assert g["agreement"] == 1.0 and g["miou_drop"] == pytest.approx(0.0, abs=1e-9)
    assert g["reference"]["kind"] == "checkpoint" and g["num_images"] == N_IMAGES
    assert g["size_bytes"] > 0 and g["fallback_ops"] == ["aten.grid_sampler_2d.default"]
    assert g["latency_ms"]["p50"] <= g["latency_ms"]["p90"]
    from edgeseg.cpu import host_cpu
    from edgeseg.report.render import latency_hosts, merge

    assert g["cpu"]["model"] == host_cpu().model  # every per-image latency names its CPU, in the table too
    (host,) = latency_hosts(merge([g]))
    assert host.startswith(host_cpu().model) and "not recorded" not in host, host

    # broken mean/std: caught by the agreement check
    assert b["executed"] is True and b["passed"] is False
    assert b["agreement"] < 0.95 and any("agreement" in s for s in b["reasons"]), b
    assert b["boundary_disagreement"] is not None and b["interior_disagreement"] is not None
    assert len(b["per_class_iou_delta"]) == CAMVID_INFO.num_classes

    # Core ML-like: converted, not run
    assert c["status"] == "not run" and c["executed"] is False and c["passed"] is None and c["miou"] is None
    # tampered file: a FAILED record naming the file, not an exception
    assert x["status"] == "failed" and x["passed"] is False and "sha256" in x["error"]

    assert [r["verdict"] for r in recs] == ["pass", "fail", "not run", "failed"]

    # maps for the report
    with np.load(b["maps"]) as z:
        assert {"image_0", "pred_0", "ref_0", "label_0", "image_1"} <= set(z.files)
        assert z["pred_0"].shape == z["image_0"].shape[:2]

    # report from the records only
    rep = render(recs, None, tmp_path / "report")
    text = rep.read_text()
    assert "| onnx | fp32 | ok |" in text and "FAILED" in text and "converted, not run" in text
    assert (tmp_path / "report" / "accuracy_vs_latency.png").stat().st_size > 1000
    assert (tmp_path / "report" / "per_class_iou_delta.png").stat().st_size > 1000
    assert (tmp_path / "report" / "disagreement_onnx-int8.png").stat().st_size > 1000
    assert "FAILED" in text_table(merge(recs))


def test_reference_resolution(tmp_path, ckpt):
    arts = tmp_path / "a"
    fp32 = make_artifact(arts, ckpt, "ov-fp32", target="openvino")
    int8 = make_artifact(arts, ckpt, "ov-int8", target="openvino", precision="int8")
    m = json.loads((int8 / "manifest.json").read_text())
    assert resolve_reference(int8, m, None) == ("checkpoint", ckpt)
    m["source_checkpoint"] = {"path": str(tmp_path / "gone")}
    assert resolve_reference(int8, m, None) == ("artifact", fp32)
    assert resolve_reference(int8, m, fp32) == ("artifact", fp32)
    from edgeseg.errors import UsageError

    with pytest.raises(UsageError, match="neither an artifact"):
        resolve_reference(int8, m, tmp_path)


def test_validate_against_fp32_sibling_artifact(tmp_path, ckpt):
    arts = tmp_path / "a"
    fp32 = make_artifact(arts, ckpt, "ov-fp32", target="openvino")
    noisy = make_artifact(arts, ckpt, "ov-int8", target="openvino", precision="int8", noise=0.02)
    r = validate([noisy], default_data_dir(), reference=fp32, max_images=2, progress=False,
                 open_session=torch_opener)[0]
    assert r["reference"] == {"kind": "artifact", "path": str(fp32)}
    assert 0.0 < r["agreement"] < 1.0  # perturbed weights: some, not all, pixels change
    # the disagreement of a slightly perturbed model concentrates on class boundaries
    assert r["boundary_disagreement"] > r["interior_disagreement"]


def test_bench_records(tmp_path, ckpt):
    arts = tmp_path / "a"
    a = make_artifact(arts, ckpt, "onnx-fp32")
    b = make_artifact(arts, ckpt, "onnx-int8", precision="int8")
    c = make_artifact(arts, ckpt, "coreml-fp32", target="coreml", executed_here=False)
    recs = bench([a, b, c, tmp_path / "missing"], threads=1, warmup=1, runs=3, progress=False,
                 open_session=torch_opener)
    ra, rb, rc, rm = recs
    for r in (ra, rb):
        assert r["status"] == "ok" and r["runs"] == 3 and r["warmup"] == 1 and r["threads"] == 1
        assert r["latency_ms"]["n"] == 3 and 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p90"]
        assert r["throughput_ips"] > 0 and r["peak_rss_mb"] > 0 and r["size_bytes"] > 0
        assert r["thread_control"].startswith("onnxruntime SessionOptions.intra_op_num_threads")
    assert rb["speedup_vs_fp32"] is not None and isinstance(rb["int8_not_faster"], bool)
    assert rc["status"] == "not run" and rc["executed"] is False
    assert rm["status"] == "failed" and "manifest.json" in rm["error"]
    json.dumps(recs)


def test_flag_int8_not_faster():
    def rec(p, prec, target="onnx"):
        return {"status": "ok", "precision": prec, "target": target, "model": "m", "input_hw": [64, 64],
                "latency_ms": {"p50": p}, "name": f"{target}-{prec}"}

    recs = [rec(10.0, "fp32"), rec(12.0, "int8"), rec(10.0, "fp32", "openvino"), rec(5.0, "int8", "openvino"),
            rec(3.0, "int8", "executorch-xnnpack")]
    flag_int8_not_faster(recs)
    assert recs[1]["int8_not_faster"] is True and recs[1]["speedup_vs_fp32"] == pytest.approx(10 / 12)
    assert recs[3]["int8_not_faster"] is False and recs[3]["speedup_vs_fp32"] == pytest.approx(2.0)
    assert "int8_not_faster" not in recs[4]  # no fp32 sibling: nothing to compare


def test_cli_validate_and_bench(tmp_path, ckpt, capsys, monkeypatch):
    """The command modules turn arguments into library calls and exit non-zero on a failed artifact."""
    from edgeseg.cli import main

    arts = tmp_path / "a"
    good = make_artifact(arts, ckpt, "onnx-fp32")
    bad = make_artifact(arts, ckpt, "x-fp32")
    shutil.rmtree(bad / "weights")
    import edgeseg.eval.bench as bench_mod
    import edgeseg.eval.validate as val_mod

    monkeypatch.setattr(val_mod, "_default_opener", torch_opener)
    monkeypatch.setattr(bench_mod, "_default_opener", torch_opener)
    rc = main(["validate", str(good), "--data", str(default_data_dir()), "--max-images", "1", "--no-progress",
               "--json", str(tmp_path / "v.json"), "--report", str(tmp_path / "rep")])
    assert rc == 0, capsys.readouterr()
    recs = json.loads((tmp_path / "v.json").read_text())
    assert recs[0]["passed"] is True and (tmp_path / "rep" / "report.md").is_file()
    rc = main(["bench", str(good), str(bad), "--runs", "2", "--warmup", "0", "--no-progress",
               "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED" in out and "threads: 1" in out
    assert json.loads((tmp_path / "b.json").read_text())[0]["latency_ms"]["p50"] > 0


def test_read_manifest_dict_is_read_manifest(tmp_path, ckpt):
    """validate reads manifests through export.base.read_manifest: the same dict, the same checks and messages."""
    from edgeseg.errors import ArtifactError
    from edgeseg.eval.validate import read_manifest_dict
    from edgeseg.export.base import read_manifest

    art = make_artifact(tmp_path / "a", ckpt, "onnx-fp32")
    assert read_manifest_dict(art) == read_manifest(art).to_json()
    m = json.loads((art / "manifest.json").read_text())
    m["model_file"] = str(tmp_path / "elsewhere")  # absolute: read_manifest refuses it, so must validate
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as ours:
        read_manifest_dict(art)
    with pytest.raises(ArtifactError) as theirs:
        read_manifest(art)
    assert "absolute path" in str(ours.value) and str(ours.value) == str(theirs.value)


def test_no_reference_is_not_a_pass(tmp_path, ckpt, capsys, monkeypatch):
    """An artifact that ran but had nothing to compare with gets passed=None / verdict "no reference" in the
    record, the table and the report, and `edgeseg validate` exits 1 for it unless --allow-unchecked."""
    import edgeseg.eval.validate as val_mod
    from edgeseg.cli import main

    art = make_artifact(tmp_path / "a", ckpt, "onnx-int8", precision="int8")  # no fp32 sibling beside it
    m = json.loads((art / "manifest.json").read_text())
    m["source_checkpoint"] = {"path": str(tmp_path / "gone")}  # manifest.json is not hashed: still verifies
    (art / "manifest.json").write_text(json.dumps(m))
    data = default_data_dir()
    (r,) = validate([art], data, max_images=1, progress=False, open_session=torch_opener)
    assert r["status"] == "ok" and r["executed"] is True and r["miou"] is not None
    assert r["passed"] is None and r["verdict"] == "no reference" and r["reference"] is None
    assert r["agreement"] is None and r["miou_drop"] is None
    (row,) = [line for line in text_table(merge([r])).splitlines() if "onnx" in line]
    assert "no reference" in row and "pass" not in row
    assert "no reference" in render([r], None, tmp_path / "rep").read_text()

    monkeypatch.setattr(val_mod, "_default_opener", torch_opener)
    base = ["validate", str(art), "--data", str(data), "--max-images", "1", "--no-progress"]
    assert main(base + ["--json", str(tmp_path / "v.json")]) == 1
    out = capsys.readouterr().out
    assert "NO REFERENCE onnx-int8" in out and "nothing was compared" in out
    saved = json.loads((tmp_path / "v.json").read_text())[0]
    assert saved["passed"] is None and saved["verdict"] == "no reference"
    assert main(base + ["--allow-unchecked"]) == 0
    capsys.readouterr()
    # the same artifact with a reference given: compared, and a real pass
    assert main(base + ["--reference", str(ckpt), "--json", str(tmp_path / "w.json")]) == 0
    w = json.loads((tmp_path / "w.json").read_text())[0]
    assert w["passed"] is True and w["verdict"] == "pass" and w["agreement"] == 1.0


ARENA_MB = 400


def hungry_opener(path, num_threads=None):
    """torch_opener, plus a runtime-like arena of ARENA_MB touched megabytes held by sessions of "big-*" folders
    (freed with the session)."""
    sess = torch_opener(path, num_threads=num_threads)
    if Path(path).name.startswith("big-"):
        sess.arena = np.ones(ARENA_MB * 2**20 // 8)
    return sess


@pytest.mark.parametrize("isolate", [None, True], ids=["hwm-reset", "child-process"])
def test_bench_peak_memory_is_per_artifact(tmp_path, ckpt, isolate):
    """A large artifact benched first does not lend its peak to the next one: each gets its own."""
    import sys

    from edgeseg.eval.bench import PEAK_SOURCE_CHILD, PEAK_SOURCE_HWM

    if isolate is None and not sys.platform.startswith("linux"):
        pytest.skip("the high-water-mark reset is Linux only")
    big = make_artifact(tmp_path / "a", ckpt, "big-onnx-fp32")
    small = make_artifact(tmp_path / "a", ckpt, "onnx-fp32")
    rb, rs = bench([big, small], threads=1, warmup=0, runs=1, progress=False, open_session=hungry_opener,
                   isolate=isolate)
    assert rb["status"] == rs["status"] == "ok", (rb["error"], rs["error"])
    assert rb["peak_rss_source"] == rs["peak_rss_source"]
    assert rs["peak_rss_source"].startswith(PEAK_SOURCE_CHILD if isolate else PEAK_SOURCE_HWM), rs["peak_rss_source"]
    # the big one's peak holds its arena; the small one's is its own, not the running maximum
    peaks = (rb["peak_rss_mb"], rs["peak_rss_mb"], rb["rss_before_mb"], rs["rss_before_mb"])
    assert rb["peak_rss_mb"] > ARENA_MB and rs["peak_rss_mb"] < rb["peak_rss_mb"] - ARENA_MB / 2, peaks
    if not isolate:  # same process: each peak is measured from the RSS its artifact started at
        assert rb["peak_rss_mb"] - rb["rss_before_mb"] > 0.9 * ARENA_MB, peaks
        assert rs["peak_rss_mb"] - rs["rss_before_mb"] < ARENA_MB / 2, peaks
    assert rs["peak_rss_mb"] >= rs["rss_mb"] * 0.9  # a peak, not below what the process held after the runs
