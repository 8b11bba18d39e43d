"""The live demo (edgeseg.demo.app, `edgeseg demo`): headless runs over a real video made from the embedded CamVid
frames with a tiny real torch checkpoint, recording, overlay colours, --compare, bad sources, stream loss with
reconnects, the no-display fallback, and a real window under Xvfb (skipped only when Xvfb is not installed).

Windowed runs happen in subprocesses: OpenCV's Qt build aborts the whole process when it cannot open a display.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

from edgeseg.cli import main

TINY = "demo_tiny_seg"  # not test_*: must not join the registry-parametrised model tests
CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian",
           "bicyclist")
PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
           (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
FRAME_W, FRAME_H, N_FRAMES = 96, 72, 8
HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


class _TinySeg(nn.Module):
    """Stride-4 conv net: enough to give a varied class map on real frames, fast on 2 cores."""

    output_stride = 4

    def __init__(self, num_classes: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.decode_head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


def register_tiny() -> None:
    """Register the tiny model once (lazily: at test time, never at collection)."""
    from edgeseg.models.registry import list_models, register_model

    if TINY not in list_models(TINY):
        def demo_tiny_seg(num_classes: int, **kw) -> nn.Module:
            """Tiny stride-4 conv net for the demo tests."""
            return _TinySeg(num_classes)

        register_model(demo_tiny_seg)


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.models import create_model
    from edgeseg.types import ModelSpec

    register_tiny()
    torch.manual_seed(seed)
    model = create_model(TINY, num_classes=len(CLASSES)).eval()
    spec = ModelSpec(model=TINY, num_classes=len(CLASSES), class_names=CLASSES, palette=PALETTE, ignore_index=11,
                     input_hw=(64, 64))
    return save_checkpoint(path, model, spec, force=True)


def camvid_frames(n: int = N_FRAMES) -> list[np.ndarray]:
    from edgeseg.data.embedded import default_data_dir

    paths = sorted((default_data_dir() / "val").glob("*.jpg"))[:n]
    assert len(paths) == n
    return [cv2.resize(cv2.imread(str(p)), (FRAME_W, FRAME_H), interpolation=cv2.INTER_AREA) for p in paths]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("demo_ckpt") / "tiny")


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo_video") / "clip.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (FRAME_W, FRAME_H))
    assert w.isOpened()
    for f in camvid_frames():
        w.write(f)
    w.release()
    return path


def decode(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames


def _cli_subprocess(args: list[str], env: dict | None = None, timeout: float = 120, **kw):
    """Run `edgeseg <args>` in a fresh interpreter with the tiny model registered (for windowed/display runs)."""
    boot = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('_demo_tests', {str(HERE)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.register_tiny()\n"
            "from edgeseg.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    # SIGINT as a terminal delivers it: a suite started in the background by a shell without job control runs with
    # SIGINT ignored, which the child would inherit (then Ctrl-C never reaches the demo)
    kw.setdefault("preexec_fn", lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.Popen([sys.executable, "-c", boot, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw), timeout


def run_cli_subprocess(args, env=None, timeout=120):
    proc, timeout = _cli_subprocess(args, env)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# ------------------------------------------------------------------------------------------------ headless runs
def test_headless_video_counts_frames_and_records(ckpt, video, tmp_path, capsys):
    out, js = tmp_path / "out.mp4", tmp_path / "summary.json"
    rc = main(["demo", "--artifact", str(ckpt), "--source", str(video), "--headless", "--record", str(out),
               "--json", str(js)])
    printed = capsys.readouterr().out
    assert rc == 0
    s = json.loads(js.read_text())
    assert s["frames"] == N_FRAMES and s["drops"] == 0 and s["stop_reason"] == "end of video"
    assert s["sessions"][0]["target"] == "torch" and s["sessions"][0]["precision"] == "fp32"
    lat = s["sessions"][0]
    assert lat["latency_ms_mean"] > 0 and lat["latency_ms_p90"] > 0
    assert f"frames      {N_FRAMES}" in printed and "p90" in printed
    frames = decode(out)
    assert len(frames) == N_FRAMES == s["record_frames"]
    w, h = s["canvas_size"]
    assert frames[0].shape == (h, w, 3) and w >= FRAME_W and h >= FRAME_H and w % 2 == 0 and h % 2 == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "summary.json"]  # no temporary left


def test_recording_left_by_a_killed_run_is_removed_by_the_next_one(ckpt, video, tmp_path):
    out = tmp_path / "out.mp4"
    # a real Recorder, its process SIGKILLed mid-recording: its hidden temporary stays behind
    kill = ("import os, signal, sys, numpy as np; from pathlib import Path\n"
            "from edgeseg.demo.record import Recorder\n"
            "r = Recorder(Path(sys.argv[1]), 10.0, (64, 48)); r.write(np.zeros((48, 64, 3), np.uint8))\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", kill, str(out)], capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.mp4.tmp-") and not out.exists(), left
    assert main(["demo", "--artifact", str(ckpt), "--source", str(video), "--headless", "--max-frames", "2",
                 "--record", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"] and len(decode(out)) == 2


def test_max_frames_and_existing_outputs_need_force(ckpt, video, tmp_path, capsys):
    js = tmp_path / "s.json"
    assert main(["demo", "--artifact", str(ckpt), "--source", str(video), "--headless", "--max-frames", "3",
                 "--json", str(js)]) == 0
    assert json.loads(js.read_text())["frames"] == 3
    capsys.readouterr()
    assert main(["demo", "--artifact", str(ckpt), "--source", str(video), "--headless", "--json", str(js)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["demo", "--artifact", str(ckpt), "--source", str(video), "--headless", "--json", str(js),
                 "--force"]) == 0
    assert json.loads(js.read_text())["frames"] == N_FRAMES


def test_overlay_colours_match_model_class_map(ckpt, video):
    from edgeseg.demo.app import run_demo
    from edgeseg.runtime import open_session

    seen = {}

    def grab(info):
        if info.index == 2:
            seen.update(frame=info.frame_bgr.copy(), canvas=info.canvas.copy(), origin=info.renderer.pane_origin(0))

    alpha = 0.6
    run_demo([open_session(ckpt)], str(video), headless=True, alpha=alpha, on_frame=grab)
    frame, canvas = seen["frame"], seen["canvas"]
    # the class map from an independent session on the same (decoded) frame
    cmap = open_session(ckpt).segment(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    assert cmap.shape == frame.shape[:2]
    assert len(np.unique(cmap)) >= 2, "the tiny model must predict several classes for this test to mean anything"
    colour_bgr = np.array([(b, g, r) for r, g, b in PALETTE], np.float64)[cmap]
    expected = (1 - alpha) * frame.astype(np.float64) + alpha * colour_bgr
    x, y = seen["origin"]
    got = canvas[y:y + FRAME_H, x:x + FRAME_W].astype(np.float64)
    assert np.abs(got - expected).max() <= 1.0
    # and a wrong palette order (RGB instead of BGR) would be caught
    wrong = (1 - alpha) * frame + alpha * np.array(PALETTE, np.float64)[cmap]
    assert np.abs(got - wrong).max() > 10


def test_compare_same_artifact_agrees_fully(ckpt, video, tmp_path):
    js, out = tmp_path / "cmp.json", tmp_path / "cmp.mp4"
    rc = main(["demo", "--artifact", str(ckpt), "--compare", str(ckpt), "--source", str(video), "--headless",
               "--max-frames", "4", "--record", str(out), "--json", str(js)])
    assert rc == 0
    s = json.loads(js.read_text())
    assert s["frames"] == 4 and len(s["sessions"]) == 2
    assert s["agreement_mean"] == 1.0 and s["agreement_min"] == 1.0
    frames = decode(out)
    assert len(frames) == 4 and frames[0].shape[1] >= 2 * FRAME_W


def test_compare_different_models_agreement_below_one(ckpt, video, tmp_path):
    other = make_checkpoint(tmp_path / "other", seed=1)
    js = tmp_path / "cmp.json"
    assert main(["demo", "--artifact", str(ckpt), "--compare", str(other), "--source", str(video), "--headless",
                 "--max-frames", "2", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["agreement_mean"] < 1.0


def test_folder_of_images_source(ckpt, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(camvid_frames(5)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), f)
    (folder / "notes.txt").write_text("not an image")
    js = tmp_path / "s.json"
    assert main(["demo", "--artifact", str(ckpt), "--source", str(folder), "--headless", "--json", str(js)]) == 0
    s = json.loads(js.read_text())
    assert s["frames"] == 5 and s["stop_reason"] == "end of images"


def test_embedded_default_clip_when_no_source(ckpt, tmp_path):
    js = tmp_path / "s.json"
    assert main(["demo", "--artifact", str(ckpt), "--headless", "--max-frames", "3", "--json", str(js)]) == 0
    s = json.loads(js.read_text())
    assert s["frames"] == 3 and s["source"] == "embedded CamVid clip"


def test_sigint_finalises_the_recording(ckpt, tmp_path):
    long_video = tmp_path / "long.mp4"
    w = cv2.VideoWriter(str(long_video), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (FRAME_W, FRAME_H))
    frames = camvid_frames()
    for i in range(3000):
        w.write(frames[i % len(frames)])
    w.release()
    out, js = tmp_path / "rec" / "out.mp4", tmp_path / "s.json"
    proc, _ = _cli_subprocess(["demo", "--artifact", str(ckpt), "--source", str(long_video), "--headless",
                               "--record", str(out), "--json", str(js)], env=_env())
    try:
        # wait until frames reach the temporary recording (slow on a loaded machine: model load, first frames)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if out.parent.is_dir() and any(p.stat().st_size > 0 for p in out.parent.iterdir()):
                break
            time.sleep(0.05)
        time.sleep(1.0)  # a few frames into the recording
        assert proc.poll() is None, "the demo finished before it could be interrupted"
        assert not out.exists()  # while recording, only the temporary name exists
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    s = json.loads(js.read_text())
    assert s["stop_reason"] == "interrupted" and 0 < s["frames"] < 3000
    assert [p.name for p in out.parent.iterdir()] == ["out.mp4"]
    assert len(decode(out)) == s["frames"] == s["record_frames"]


# ------------------------------------------------------------------------------------------------ bad sources
def test_missing_camera_is_a_clear_error(ckpt, capsys):
    index = next(i for i in range(9, 64) if not os.path.exists(f"/dev/video{i}"))
    rc = main(["demo", "--artifact", str(ckpt), "--source", str(index), "--headless"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("edgeseg: error: ") and f"camera {index}" in err and len(err.strip().splitlines()) == 1


def test_unreadable_file_is_a_clear_error(ckpt, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00not a video at all" * 50)
    out = tmp_path / "rec.mp4"
    rc = main(["demo", "--artifact", str(ckpt), "--source", str(bad), "--headless", "--record", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and str(bad) in err and "unreadable" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_missing_path_is_a_clear_error(ckpt, tmp_path, capsys):
    rc = main(["demo", "--artifact", str(ckpt), "--source", str(tmp_path / "nope.mp4"), "--headless"])
    assert rc == 1 and "nope.mp4" in capsys.readouterr().err


class _OnceHandler(http.server.BaseHTTPRequestHandler):
    """Serves the clip to the first request; later requests (reconnects) get 404 — the stream is gone."""

    body = b""
    served = 0

    def do_GET(self):  # noqa: N802
        cls = type(self)
        if cls.served == 0:
            cls.served += 1
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(cls.body)))
            self.end_headers()
            self.wfile.write(cls.body)
        else:
            cls.served += 1
            self.send_error(404)

    def do_HEAD(self):  # noqa: N802
        self.send_error(404)

    def log_message(self, *a):
        pass


def test_stream_lost_reconnects_then_exits_with_summary(ckpt, video, tmp_path, capsys):
    handler = type("H", (_OnceHandler,), {"body": video.read_bytes(), "served": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    js, out = tmp_path / "s.json", tmp_path / "rec.mp4"
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/clip.mp4"
        rc = main(["demo", "--artifact", str(ckpt), "--source", url, "--headless", "--reconnect-retries", "2",
                   "--retry-delay", "0.05", "--record", str(out), "--json", str(js)])
    finally:
        server.shutdown()
    cap = capsys.readouterr()
    assert rc == 1
    assert "stream lost; gave up after 2 reconnect attempts" in cap.err
    s = json.loads(js.read_text())
    # live source: latest frame wins, so frames processed + frames dropped = frames delivered
    assert s["frames"] >= 1 and s["frames"] + s["drops"] == N_FRAMES
    assert s["stop_reason"] == "source lost" and handler.served == 3  # first GET + 2 reconnects
    assert "frames" in cap.out  # the summary is printed before the error
    assert len(decode(out)) == s["frames"]  # what was recorded is finalised, not lost


def test_unreachable_stream_is_a_clear_error(ckpt, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    rc = main(["demo", "--artifact", str(ckpt), "--source", f"http://127.0.0.1:{port}/x.mp4", "--headless",
               "--reconnect-retries", "1", "--retry-delay", "0.01"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot connect to the stream" in err


# ------------------------------------------------------------------------------------------------ displays
def _env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(kw)
    return env


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="DISPLAY-based detection is Linux/BSD only")
def test_no_display_runs_headless_instead_of_aborting(ckpt, video, tmp_path):
    js = tmp_path / "s.json"
    rc, out, err = run_cli_subprocess(["demo", "--artifact", str(ckpt), "--source", str(video), "--max-frames",
                                       "2", "--json", str(js)], env=_env())
    assert rc == 0, err
    assert "no display" in err and "running headless" in err
    s = json.loads(js.read_text())
    assert s["frames"] == 2 and s["headless"] is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="X11 only")
def test_dead_x_display_is_probed_not_fatal(ckpt, video, tmp_path):
    # DISPLAY points at a server that does not exist: only the probe subprocess may die, not the demo
    dead = next(n for n in range(250, 400) if not os.path.exists(f"/tmp/.X11-unix/X{n}"))
    js = tmp_path / "s.json"
    rc, out, err = run_cli_subprocess(["demo", "--artifact", str(ckpt), "--source", str(video), "--max-frames",
                                       "2", "--json", str(js)], env=_env(DISPLAY=f":{dead}"))
    assert rc == 0, err
    assert "cannot open a window" in err and json.loads(js.read_text())["frames"] == 2


def read_xwd(path: Path) -> np.ndarray:
    """Decode an `xwd` dump of a TrueColor ZPixmap with 24 or 32 bits per pixel (Xvfb's 24-bit screens) to BGR."""
    data = path.read_bytes()
    hdr = np.frombuffer(data[:100], ">u4")
    header_size, fmt, depth, width, height = (int(v) for v in hdr[[0, 2, 3, 4, 5]])
    byte_order, bpp, bytes_per_line = int(hdr[7]), int(hdr[11]), int(hdr[12])
    masks, ncolors = hdr[[14, 15, 16]], int(hdr[19])
    assert fmt == 2 and bpp in (24, 32) and depth == 24, f"unsupported xwd: format {fmt}, {bpp} bpp, depth {depth}"
    nb = bpp // 8
    off = header_size + 12 * ncolors
    raw = np.frombuffer(data[off:off + bytes_per_line * height], np.uint8).reshape(height, bytes_per_line)
    raw = raw[:, :width * nb].reshape(height, width, nb).astype(np.uint32)
    order = range(nb) if byte_order == 0 else reversed(range(nb))  # 0 = LSBFirst
    px = np.zeros((height, width), np.uint32)
    for shift, i in enumerate(order):
        px |= raw[..., i] << np.uint32(8 * shift)
    out = np.zeros((height, width, 3), np.uint8)
    for ch, mask in zip((2, 1, 0), masks):  # red, green, blue masks -> BGR channels
        shift = (int(mask) & -int(mask)).bit_length() - 1
        out[..., ch] = (px & np.uint32(mask)) >> np.uint32(shift)
    return out


def _start_xvfb() -> tuple[subprocess.Popen, str]:
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb is not installed (apt-get install -y xvfb x11-apps)")
    for n in range(99, 160):
        if os.path.exists(f"/tmp/.X{n}-lock") or os.path.exists(f"/tmp/.X11-unix/X{n}"):
            continue
        proc = subprocess.Popen([xvfb, f":{n}", "-screen", "0", "800x600x24", "-br", "-nolisten", "tcp"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            # the socket appears before the server takes clients on a loaded machine ("xwd: unable to open
            # display" was seen): ready is when a client can read the root window
            if os.path.exists(f"/tmp/.X11-unix/X{n}") and subprocess.run(
                    ["xwd", "-root", "-silent", "-display", f":{n}", "-out", os.devnull],
                    capture_output=True, timeout=30).returncode == 0:
                return proc, f":{n}"
            time.sleep(0.1)
        proc.kill()
        proc.wait()
    pytest.fail("could not start Xvfb on any display :99..:159")


def test_window_under_xvfb_shows_overlay_and_legend(tmp_path):
    if shutil.which("xwd") is None:
        pytest.skip("xwd is not installed (apt-get install -y x11-apps)")
    xvfb, display = _start_xvfb()
    demo = None
    try:
        ckpt_dir, palette = make_checkpoint(tmp_path / "ckpt"), PALETTE
        if os.environ.get("EDGESEG_UPDATE_SCREENSHOT") == "1":  # docs/demo.png: the shipped model when there is one
            from edgeseg.checkpoint import load_spec
            from edgeseg.data.embedded import default_checkpoint
            from edgeseg.errors import ArtifactError

            try:
                ckpt_dir = default_checkpoint()
                palette = load_spec(ckpt_dir).palette
            except ArtifactError:
                pass
        js = tmp_path / "s.json"
        # no --source: the embedded CamVid clip, which loops while a window is shown; we stop it with SIGINT
        demo, _ = _cli_subprocess(["demo", "--artifact", str(ckpt_dir), "--max-frames", "100000", "--json", str(js)],
                                  env=_env(DISPLAY=display))
        shot = tmp_path / "screen.xwd"
        screen = None
        refused: list[str] = []  # xwd's complaints, for the failure message
        deadline = time.monotonic() + 180  # a loaded machine (the export prefetch on the other core) is slow to map it

        def legend_missing(img):  # the palette colours not (yet) on screen, each needs >= 50 exact pixels
            flat = img.reshape(-1, 3)
            return [c for c in palette if ((flat == c[::-1]).all(axis=1)).sum() < 50]

        # poll until the window shows every legend colour (a loaded machine may map the window frames before the
        # first overlay is drawn), then one more second of frames
        while time.monotonic() < deadline and demo.poll() is None:
            time.sleep(0.5)
            grab = subprocess.run(["xwd", "-root", "-silent", "-display", display, "-out", str(shot)],
                                  capture_output=True, text=True, timeout=30)
            if grab.returncode != 0:  # a busy server may refuse one client; a dead one fails the test
                assert xvfb.poll() is None, f"Xvfb exited ({xvfb.returncode}); xwd: {grab.stderr.strip()}"
                refused.append(grab.stderr.strip())
                continue
            img = read_xwd(shot)
            if (img.max(axis=2) > 0).mean() > 0.05:  # something covers >5% of the black root window
                screen = img
                if not legend_missing(img):
                    time.sleep(1.0)
                    subprocess.run(["xwd", "-root", "-silent", "-display", display, "-out", str(shot)],
                                   check=True, timeout=30)
                    screen = read_xwd(shot)
                    break
        assert demo.poll() is None, f"demo exited early: {demo.communicate()[1][-2000:]}"
        assert screen is not None, (f"no window appeared on the Xvfb screen {display}; {len(refused)} grab(s) "
                                    f"refused, last: {refused[-1] if refused else 'none'}")
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=60)
        assert demo.returncode == 130, err  # interrupted, summary still printed
        assert "running headless" not in err and "window 'edgeseg demo' opened" in err
        s = json.loads(js.read_text())
        assert s["headless"] is False and s["frames"] >= 2
        # the window shows the legend swatches: every class colour appears exactly on screen
        ys, xs = np.nonzero(screen.max(axis=2) > 0)
        window = screen[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert not legend_missing(window), f"legend colours {legend_missing(window)} not on screen"
        png = tmp_path / "demo.png"
        cv2.imwrite(str(png), window)
        if os.environ.get("EDGESEG_UPDATE_SCREENSHOT") == "1":
            shutil.copy(png, REPO / "docs" / "demo.png")
    finally:
        if demo is not None and demo.poll() is None:
            demo.kill()
            demo.communicate()
        xvfb.terminate()
        xvfb.wait(timeout=10)
