"""Nothing overwritten without --force: every command that writes (--json, --report, --record, --out artifacts,
checkpoints and run folders) refuses an existing output with one line naming the argument, exit 2, before any of
its work (nothing else appears beside the output), and leaves the existing output as it was.

The inputs are real and valid (a tiny 11-class checkpoint, a tiny CamVid-layout dataset, the shipped ONNX
artifact, a real official-style .pth), so without the check each command would go on to do its work and write.
Also here: `python -m edgeseg.checkpoint` (ship_half), which writes its licence note inside the atomic folder.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reliability import _one_line_error, make_camvid, make_ckpt  # noqa: E402  (also registers tiny_ops)

from edgeseg.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED_ONNX = REPO / "edgeseg" / "assets" / "artifacts" / "segnext_t_offset_camvid-onnx-int8-qat"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    from edgeseg.models import create_model

    root = tmp_path_factory.mktemp("no_overwrite_inputs")
    torch.manual_seed(0)
    pth = root / "official.pth"
    torch.save({"state_dict": create_model("offseg_t", num_classes=19).state_dict()}, pth)
    assert (SHIPPED_ONNX / "manifest.json").is_file()
    return {"ckpt": str(make_ckpt(root / "ckpt")), "data": str(make_camvid(root / "camvid", n_train=2, n_val=1)),
            "art": str(SHIPPED_ONNX), "pth": str(pth)}


# id -> (argv with {ckpt} {data} {art} {pth} {out}, flag naming the output, output kind). Small work sizes, so
# that a missing check costs a short run, not a long one, before the test fails.
CASES = {
    "models --json": (["models", "--pattern", "tiny_ops", "--json", "{out}", "--no-progress"], "--json", "file"),
    "eval --json": (["eval", "--checkpoint", "{ckpt}", "--data", "{data}", "--json", "{out}", "--no-progress"],
                    "--json", "file"),
    "train --out": (["train", "--model", "tiny_ops", "--data", "{data}", "--iters", "1", "--batch-size", "1",
                     "--device", "cpu", "--out", "{out}", "--no-progress"], "--out", "dir"),
    "train --json": (["train", "--model", "tiny_ops", "--data", "{data}", "--iters", "1", "--batch-size", "1",
                      "--device", "cpu", "--out", "{out}.run", "--json", "{out}", "--no-progress"], "--json", "file"),
    "import --out": (["import", "--from", "offseg", "{pth}", "--model", "offseg_t", "--out", "{out}"], "--out", "dir"),
    "import --json": (["import", "--from", "offseg", "{pth}", "--model", "offseg_t", "--out", "{out}.ckpt",
                       "--json", "{out}"], "--json", "file"),
    "export --out": (["export", "--checkpoint", "{ckpt}", "--target", "onnx", "--out", "{out}"], "--out", "dir"),
    "export --json": (["export", "--checkpoint", "{ckpt}", "--target", "onnx", "--out", "{out}.art", "--json",
                       "{out}"], "--json", "file"),
    "export --list-targets --json": (["export", "--list-targets", "--json", "{out}"], "--json", "file"),
    "qat --out": (["qat", "--checkpoint", "{ckpt}", "--target", "onnx", "--data", "{data}", "--iters", "1",
                   "--batch-size", "1", "--device", "cpu", "--out", "{out}"], "--out", "dir"),
    "qat --json": (["qat", "--checkpoint", "{ckpt}", "--target", "onnx", "--data", "{data}", "--iters", "1",
                    "--batch-size", "1", "--device", "cpu", "--out", "{out}.run", "--json", "{out}"], "--json", "file"),
    "quant-report --json": (["quant-report", "--checkpoint", "{ckpt}", "--target", "onnx", "--data", "{data}",
                             "--limit", "1", "--json", "{out}"], "--json", "file"),
    "validate --json": (["validate", "{art}", "--data", "{data}", "--max-images", "1", "--json", "{out}",
                         "--no-progress"], "--json", "file"),
    "validate --report": (["validate", "{art}", "--data", "{data}", "--max-images", "1", "--report", "{out}",
                           "--no-progress"], "--report", "dir"),
    "bench --json": (["bench", "{art}", "--warmup", "0", "--runs", "1", "--json", "{out}", "--no-progress"],
                     "--json", "file"),
    "demo --record": (["demo", "--artifact", "{ckpt}", "--source", "{data}/val", "--headless", "--record", "{out}"],
                      "--record", "file"),
    "demo --json": (["demo", "--artifact", "{ckpt}", "--source", "{data}/val", "--headless", "--json", "{out}"],
                    "--json", "file"),
    "predict --out": (["predict", "{data}/val", "--checkpoint", "{ckpt}", "--out", "{out}", "--no-progress"],
                      "--out", "dir"),
    "pipeline --out": (["pipeline", "--checkpoint", "{ckpt}", "--data", "{data}", "--targets", "onnx", "--precisions",
                        "fp32", "--max-images", "1", "--runs", "1", "--out", "{out}", "--no-progress"], "--out", "dir"),
    "pipeline --json": (["pipeline", "--checkpoint", "{ckpt}", "--data", "{data}", "--targets", "onnx",
                         "--precisions", "fp32", "--max-images", "1", "--runs", "1", "--out", "{out}.run", "--json",
                         "{out}", "--no-progress"], "--json", "file"),
}


def test_every_writing_command_has_a_case():
    from edgeseg.cli import COMMANDS

    covered = {case.split()[0] for case in CASES}
    assert covered == set(COMMANDS), set(COMMANDS) ^ covered  # a new command that writes gets a case here


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_existing_output_is_refused_before_any_work(case, inputs, tmp_path, capsys, monkeypatch):
    argv, flag, kind = CASES[case]
    monkeypatch.chdir(tmp_path)  # anything a command would write by default lands where the test looks
    out = tmp_path / ("old.mp4" if flag == "--record" else "old.json" if kind == "file" else "old")
    if kind == "file":
        out.write_bytes(b"OLD")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("OLD")
    before = _tree(tmp_path)
    rc = main([a.format(out=out, **inputs) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = _one_line_error(err, flag, str(out), "--force")
    assert "exists" in line or "not empty" in line, line
    # no work began: nothing new beside the output (no run folder, artifact, plot or temporary), the old one intact
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("argv", [
    ["models", "--pattern", "tiny_ops", "--json", "{out}", "--no-progress"],
    ["bench", "{art}", "--warmup", "0", "--runs", "1", "--json", "{out}", "--no-progress"],
], ids=lambda a: a[0])
def test_force_overwrites(argv, inputs, tmp_path, capsys):
    out = tmp_path / "old.json"
    out.write_text("OLD")
    assert main([a.format(out=out, **inputs) for a in argv] + ["--force"]) == 0, capsys.readouterr().err
    assert out.read_text().lstrip().startswith(("{", "[")) and [p.name for p in tmp_path.iterdir()] == ["old.json"]


# ------------------------------------------------------------------------------- python -m edgeseg.checkpoint

def _ship(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    boot = ("import runpy, sys; sys.path.insert(0, {tests!r}); import _tiny; sys.argv[0] = 'x'; "
            "runpy.run_module('edgeseg.checkpoint', run_name='__main__', alter_sys=True)"
            ).format(tests=str(Path(__file__).resolve().parent))
    return subprocess.run([sys.executable, "-c", boot, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=240, cwd=REPO)


def test_ship_half_usage_refusal_and_licence_inside_the_checkpoint(inputs, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgeseg.checkpoint"], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == \
        "usage: python -m edgeseg.checkpoint SRC DST [LICENSE.md] [--force]", r.stderr
    note = tmp_path / "NOTE.md"
    note.write_text("data licence\n")
    dst = tmp_path / "half"
    r = _ship(inputs["ckpt"], dst, note)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["LICENSE.md", "model.json", "model.safetensors"]
    assert (dst / "LICENSE.md").read_text() == "data licence\n"
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(dst / "model.safetensors")).values() if v.is_floating_point()} == \
        {torch.float16}
    stamp = (dst / "model.safetensors").stat().st_mtime_ns
    r = _ship(inputs["ckpt"], dst, note)
    assert r.returncode == 2 and (dst / "model.safetensors").stat().st_mtime_ns == stamp
    _one_line_error(r.stderr, str(dst), "--force")
    assert _ship(inputs["ckpt"], dst, "--force").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NOTE.md", "half"]  # no temporary left beside it
    assert not (dst / "LICENSE.md").exists()  # re-shipped without a note: the folder was replaced as a whole
