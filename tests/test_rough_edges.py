"""Signals, memory and the remaining rough edges, through the real CLI where that is what a user meets.

SIGTERM takes the path of Ctrl-C (exit 143, children's process groups ended, temporaries removed); `eval` of a huge
image stays within bounded memory with the same metrics; `--input-size` is bounded; one clear line for a state-dict
shape mismatch, an OpenVINO failure and a plain pickle; `train` leaves no empty folder; bad `--boundary-px` /
`--threads` are usage errors; bench/validate of a `.pte` keep runtime chatter in the vendor log; class names are
printed without terminal escape sequences. Tiny models only (tests/_tiny.py).
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402,F401  (registers tiny_ops)
from test_reliability import REPO, _env, _fake_artifact, _one_line_error, cli_cmd, make_camvid, make_ckpt  # noqa: E402

from edgeseg.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rough")


@pytest.fixture(scope="module")
def ckpt(work) -> Path:
    return make_ckpt(work / "ckpt")  # tiny_ops, CamVid's 11 classes, 64x64


@pytest.fixture(scope="module")
def data(work) -> Path:
    return make_camvid(work / "camvid", n_train=2, n_val=2)


def _run(argv: list, tmpdir: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*argv), capture_output=True, text=True, env=dict(_env(), TMPDIR=str(tmpdir)),
                          timeout=timeout, cwd=REPO)


# ================================================================================================ SIGTERM

def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _descendants(pid: int) -> list[int]:
    out, todo = [], _children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended (reparented ones wait for a reaper that may never come)


def _tiny_everywhere(tmpdir: Path) -> dict:
    """The environment of a CLI run whose child processes (isolated exports: fresh interpreters) know tiny_ops
    too: a sitecustomize on PYTHONPATH registers it at every interpreter's start."""
    site = tmpdir.parent / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                                           "import _tiny  # noqa: F401\n")
    return dict(_env(), TMPDIR=str(tmpdir), PYTHONPATH=os.pathsep.join((str(REPO), str(site))))


def _sigterm_when(cmd: list, tmpdir: Path, ready, max_wait: float = 120) -> tuple[int, str, list[int]]:
    """Start `cmd`, SIGTERM it (only the process, as `kill PID` does) once `ready(t, pid)`; return (returncode,
    stderr, every descendant seen while it ran). Descendants still alive afterwards are killed (old code left them)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=_tiny_everywhere(tmpdir))
    seen: set[int] = set()
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            seen.update(_descendants(proc.pid))
            if ready(time.monotonic() - t0, proc.pid) or time.monotonic() - t0 > max_wait:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err, sorted(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in seen:
            if _alive(pid):
                time.sleep(1.0)  # the test below asserts; this only keeps the machine clean
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


def _isolated(pid: int) -> list[int]:
    """The children of `pid` that are call_isolated's."""
    return [c for c in _children(pid) if b"_isolated_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _gone(pids: list[int], within: float = 3.0) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _dirs(tmp_path: Path, name: str) -> tuple[Path, Path]:
    for d in (tmp_path / "tmp", tmp_path / name):
        d.mkdir()
    return tmp_path / "tmp", tmp_path / name


def test_sigterm_ends_a_pipeline_its_export_children_and_their_temporaries(ckpt, tmp_path):
    """SIGTERM while two isolated exports run, one of them writing its artifact: exit 143 with one line, no export
    process left, no output folder, no hidden temporary beside it, nothing of ours left in TMPDIR (before: the
    pipeline died with -15 and its export children ran on, writing into its abandoned temporary folder)."""
    tmpdir, parent = _dirs(tmp_path, "runs")
    out = parent / "run"
    cmd = cli_cmd("pipeline", "--checkpoint", ckpt, "--targets", "onnx", "--out", out, "--jobs", "2",
                  "--no-progress", "--runs", "1")
    children: set[int] = set()

    def writing(t, pid):  # an export child has begun to write its artifact (inside its own temporary folder)
        children.update(_children(pid))
        return any(parent.glob(".run.tmp-*/artifacts/.onnx-*.tmp-*/*"))

    rc, err, seen = _sigterm_when(cmd, tmpdir, writing)
    assert len(children) >= 2, f"no export children seen: {err[-2000:]}"
    assert rc == 143, (rc, err[-3000:])
    assert err.strip().splitlines()[-1] == "edgeseg: terminated" and "Traceback" not in err, err[-3000:]
    assert _gone(seen) == [], "export processes outlived the pipeline"
    assert not out.exists() and os.listdir(parent) == [], os.listdir(parent)
    assert [p for p in os.listdir(tmpdir) if p.startswith("edgeseg")] == [], os.listdir(tmpdir)


def test_sigterm_during_an_export_is_ctrl_c(ckpt, tmp_path):
    tmpdir, parent = _dirs(tmp_path, "exports")
    out = parent / "art"
    cmd = cli_cmd("export", "--checkpoint", ckpt, "--target", "onnx", "--out", out)
    rc, err, _ = _sigterm_when(cmd, tmpdir, lambda t, pid: any(p.name.startswith(".art.tmp-") for p in
                                                                 parent.iterdir()))
    assert rc == 143 and err.strip().splitlines()[-1] == "edgeseg: terminated", (rc, err[-3000:])
    assert os.listdir(parent) == [] and [p for p in os.listdir(tmpdir) if p.startswith("edgeseg")] == []


def test_end_children_ends_each_childs_process_group_and_starts_no_more():
    """A child's own children (a shell, a converter's helper) go with it; after end_children nothing new
    starts until reset(); a child whose parent is SIGKILLed gets SIGTERM (PR_SET_PDEATHSIG)."""
    from edgeseg import isolate
    from edgeseg.errors import ArtifactError

    errors: list[str] = []

    def call():
        try:
            isolate.call_isolated("os:system", "sleep 60")
        except ArtifactError as e:
            errors.append(str(e))

    t = threading.Thread(target=call)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(_children(c) for c in _isolated(os.getpid())):
            time.sleep(0.05)
        group = _isolated(os.getpid())
        group += [g for c in group for g in _descendants(c)]  # python -> sh -> sleep
        assert len(group) >= 2, group
        t0 = time.monotonic()
        isolate.end_children()
        t.join(timeout=isolate.GRACE_S + 10)
        assert not t.is_alive() and time.monotonic() - t0 < isolate.GRACE_S + 5
        assert _gone(group) == [] and errors, errors
        with pytest.raises(ArtifactError, match="not started"):
            isolate.call_isolated("os:getpid")
    finally:
        isolate.end_children()
        t.join(timeout=30)
        isolate.reset()
    assert isolate.call_isolated("os:getcwd")  # runs again after reset()
    # the parent SIGKILLed: its child does not run on
    parent = subprocess.Popen([sys.executable, "-c", "from edgeseg.isolate import call_isolated; "
                               "call_isolated('time:sleep', 60)"], env=_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _children(parent.pid):
            time.sleep(0.05)
        kids = _children(parent.pid)
        time.sleep(1.0)  # past the child's start-up, where it asks for the signal
        parent.kill()
        parent.wait()
        assert kids and _gone(kids, within=5) == []
    finally:
        for k in _children(parent.pid):
            os.kill(k, signal.SIGKILL)


# ================================================================================================= memory

def _big_camvid(root: Path, n: int) -> Path:
    for sub in ("val", "valannot"):
        (root / sub).mkdir(parents=True)
    img = np.zeros((n, n, 3), np.uint8)
    img[: n // 2] = (230, 130, 70)
    lab = np.zeros((n, n), np.uint8)
    lab[n // 2:] = 3
    lab[:, : n // 8] = 11  # ignored
    cv2.imwrite(str(root / "val" / "big.png"), img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    cv2.imwrite(str(root / "valannot" / "big.png"), lab, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return root


def _eval_peak_mb(ckpt: Path, data: Path, js: Path) -> float:
    proc = subprocess.Popen(cli_cmd("eval", "--checkpoint", ckpt, "--data", data, "--no-progress", "--json", js),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 0, err[-2000:]
    return usage.ru_maxrss / 1024


def test_eval_of_a_huge_image_stays_within_bounded_memory(ckpt, tmp_path):
    """4000x4000, 11 classes: the full-size float logits alone are 704 MB (a 10000x10000 image took 10.4 GB).
    Peak over the same run on a 64x64 image: < 40 bytes per pixel (image, label and decoding), was ~100."""
    n = 4000
    small = _big_camvid(tmp_path / "small", 64)
    big = _big_camvid(tmp_path / "big", n)
    base = _eval_peak_mb(ckpt, small, tmp_path / "small.json")
    peak = _eval_peak_mb(ckpt, big, tmp_path / "big.json")
    assert peak - base < 40 * n * n / 2 ** 20, (base, peak)
    res = json.loads((tmp_path / "big.json").read_text())
    assert res["num_pixels"] == n * n - n * (n // 8)  # every labelled pixel counted, the ignored ones not


def test_tiled_upsample_argmax_is_the_protocol(ckpt, monkeypatch):
    """Row tiles give the classes of the full-size bilinear upsample + argmax, and eval on the embedded CamVid
    frames gives the same metrics through the tiled path as through the untiled one."""
    import torch.nn.functional as F

    from edgeseg.checkpoint import load_checkpoint
    from edgeseg.data.embedded import default_data_dir
    from edgeseg.data.formats import open_dataset
    from edgeseg.eval import evaluate as ev

    g = torch.Generator().manual_seed(0)
    for k, h, w, out_hw in ((11, 90, 120, (360, 480)), (5, 17, 23, (100, 301)), (3, 50, 50, (37, 41))):
        logits = torch.randn(1, k, h, w, generator=g)
        ref = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)[0].numpy().argmax(0)
        tiles = list(ev.argmax_tiles(logits, out_hw, tile_bytes=4 * k * out_hw[1] * 7))
        assert len(tiles) > 1 and [y0 for y0, _ in tiles] == list(range(0, out_hw[0], 7))
        got = np.concatenate([rows for _, rows in tiles])
        assert got.shape == ref.shape and (got != ref).mean() < 1e-4
    model, spec = load_checkpoint(ckpt)
    ds = open_dataset(default_data_dir(), split="val")
    args = (ev.torch_predictor(model), ds, spec.input_hw, spec.mean, spec.std)
    untiled = ev.evaluate(*args, progress=False)
    monkeypatch.setattr(ev, "TILE_ABOVE_BYTES", 0)
    monkeypatch.setattr(ev, "TILE_BYTES", 4 * 11 * 480 * 16)
    tiled = ev.evaluate(*args, progress=False)
    assert abs(tiled["miou"] - untiled["miou"]) < 1e-6 and tiled["num_pixels"] == untiled["num_pixels"]
    assert np.abs(np.asarray(tiled["confusion"]) - np.asarray(untiled["confusion"])).sum() <= 1e-5 * \
        untiled["num_pixels"]


TRAIN = ["train", "--model", "tiny_ops", "--data", "DATA", "--iters", "1", "--batch-size", "1", "--no-progress"]


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--input-size", "8192x8192"], "--input-size"),
    (["pipeline", "--input-size", "4128x4128", "--out", "o"], "--input-size"),
    (["export", "--checkpoint", "CKPT", "--target", "onnx", "--input-size", "8192x512", "--out", "o"], "--input-size"),
    (TRAIN + ["--input-size", "5000x5000", "--out", "o"], "--input-size"),
    (TRAIN + ["--input-size", "100x100", "--out", "o"], "--input-size"),  # not what eval/export run: /32
    (["import", "--from", "offseg", "SRC", "--model", "offseg_t", "--input-size", "500x500", "--out", "o"],
     "--input-size"),
    (["validate", "CKPT", "--data", "DATA", "--boundary-px", "-3"], "--boundary-px -3"),
    (["demo", "--threads", "0", "--source", "nothing", "--headless"], "--threads 0"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_usage_errors_before_any_work(argv, needle, ckpt, data, tmp_path, capsys, monkeypatch):
    """An --input-size beyond what the models can run (> 4096 per side, or not a multiple of 32 where the
    checkpoint is evaluated and exported at it), a negative --boundary-px, --threads 0: exit 2, one line."""
    monkeypatch.chdir(tmp_path)
    names = {"CKPT": str(ckpt), "DATA": str(data), "SRC": str(ckpt / "model.safetensors")}
    assert main([names.get(a, a) for a in argv]) == 2
    _one_line_error(capsys.readouterr().err, needle)
    assert os.listdir(tmp_path) == []


# ===================================================================================== one clear line each

def test_state_dict_shape_mismatch_names_the_file_and_the_key(ckpt, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(ckpt, ck)
    w = ck / "model.safetensors"
    state = load_file(str(w))
    state["decode_head.cls.weight"] = torch.zeros(7, *state["decode_head.cls.weight"].shape[1:])
    save_file(state, str(w))
    assert main(["eval", "--checkpoint", str(ck), "--no-progress"]) == 1
    _one_line_error(capsys.readouterr().err, w, "decode_head.cls.weight", "[7, 32, 1, 1]", "[11, 32, 1, 1]")


def test_openvino_failure_keeps_openvino_s_reason(work, ckpt, tmp_path):
    """OpenVINO's messages start with source locations ("Exception from src/inference/src/cpp/core.cpp:84:");
    the one line keeps the reason that follows."""
    import openvino as ov

    from edgeseg.errors import ArtifactError, one_line
    from edgeseg.runtime import open_session

    bad = tmp_path / "m.xml"
    bad.write_text("<net>garbage")
    with pytest.raises(RuntimeError) as e:
        ov.Core().read_model(str(bad))
    assert str(e.value).startswith("Exception from src/")
    assert "Unable to read the model" in one_line(e.value) and "core.cpp" not in one_line(e.value)
    with pytest.raises(RuntimeError) as e:
        ov.Core().read_model(str(tmp_path / "nope.xml"))
    assert "Could not open the file" in one_line(e.value) and "frontend.cpp" not in one_line(e.value)
    art = _fake_artifact(_pte(work, ckpt), tmp_path / "ov", "openvino", {"model.xml": b"<net>garbage",
                                                                         "model.bin": b"\0" * 16})
    with pytest.raises(ArtifactError) as e:
        open_session(art)
    assert "Unable to read the model" in str(e.value) and "core.cpp" not in str(e.value), str(e.value)


def test_train_with_a_failed_init_or_nan_lr_leaves_no_output_folder(ckpt, data, tmp_path, capsys):
    base = ["train", "--model", "tiny_ops", "--data", str(data), "--iters", "1", "--batch-size", "1",
            "--device", "cpu", "--no-progress", "--workers", "1"]
    (tmp_path / "empty_ckpt").mkdir()
    for extra, code, needle in ((["--init", str(tmp_path / "empty_ckpt")], 2, "--init"),
                                (["--init", str(ckpt / "model.json")], 1, "model.json"),
                                (["--lr", "nan"], 2, "--lr nan"), (["--lr", "-1"], 2, "--lr -1")):
        out = tmp_path / "runs" / "o"
        assert main(base + extra + ["--out", str(out)]) == code, extra
        _one_line_error(capsys.readouterr().err, needle)
        assert not out.exists(), extra
    assert sorted(os.listdir(tmp_path)) == ["empty_ckpt"] + (["runs"] if (tmp_path / "runs").exists() else [])


def test_import_of_a_plain_pickle_prints_one_line_and_no_torch_warning(tmp_path):
    src = tmp_path / "plain.pth"
    with open(src, "wb") as f:  # pickle protocol 4: torch warns about it before refusing the file
        pickle.dump({"state_dict": {"decode_head.conv_seg.weight": [0.0] * 8}}, f, protocol=4)
    p = _run(["import", "--from", "offseg", src, "--model", "offseg_t", "--out", tmp_path / "o"], tmp_path)
    assert p.returncode == 1
    line = _one_line_error(p.stderr, src, "refused to load")
    assert "weights_only` set to `False`" not in line  # torch's advice to unpickle it anyway is not ours
    assert not (tmp_path / "o").exists()


def _pte(work: Path, ckpt: Path) -> Path:
    """An ExecuTorch fp32 artifact of the tiny CamVid checkpoint (made once for the module)."""
    art = work / "et-fp32"
    if not (art / "manifest.json").is_file():
        from edgeseg.export import export_checkpoint, get_exporter

        missing = get_exporter("executorch-xnnpack").check_environment()
        if missing:
            pytest.skip(f"executorch: missing {missing}")
        torch.set_num_threads(1)
        export_checkpoint(ckpt, "executorch-xnnpack", "fp32", out=art, progress=False)
    return art


CHATTER = ("cpuinfo_utils.cpp", "threadpool.cpp", "torchao", "triton")


def test_bench_and_validate_of_a_pte_keep_runtime_chatter_in_the_vendor_log(work, ckpt, data, tmp_path):
    art = _pte(work, ckpt)
    for argv in (["bench", art, "--runs", "1", "--warmup", "0", "--no-progress"],
                 ["validate", art, "--data", data, "--no-progress"]):
        p = _run(argv, tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        lines = p.stderr.strip().splitlines()
        assert not [ln for ln in lines if any(c in ln for c in CHATTER)], p.stderr[-3000:]
        assert lines[-1].startswith("vendor log: "), p.stderr[-3000:]
        log = Path(lines[-1].removeprefix("vendor log: "))
        assert log.parent == tmp_path and any(c in log.read_text() for c in CHATTER)


def test_class_names_are_printed_without_terminal_escape_sequences(ckpt, data, tmp_path):
    ck = tmp_path / "ck"
    import shutil

    shutil.copytree(ckpt, ck)
    spec = json.loads((ck / "model.json").read_text())
    spec["class_names"][0] = "Sky\x1b[2J\x1b]0;pwned\x07"
    spec["class_names"][1] = "Build\u202eing"
    (ck / "model.json").write_text(json.dumps(spec))
    p = _run(["eval", "--checkpoint", ck, "--data", data, "--no-progress"], tmp_path)
    assert "\x1b" not in p.stdout + p.stderr and "\x07" not in p.stdout + p.stderr
    assert "\u202e" not in p.stdout + p.stderr
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Sky\\x1b[2J\\x1b]0;pwned\\x07" in p.stdout and "Build\\u202eing" in p.stdout
