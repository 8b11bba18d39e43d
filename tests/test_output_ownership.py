"""Output ownership (docs/DESIGN.md, edgeseg/outputs.py): no command destroys its own input or another command's
output.

- An output (`--out`, `--json`, `--report`, `--record`, DST) that is, contains or lies inside an input is refused,
  with or without --force (`--out <checkpoint> --force` used to wipe the checkpoint, `--out / --force` everything).
- `--force` replaces only a folder that edgeseg wrote (manifest.json, model.json, pipeline.json, results.json) or an
  empty one; a user's folder is refused, even by `atomic_dir(force=True)`.
- The final rename never replaces a folder that appeared while the command worked (two exports or two pipelines
  into one `--out`): the one that finishes second says so in one line, exits 1 and leaves nothing behind; with
  --force it replaces only the folder it checked.
- A `--json` inside the command's own `--out` (or `--report`) is a usage error.
- An `--out` that is a file, or lies under one, fails before the work.

The refusals are checked through the real CLI with the command's work replaced by a stub that fails the test if it
is reached (so a missing check fails fast instead of running, or wiping, anything); the races run real tiny exports
and a real pipeline.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reliability import _one_line_error, make_camvid, make_ckpt  # noqa: E402  (also registers tiny_ops)

from edgeseg.cli import main  # noqa: E402
from edgeseg.errors import OutputError, UsageError  # noqa: E402

OWNED_MANIFEST = {"target": "onnx", "precision": "fp32", "files": []}  # what makes a folder an artifact's


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    root = tmp_path / "in"
    pth = root / "official.pth"
    root.mkdir()
    pth.write_bytes(b"weights")
    (root / "notes.txt").write_text("the user's, not edgeseg's")
    return {"ckpt": make_ckpt(root / "ckpt"), "data": make_camvid(root / "camvid", n_train=2, n_val=1),
            "pth": pth, "in": root, "file": root / "notes.txt"}


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# the function each command's work starts with: replaced by a stub that fails if a refusal did not come first
WORK = {"export": "edgeseg.export.export_checkpoint", "pipeline": "edgeseg.pipeline.run_pipeline",
        "eval": "edgeseg.eval.evaluate.evaluate", "bench": "edgeseg.eval.bench.bench",
        "validate": "edgeseg.eval.validate.validate", "train": "edgeseg.train.loop.fit",
        "qat": "edgeseg.train.qat.qat", "import": "edgeseg.commands.import_ckpt.import_checkpoint",
        "demo": "edgeseg.demo.app.run_demo", "quant-report": "edgeseg.quant.sensitivity.checkpoint_sensitivity"}


def _refused(argv: list[str], paths: dict, monkeypatch, capsys, *needles: str) -> str:
    """Run `argv` (formatted with `paths`) with its work stubbed: exit 2, one line with every needle, nothing
    changed under the test's folder."""
    def work_began(*a, **k):
        raise AssertionError("the command began its work: no refusal came first")

    monkeypatch.setattr(WORK[argv[0]], work_began)
    root = paths["in"].parent
    before = _tree(root)
    rc = main([a.format(**paths) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert _tree(root) == before
    return _one_line_error(err, *(n.format(**paths) for n in needles))


EXPORT = ["export", "--checkpoint", "{ckpt}", "--target", "onnx"]
PIPELINE = ["pipeline", "--checkpoint", "{ckpt}", "--data", "{data}", "--targets", "onnx", "--no-progress"]
TRAIN = ["train", "--model", "tiny_ops", "--data", "{data}", "--iters", "1", "--device", "cpu", "--no-progress"]
QAT = ["qat", "--checkpoint", "{ckpt}", "--target", "onnx", "--data", "{data}", "--iters", "1", "--device", "cpu"]
IMPORT = ["import", "--from", "offseg", "{pth}", "--model", "offseg_t"]
VALIDATE = ["validate", "{ckpt}", "--data", "{data}", "--no-progress"]

# id -> (argv, words of the one-line refusal)
INPUT_CASES = {
    "export --out = the checkpoint": (EXPORT + ["--out", "{ckpt}", "--force"], "--out", "is the input --checkpoint"),
    "export --out = the checkpoint's folder": (EXPORT + ["--out", "{in}", "--force"], "contains the input"),
    "export --out /": (EXPORT + ["--out", "/", "--force"], "--out /", "contains the input --checkpoint"),
    "export --out inside the checkpoint": (EXPORT + ["--out", "{ckpt}/art"], "lies inside the input --checkpoint"),
    "pipeline --out = the data": (PIPELINE + ["--out", "{data}", "--force"], "--out", "is the input --data"),
    "pipeline --out holds the inputs": (PIPELINE + ["--out", "{in}", "--force"], "contains the input"),
    "train --out inside the data": (TRAIN + ["--out", "{data}/run", "--force"], "lies inside the input --data"),
    "qat --out = the checkpoint": (QAT + ["--out", "{ckpt}", "--force"], "is the input --checkpoint"),
    "import --out holds SRC": (IMPORT + ["--out", "{in}", "--force"], "contains the input SRC"),
    "eval --json in the checkpoint": (["eval", "--checkpoint", "{ckpt}", "--data", "{data}", "--json",
                                       "{ckpt}/model.json", "--force"], "--json", "lies inside the input"),
    "bench --json in the artifact": (["bench", "{ckpt}", "--json", "{ckpt}/model.json", "--force"],
                                     "lies inside the input ARTIFACT_DIR"),
    "validate --report in the data": (VALIDATE + ["--report", "{data}/rep"], "--report", "lies inside the input"),
    "demo --record = the source": (["demo", "--artifact", "{ckpt}", "--source", "{file}", "--headless", "--record",
                                    "{file}", "--force"], "--record", "is the input --source"),
    "quant-report --json in the data": (["quant-report", "--checkpoint", "{ckpt}", "--target", "onnx", "--data",
                                         "{data}", "--json", "{data}/q.json"], "lies inside the input --data"),
}


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_no_output_is_contains_or_lies_inside_an_input(case, inputs, monkeypatch, capsys):
    argv, *needles = INPUT_CASES[case]
    _refused(argv, inputs, monkeypatch, capsys, *needles)


FORCE_CASES = {  # a folder of the user's at the output: --force does not make it edgeseg's to replace
    "export --out": EXPORT + ["--out", "{user}", "--force"],
    "pipeline --out": PIPELINE + ["--out", "{user}", "--force"],
    "import --out": IMPORT + ["--out", "{user}", "--force"],
    "validate --report": VALIDATE + ["--report", "{user}", "--force"],
}


@pytest.mark.parametrize("case", list(FORCE_CASES))
def test_force_replaces_only_a_folder_edgeseg_wrote(case, inputs, tmp_path, monkeypatch, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    _refused(FORCE_CASES[case], {**inputs, "user": user}, monkeypatch, capsys, "{user}", "not written by edgeseg",
             "--force")


def test_atomic_dir_force_refuses_a_user_folder_and_replaces_an_edgeseg_one(tmp_path):
    from edgeseg.checkpoint import ship_half
    from edgeseg.fileio import atomic_dir

    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(UsageError, match="not written by edgeseg"):
        with atomic_dir(user, force=True) as tmp:
            (tmp / "model.onnx").write_bytes(b"x")
    assert _tree(user) == {"thesis.tex": b"years of work"}
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "manifest.json").write_text(json.dumps(OWNED_MANIFEST))
    with atomic_dir(ours, force=True) as tmp:
        (tmp / "model.onnx").write_bytes(b"new")
    assert _tree(ours) == {"model.onnx": b"new"}
    ck = make_ckpt(tmp_path / "ck")  # python -m edgeseg.checkpoint SRC DST: DST = SRC is refused
    with pytest.raises(UsageError, match="is the input SRC"):
        ship_half(ck, ck, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "ours", "user"]


# ------------------------------------------------------------------------------------ two writers, one output

def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") or ".kept-" in p.name)


def test_a_folder_that_appeared_meanwhile_is_never_replaced(tmp_path):
    from edgeseg.fileio import atomic_dir

    out = tmp_path / "out"
    with pytest.raises(OutputError, match="another run wrote it"):
        with atomic_dir(out) as mine:
            (mine / "model.onnx").write_bytes(b"mine")
            with atomic_dir(out) as theirs:  # another run, started later, finishes first
                (theirs / "model.onnx").write_bytes(b"theirs")
    assert _tree(out) == {"model.onnx": b"theirs"} and _leftovers(out) == []


@pytest.mark.parametrize("newcomer", ["another edgeseg run with --force", "a user folder"])
def test_force_replaces_only_the_folder_it_checked(newcomer, tmp_path):
    from edgeseg.fileio import atomic_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(OWNED_MANIFEST))
    with pytest.raises(OutputError, match="another run wrote it"):
        with atomic_dir(out, force=True) as mine:
            (mine / "model.onnx").write_bytes(b"mine")
            if newcomer == "a user folder":  # meanwhile the user put their own folder there
                (out / "manifest.json").unlink()
                (out / "thesis.tex").write_text("years of work")
            else:  # meanwhile another run replaced it (started later, finished first)
                with atomic_dir(out, force=True) as theirs:
                    (theirs / "model.onnx").write_bytes(b"theirs")
    assert _tree(out) == ({"thesis.tex": b"years of work"} if newcomer == "a user folder" else
                          {"model.onnx": b"theirs"})
    assert _leftovers(out) == []


def test_two_exports_into_one_out_the_second_to_finish_fails(inputs, tmp_path, monkeypatch, capsys):
    """The first export is already working when the second starts; the second finishes first and wins."""
    from edgeseg.export import export_checkpoint
    from edgeseg.targets.onnx import exporter as onnx_exporter

    out = tmp_path / "art"
    real = onnx_exporter.OnnxExporter.export
    calls = []

    def export(self, job):
        calls.append(job)
        if len(calls) == 1:  # the other run, started while this one works, finishes first
            export_checkpoint(inputs["ckpt"], "onnx", out=out, progress=False)
        return real(self, job)

    monkeypatch.setattr(onnx_exporter.OnnxExporter, "export", export)
    rc = main(["export", "--checkpoint", str(inputs["ckpt"]), "--target", "onnx", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and len(calls) == 2, err
    _one_line_error(err.splitlines()[-1] + "\n", str(out), "another run wrote it")
    winner = json.loads((out / "manifest.json").read_text())
    assert (out / winner["model_file"]).is_file() and not (out / "export.log").exists()
    assert _leftovers(out) == []


def test_two_pipelines_into_one_out_the_second_to_finish_fails(inputs, tmp_path, monkeypatch, capsys):
    import edgeseg.pipeline as pipeline
    from edgeseg.fileio import atomic_dir

    out = tmp_path / "run"
    real = pipeline._report

    def report(run, *a, **k):  # another pipeline publishes the same --out while this one works
        with atomic_dir(out) as theirs:
            (theirs / "pipeline.json").write_text(json.dumps({"rows": [], "failures": [], "checkpoint": "theirs"}))
        return real(run, *a, **k)

    monkeypatch.setattr(pipeline, "_report", report)
    rc = main(["pipeline", "--checkpoint", str(inputs["ckpt"]), "--data", str(inputs["data"]), "--targets", "onnx",
               "--precisions", "fp32", "--max-images", "1", "--runs", "1", "--jobs", "1", "--out", str(out),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert str(out) in err.splitlines()[-1] and "another run wrote it" in err.splitlines()[-1], err
    assert json.loads((out / "pipeline.json").read_text())["checkpoint"] == "theirs"
    assert sorted(p.name for p in out.iterdir()) == ["pipeline.json"] and _leftovers(out) == []


# ----------------------------------------------------------------------- --json inside --out; --out and files

IN_OUT_CASES = {
    "export --json OUT/manifest.json": (EXPORT + ["--out", "{o}", "--json", "{o}/manifest.json"], "--json",
                                        "lies inside --out"),
    "pipeline --json P/pipeline.json": (PIPELINE + ["--out", "{o}", "--json", "{o}/pipeline.json"], "--json",
                                        "lies inside --out"),
    "validate --json REPORT/results.json": (VALIDATE + ["--report", "{o}", "--json", "{o}/results.json"],
                                            "lies inside --report"),
    "train --json OUT/log.jsonl": (TRAIN + ["--out", "{o}", "--json", "{o}/log.jsonl"], "lies inside --out"),
    "import --json OUT/model.json": (IMPORT + ["--out", "{o}", "--json", "{o}/model.json"], "lies inside --out"),
    "demo --json = --record": (["demo", "--artifact", "{ckpt}", "--source", "{data}/val", "--headless", "--record",
                                "{o}.mp4", "--json", "{o}.mp4"], "is the same path as"),
}


@pytest.mark.parametrize("case", list(IN_OUT_CASES))
def test_json_inside_the_commands_own_output_is_refused(case, inputs, tmp_path, monkeypatch, capsys):
    argv, *needles = IN_OUT_CASES[case]
    _refused(argv, {**inputs, "o": tmp_path / "o"}, monkeypatch, capsys, *needles)


FILE_CASES = {
    "export --out FILE --force": (EXPORT + ["--out", "{f}", "--force"], "--out {f}", "is a file, not a folder"),
    "export --out FILE/sub": (EXPORT + ["--out", "{f}/sub"], "--out {f}/sub", "{f} is a file"),
    "pipeline --out FILE --force": (PIPELINE + ["--out", "{f}", "--force"], "is a file, not a folder"),
    "train --out FILE/sub": (TRAIN + ["--out", "{f}/sub"], "{f} is a file"),
    "import --out FILE --force": (IMPORT + ["--out", "{f}", "--force"], "is a file, not a folder"),
    "validate --report FILE --force": (VALIDATE + ["--report", "{f}", "--force"], "is a file, not a folder"),
    "eval --json FILE/m.json": (["eval", "--checkpoint", "{ckpt}", "--data", "{data}", "--json", "{f}/m.json"],
                                "{f} is a file"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_out_that_is_or_lies_under_a_file_fails_before_the_work(case, inputs, tmp_path, monkeypatch, capsys):
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    argv, *needles = FILE_CASES[case]
    _refused(argv, {**inputs, "f": f}, monkeypatch, capsys, *needles)
    assert f.read_text() == "not a folder"


def test_library_calls_refuse_an_input_as_out(inputs):
    from edgeseg.export import export_checkpoint
    from edgeseg.pipeline import run_pipeline

    before = _tree(inputs["in"])
    with pytest.raises(UsageError, match="is the input --checkpoint"):
        export_checkpoint(inputs["ckpt"], "onnx", out=inputs["ckpt"], force=True, progress=False)
    with pytest.raises(UsageError, match="is the input --data"):
        run_pipeline(checkpoint=inputs["ckpt"], data=inputs["data"], targets=["onnx"], out=inputs["data"],
                     force=True, precisions=["fp32"], max_images=1, runs=1, isolate_exports=False, progress=False)
    assert _tree(inputs["in"]) == before
