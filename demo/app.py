"""Live segmentation demo (OpenCV): capture → Session.segment → overlay + legend + HUD → window and/or mp4.

One job: show a segmentation artifact running on a live source. It runs any artifact through
`edgeseg.runtime.open_session` (PyTorch checkpoint, ExecuTorch, OpenVINO, ONNX Runtime) and only calls
`session.segment(image_rgb) -> (H, W) uint8 class map` and reads `session.manifest`; letterboxing/resizing to
the artifact's static input is the session's job. Must not import export/ or train/.

Pipeline:
- A capture thread reads the source into a one-frame slot. For live sources (camera, RTSP/HTTP stream) the newest
  frame overwrites an unconsumed one (counted as a drop), so the display never lags behind the camera. For
  finite sources (video file, image folder, the embedded clip) the reader waits instead, so every frame is shown.
- Lost camera/stream: bounded reconnects (`reconnect_retries`), then a clean stop with the summary.
- Headless decision (made BEFORE any window call, because OpenCV's Qt build aborts the whole process when it
  cannot open a display — no exception to catch): `--headless`; else on Linux/BSD no `DISPLAY` and no
  `WAYLAND_DISPLAY` means headless; else a probe subprocess creates and destroys a window — if it dies (Qt abort,
  a dead X server, an OpenCV build without GUI) we run headless. The probe costs one short Python start-up.
- Recording writes `.<name>.tmp-<pid>.mp4` beside the target and renames it into place when the run ends
  (normal end, q/Esc, end of stream or Ctrl-C/SIGTERM), so an interrupted run never leaves a half file under the
  final name; a failure removes the temporary file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import cv2
import numpy as np

from edgeseg.errors import EdgesegError, UsageError

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
WINDOW = "edgeseg demo"
KEY_ESC = 27
HUD_H = 62  # px: three text lines under each pane
LEGEND_W = 150
LEGEND_ROW_H = 18
FOOTER_H = 24  # compare mode: agreement line
_FONT = cv2.FONT_HERSHEY_SIMPLEX


class SourceError(EdgesegError):
    """The video source is missing, unreadable or was lost (exit 1)."""


class SegSession(Protocol):
    """What the demo needs from a runtime session (edgeseg.runtime.Session satisfies it)."""

    manifest: Any  # edgeseg.export.base.Manifest: target, precision, class_names, palette

    def segment(self, image_rgb: np.ndarray) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------------- sources
@dataclasses.dataclass
class SourceSpec:
    """A parsed `--source`: kind is camera | stream | video | folder | embedded."""

    kind: str
    target: Any  # camera index, URL, Path, or list[Path]
    label: str

    @property
    def live(self) -> bool:
        return self.kind in ("camera", "stream")


def parse_source(source: str | int | None) -> SourceSpec:
    """Turn `--source` into a SourceSpec. None → the embedded CamVid clip.

    Raises:
        SourceError: a path that does not exist, a folder without images.
    """
    if source is None or source == "":
        from edgeseg.data.embedded import default_data_dir

        frames = _list_images(default_data_dir() / "val")
        return SourceSpec("embedded", frames, "embedded CamVid clip")
    s = str(source).strip()
    if re.fullmatch(r"\d+", s):
        return SourceSpec("camera", int(s), f"camera {s}")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s):
        return SourceSpec("stream", s, s)
    p = Path(s).expanduser()
    if p.is_dir():
        frames = _list_images(p)
        if not frames:
            raise SourceError(f"--source {s}: folder holds no images ({', '.join(IMAGE_EXTS)})")
        return SourceSpec("folder", frames, str(p))
    if p.is_file():
        return SourceSpec("video", p, str(p))
    raise SourceError(f"--source {s}: no such file, folder or camera index")


def _list_images(folder: Path) -> list[Path]:
    return sorted(q for q in folder.iterdir() if q.suffix.lower() in IMAGE_EXTS and q.is_file())


def _quiet_opencv() -> None:
    # OpenCV logs a warning per failed camera probe; our own one-line error says it better.
    with contextlib.suppress(Exception):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class _Reader:
    """Frame reader for one SourceSpec: `open()`, `read() -> BGR uint8 | None`, `close()`, `fps`."""

    def __init__(self, spec: SourceSpec, loop: bool = False):
        self.spec = spec
        self.loop = loop
        self.cap: cv2.VideoCapture | None = None
        self.index = 0
        self.fps = 0.0

    def open(self) -> bool:
        if self.spec.kind in ("folder", "embedded"):
            self.index = 0
            self.fps = 10.0
            return True
        _quiet_opencv()
        if self.spec.kind == "camera":
            cap = cv2.VideoCapture(int(self.spec.target))
        else:
            cap = cv2.VideoCapture(str(self.spec.target))
        if not cap.isOpened():
            cap.release()
            return False
        if self.spec.kind == "camera":
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # we keep our own one-frame buffer
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        self.fps = fps if 1.0 <= fps <= 240.0 else 0.0
        self.cap = cap
        return True

    def read(self) -> np.ndarray | None:
        if self.spec.kind in ("folder", "embedded"):
            frames: list[Path] = self.spec.target
            if self.index >= len(frames):
                if not self.loop:
                    return None
                self.index = 0
            path = frames[self.index]
            self.index += 1
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                raise SourceError(f"{path}: unreadable or not an image")
            return img
        assert self.cap is not None
        ok, frame = self.cap.read()
        if not ok or frame is None:
            return None
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        return frame

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class FrameGrabber:
    """Reads a source on its own thread into a one-frame slot.

    live=True: a new frame replaces an unconsumed one (counted in `drops`) — latest frame wins.
    live=False: the reader waits until the slot is free, so no frame is skipped (files, folders).
    On read failure of a live source it reconnects up to `reconnect_retries` times, `retry_delay_s` apart.
    `get()` returns the next frame, or None once the source has ended; `end_reason`/`error` say why.
    """

    def __init__(self, reader: _Reader, live: bool, reconnect_retries: int = 3, retry_delay_s: float = 1.0):
        self.reader = reader
        self.live = live
        self.reconnect_retries = reconnect_retries
        self.retry_delay_s = retry_delay_s
        self.drops = 0
        self.frames_read = 0
        self.reconnects = 0
        self.end_reason = ""
        self.error: str | None = None
        self._slot: np.ndarray | None = None
        self._done = False
        self._stop = threading.Event()
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="edgeseg-capture", daemon=True)

    def start(self) -> "FrameGrabber":
        self._thread.start()
        return self

    def _put(self, frame: np.ndarray) -> None:
        with self._cv:
            if not self.live:
                while self._slot is not None and not self._stop.is_set():
                    self._cv.wait(0.1)
            elif self._slot is not None:
                self.drops += 1
            self._slot = frame
            self.frames_read += 1
            self._cv.notify_all()

    def _finish(self, reason: str, error: str | None = None) -> None:
        with self._cv:
            self.end_reason = reason
            self.error = error
            self._done = True
            self._cv.notify_all()

    def _run(self) -> None:
        label = self.reader.spec.label
        try:
            while not self._stop.is_set():
                frame = self.reader.read()
                if frame is not None:
                    self._put(frame)
                    continue
                if not self.live:
                    self._finish("end of " + ("video" if self.reader.spec.kind == "video" else "images"))
                    return
                if not self._reconnect():
                    what = "camera" if self.reader.spec.kind == "camera" else "stream"
                    self._finish("source lost", f"{label}: {what} lost; gave up after "
                                                f"{self.reconnect_retries} reconnect attempts")
                    return
            self._finish("stopped")
        except EdgesegError as e:
            self._finish("error", str(e))
        except Exception as e:  # noqa: BLE001 - a reader crash must end the run, not hang it
            self._finish("error", f"{label}: {type(e).__name__}: {e}")
        finally:
            self.reader.close()

    def _reconnect(self) -> bool:
        self.reader.close()
        for attempt in range(1, self.reconnect_retries + 1):
            if self._stop.wait(self.retry_delay_s):
                return False
            log.warning("%s: no frame; reconnecting (%d/%d)", self.reader.spec.label, attempt, self.reconnect_retries)
            if self.reader.open():
                self.reconnects += 1
                return True
        return False

    def get(self, timeout_s: float = 0.1, cancel: threading.Event | None = None) -> np.ndarray | None:
        """Next frame; None when the source has ended or `cancel` is set. Waits in slices of `timeout_s`."""
        with self._cv:
            while self._slot is None and not self._done and not (cancel is not None and cancel.is_set()):
                self._cv.wait(timeout_s)
            frame, self._slot = self._slot, None
            self._cv.notify_all()
            return frame

    def stop(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._thread.join(timeout=5.0)


# --------------------------------------------------------------------------------------------------- drawing
def palette_bgr(palette: Sequence[Sequence[int]], n: int = 256) -> np.ndarray:
    """(256, 3) uint8 BGR lookup; classes beyond the palette (ignore index, 255) map to row 0 and are masked."""
    lut = np.zeros((n, 3), np.uint8)
    for i, c in enumerate(list(palette)[:n]):
        lut[i] = (int(c[2]), int(c[1]), int(c[0]))
    return lut


def blend_overlay(frame_bgr: np.ndarray, class_map: np.ndarray, palette: Sequence[Sequence[int]],
                  alpha: float) -> np.ndarray:
    """Blend class colours over a frame: out = round((1 - alpha) * frame + alpha * colour[class]).

    Args:
        frame_bgr: (H, W, 3) uint8 BGR.
        class_map: (H, W) uint8 class indices; indices >= len(palette) (ignore) leave the frame as is.
        palette: RGB colours per class.
        alpha: 0..1 weight of the class colour.
    Returns:
        (H, W, 3) uint8 BGR.
    """
    if class_map.shape != frame_bgr.shape[:2]:
        raise ValueError(f"class map {class_map.shape} does not match frame {frame_bgr.shape[:2]}")
    colour = palette_bgr(palette)[class_map]
    out = cv2.addWeighted(frame_bgr, 1.0 - alpha, colour, alpha, 0.0)
    unlabeled = class_map >= len(palette)
    if unlabeled.any():
        out[unlabeled] = frame_bgr[unlabeled]
    return out


def _text(img: np.ndarray, s: str, org: tuple[int, int], scale: float = 0.45, colour=(255, 255, 255)) -> None:
    cv2.putText(img, s, org, _FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, s, org, _FONT, scale, colour, 1, cv2.LINE_AA)


def draw_legend(class_names: Sequence[str], palette: Sequence[Sequence[int]], height: int) -> np.ndarray:
    """(height, LEGEND_W, 3) BGR panel: a colour swatch and the name of each class."""
    panel = np.full((height, LEGEND_W, 3), 32, np.uint8)
    lut = palette_bgr(palette)
    for i, name in enumerate(class_names):
        y = 6 + i * LEGEND_ROW_H
        if y + LEGEND_ROW_H > height:
            break
        cv2.rectangle(panel, (6, y), (20, y + 12), tuple(int(v) for v in lut[i]), -1)
        _text(panel, str(name)[:18], (26, y + 11), 0.42)
    return panel


@dataclasses.dataclass
class PaneStats:
    """Per-session running numbers shown in the HUD and the summary."""

    name: str
    target: str
    precision: str
    latencies_ms: list[float] = dataclasses.field(default_factory=list)

    def hud_lines(self, fps: float, drops: int) -> list[str]:
        lat = self.latencies_ms[-1] if self.latencies_ms else float("nan")
        return [f"{self.target} | {self.precision} | {self.name}"[:60],
                f"model {lat:6.1f} ms   e2e {fps:5.1f} FPS",
                f"frame drops {drops}"]


class Renderer:
    """Builds the output canvas: one pane per session (frame + overlay, HUD strip below), a legend column at
    the right, and in compare mode a footer with the live pixel agreement. Dimensions are padded to even
    numbers (mp4v needs them)."""

    def __init__(self, frame_hw: tuple[int, int], n_panes: int, class_names: Sequence[str],
                 palette: Sequence[Sequence[int]]):
        self.h, self.w = frame_hw
        self.n = n_panes
        legend_h = 12 + LEGEND_ROW_H * len(class_names)
        self.body_h = max(self.h + HUD_H, legend_h)
        footer = FOOTER_H if n_panes > 1 else 0
        self.canvas_h = _even(self.body_h + footer)
        self.canvas_w = _even(self.w * n_panes + LEGEND_W)
        self.legend = draw_legend(class_names, palette, self.body_h)

    def pane_origin(self, i: int) -> tuple[int, int]:
        """(x, y) of pane i's frame region in the canvas."""
        return i * self.w, 0

    @property
    def size(self) -> tuple[int, int]:
        return self.canvas_w, self.canvas_h

    def render(self, panes: Sequence[np.ndarray], huds: Sequence[list[str]], footer: str | None = None) -> np.ndarray:
        canvas = np.full((self.canvas_h, self.canvas_w, 3), 16, np.uint8)
        for i, (img, lines) in enumerate(zip(panes, huds)):
            x, y = self.pane_origin(i)
            canvas[y:y + self.h, x:x + self.w] = img
            for j, line in enumerate(lines):
                _text(canvas, line, (x + 6, self.h + 18 + 19 * j))
            if i:
                cv2.line(canvas, (x, 0), (x, self.body_h), (200, 200, 200), 1)
        canvas[:self.body_h, self.w * self.n:self.w * self.n + LEGEND_W] = self.legend
        if footer:
            _text(canvas, footer, (6, self.body_h + 17), 0.5, (120, 255, 120))
        return canvas


def _even(v: int) -> int:
    return v + (v % 2)


# --------------------------------------------------------------------------------------------------- headless
def display_available(timeout_s: float = 15.0) -> tuple[bool, str]:
    """Can this process open an OpenCV window? Returns (ok, reason). Never calls a window function itself.

    Linux/BSD with neither DISPLAY nor WAYLAND_DISPLAY: no. Otherwise a subprocess creates and destroys a
    window; if it exits non-zero (Qt's abort without a display, an OpenCV without GUI) or hangs: no.
    """
    if sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd")):
        if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            return False, "no display (DISPLAY and WAYLAND_DISPLAY are unset)"
    probe = ("import cv2\n"
             f"cv2.namedWindow('edgeseg-probe', {cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL})\n"
             "cv2.waitKey(1)\ncv2.destroyAllWindows()\n")
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"opening a window did not finish within {timeout_s:.0f} s"
    if r.returncode != 0:
        tail = (r.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        return False, f"cannot open a window ({tail})"
    return True, "display available"


# --------------------------------------------------------------------------------------------------- recording
class Recorder:
    """mp4 (mp4v) writer that writes a hidden temporary sibling and renames it into place on `finish()`."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        suffix = self.path.suffix or ".mp4"
        self.tmp = self.path.parent / f".{self.path.stem}.tmp-{os.getpid()}{suffix}"
        self.size = size
        self.frames = 0
        self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), size)
        if not self.writer.isOpened():
            self.writer.release()
            self._remove_tmp()
            raise UsageError(f"--record {self.path}: cannot open an mp4v video writer there")

    def write(self, canvas: np.ndarray) -> None:
        self.writer.write(canvas)
        self.frames += 1

    def finish(self) -> Path | None:
        self.writer.release()
        if self.frames == 0:
            self._remove_tmp()
            return None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.writer.release()
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


# --------------------------------------------------------------------------------------------------- the app
@dataclasses.dataclass
class DemoResult:
    """What a run did; `summary()` is what gets printed and written with --json."""

    source: str
    frames: int = 0
    drops: int = 0
    reconnects: int = 0
    wall_s: float = 0.0
    stop_reason: str = ""
    error: str | None = None
    headless: bool = True
    headless_reason: str = ""
    record: str | None = None
    record_frames: int = 0
    canvas_size: tuple[int, int] | None = None
    panes: list[PaneStats] = dataclasses.field(default_factory=list)
    agreement: list[float] = dataclasses.field(default_factory=list)
    snapshots: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        sessions = []
        for p in self.panes:
            lat = np.asarray(p.latencies_ms, np.float64)
            sessions.append({
                "artifact": p.name, "target": p.target, "precision": p.precision,
                "latency_ms_mean": float(lat.mean()) if lat.size else None,
                "latency_ms_p90": float(np.percentile(lat, 90)) if lat.size else None,
            })
        d: dict[str, Any] = {
            "source": self.source, "frames": self.frames, "drops": self.drops, "reconnects": self.reconnects,
            "wall_s": round(self.wall_s, 3), "fps": self.frames / self.wall_s if self.wall_s > 0 else 0.0,
            "stop_reason": self.stop_reason, "error": self.error, "headless": self.headless,
            "record": self.record, "record_frames": self.record_frames,
            "canvas_size": list(self.canvas_size) if self.canvas_size else None, "sessions": sessions,
        }
        if len(self.panes) > 1:
            a = np.asarray(self.agreement, np.float64)
            d["agreement_mean"] = float(a.mean()) if a.size else None
            d["agreement_min"] = float(a.min()) if a.size else None
        return d

    def format_table(self) -> str:
        s = self.summary()
        lines = [f"source      {s['source']}",
                 f"frames      {s['frames']}  (drops {s['drops']}, reconnects {s['reconnects']})",
                 f"e2e FPS     {s['fps']:.2f}  over {s['wall_s']:.2f} s",
                 f"stopped     {s['stop_reason']}"]
        for sess in s["sessions"]:
            mean = sess["latency_ms_mean"]
            p90 = sess["latency_ms_p90"]
            lat = f"mean {mean:.1f} ms  p90 {p90:.1f} ms" if mean is not None else "no frames"
            lines.append(f"model       {sess['target']}/{sess['precision']}  {lat}  ({sess['artifact']})")
        if "agreement_mean" in s and s["agreement_mean"] is not None:
            lines.append(f"agreement   mean {100 * s['agreement_mean']:.2f}%  min {100 * s['agreement_min']:.2f}%")
        if s["record"]:
            lines.append(f"recorded    {s['record']}  ({s['record_frames']} frames)")
        return "\n".join(lines)


@dataclasses.dataclass
class FrameInfo:
    """Passed to `on_frame` after each processed frame."""

    index: int
    frame_bgr: np.ndarray
    class_maps: list[np.ndarray]
    canvas: np.ndarray
    renderer: Renderer


def _manifest_field(session: SegSession, key: str, default: Any = None) -> Any:
    # The manifest is edgeseg.export.base.Manifest (attributes); plain dicts are accepted too.
    m = getattr(session, "manifest", None)
    if isinstance(m, dict):
        return m.get(key, default)
    return getattr(m, key, default)


def _pane_stats(session: SegSession, name: str) -> PaneStats:
    return PaneStats(name=name, target=str(_manifest_field(session, "target", "?")),
                     precision=str(_manifest_field(session, "precision", "?")))


def _manifest_classes(session: SegSession) -> tuple[list[str], list[list[int]]]:
    names = list(_manifest_field(session, "class_names") or [])
    palette = [list(c) for c in (_manifest_field(session, "palette") or [])]
    if not names or len(palette) < len(names):
        raise EdgesegError("artifact manifest lacks class_names/palette; the demo cannot colour its output")
    return names, palette


def run_demo(sessions: Sequence[SegSession], source: str | int | None = None, *,
             names: Sequence[str] | None = None, headless: bool = False, record: str | os.PathLike | None = None,
             max_frames: int | None = None, alpha: float = 0.5, reconnect_retries: int = 3,
             retry_delay_s: float = 1.0, snapshot_dir: str | os.PathLike = ".",
             on_frame: Callable[[FrameInfo], None] | None = None,
             loop_default: bool | None = None) -> DemoResult:
    """Run the demo until the source ends, q/Esc, Ctrl-C/SIGTERM or `max_frames`.

    Args:
        sessions: one session, or two for side-by-side comparison (same frame through both).
        source: camera index, video path, URL, image folder; None → the embedded CamVid clip.
        names: label per session (artifact folder names) for the HUD and summary.
        headless: never open a window (also chosen automatically when no display is usable).
        record: mp4 path for the annotated stream.
        on_frame: called after each frame with a FrameInfo (tests, embedding).
        loop_default: loop the embedded clip (default: only when a window is shown).
    Returns:
        DemoResult; `error` is set (and the summary still complete) when the source was lost or unreadable.
    Raises:
        SourceError: the source cannot be opened at all.
    """
    if not 1 <= len(sessions) <= 2:
        raise UsageError("the demo shows one session, or two with --compare")
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"--alpha {alpha}: must be between 0 and 1")
    names = list(names or [f"session{i}" for i in range(len(sessions))])
    class_names, palette = _manifest_classes(sessions[0])
    palettes = [_manifest_classes(s)[1] for s in sessions]

    spec = parse_source(source)
    result = DemoResult(source=spec.label, panes=[_pane_stats(s, n) for s, n in zip(sessions, names)])
    window = False
    if headless:
        result.headless_reason = "--headless"
    else:
        window, reason = display_available()
        if not window:
            print(f"edgeseg demo: {reason}; running headless", file=sys.stderr)
        result.headless_reason = reason
    result.headless = not window
    loop = (window if loop_default is None else loop_default) and spec.kind == "embedded"

    reader = _Reader(spec, loop=loop)
    if not reader.open():
        kind = {"camera": "camera not found or busy", "stream": "cannot connect to the stream"}.get(
            spec.kind, "unreadable or not a video")
        if spec.kind == "stream":
            for _ in range(reconnect_retries):
                time.sleep(retry_delay_s)
                if reader.open():
                    break
            else:
                raise SourceError(f"--source {spec.label}: {kind} (after {reconnect_retries} retries)")
        else:
            raise SourceError(f"--source {spec.label}: {kind}")
    grabber = FrameGrabber(reader, live=spec.live, reconnect_retries=reconnect_retries,
                           retry_delay_s=retry_delay_s).start()

    stop = threading.Event()
    stop_reason: list[str] = []
    restore = _install_stop_signals(stop, stop_reason)
    recorder: Recorder | None = None
    renderer: Renderer | None = None
    show_overlay = True
    paused = False
    paused_drops = 0
    fps_ema = 0.0
    t_start = time.perf_counter()
    t_prev = t_start
    canvas: np.ndarray | None = None
    try:
        while not stop.is_set():
            if max_frames is not None and result.frames >= max_frames:
                result.stop_reason = f"--max-frames {max_frames}"
                break
            if paused:
                key = cv2.waitKey(30) & 0xFF
                if key in (ord("q"), KEY_ESC) or _window_closed():
                    result.stop_reason = "quit"
                    break
                if key == ord(" "):
                    paused = False
                    grabber.drops = paused_drops  # frames skipped while paused are not drops
                elif key == ord("s") and canvas is not None:
                    result.snapshots.append(str(_snapshot(canvas, snapshot_dir)))
                continue
            frame = grabber.get(cancel=stop)
            if frame is None and stop.is_set():
                continue  # a signal asked to stop: leave through the loop's else
            if frame is None:
                result.stop_reason = grabber.end_reason or "source ended"
                result.error = grabber.error
                break
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            maps = []
            for sess, pane in zip(sessions, result.panes):
                t0 = time.perf_counter()
                cmap = np.asarray(sess.segment(rgb))
                pane.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                if cmap.shape != frame.shape[:2]:
                    raise EdgesegError(f"{pane.name}: segment() returned {cmap.shape}, expected the frame's "
                                       f"{frame.shape[:2]}")
                maps.append(cmap.astype(np.uint8, copy=False))
            if renderer is None or (renderer.h, renderer.w) != frame.shape[:2]:
                if recorder is not None and renderer is not None:
                    raise SourceError(f"--source {spec.label}: frame size changed mid-stream "
                                      f"({renderer.w}x{renderer.h} → {frame.shape[1]}x{frame.shape[0]})")
                renderer = Renderer(frame.shape[:2], len(sessions), class_names, palette)
                result.canvas_size = renderer.size
                if record is not None and recorder is None:
                    recorder = Recorder(Path(record), reader.fps or 15.0, renderer.size)
            now = time.perf_counter()
            dt = now - t_prev
            t_prev = now
            if dt > 0:
                fps_ema = 1.0 / dt if fps_ema == 0.0 else 0.9 * fps_ema + 0.1 / dt
            panes = [blend_overlay(frame, m, pal, alpha) if show_overlay else frame for m, pal in zip(maps, palettes)]
            huds = [p.hud_lines(fps_ema, grabber.drops) for p in result.panes]
            footer = None
            if len(maps) == 2:
                agree = float(np.mean(maps[0] == maps[1]))
                result.agreement.append(agree)
                footer = f"pixel agreement {100 * agree:.2f}%"
            canvas = renderer.render(panes, huds, footer)
            result.frames += 1
            if recorder is not None:
                recorder.write(canvas)
            if on_frame is not None:
                on_frame(FrameInfo(result.frames - 1, frame, maps, canvas, renderer))
            if window:
                if result.frames == 1:
                    cv2.namedWindow(WINDOW, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
                    log.info("window %r opened (q/Esc quit, space pause, o overlay, s snapshot)", WINDOW)
                cv2.imshow(WINDOW, canvas)
                key = cv2.waitKey(1) & 0xFF
                if key in (ord("q"), KEY_ESC) or _window_closed():
                    result.stop_reason = "quit"
                    break
                if key == ord(" "):
                    paused, paused_drops = True, grabber.drops
                elif key == ord("o"):
                    show_overlay = not show_overlay
                elif key == ord("s"):
                    result.snapshots.append(str(_snapshot(canvas, snapshot_dir)))
        else:
            result.stop_reason = stop_reason[0] if stop_reason else "stopped"
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread's handler
        result.stop_reason = "interrupted"
    except BaseException:
        if recorder is not None:
            recorder.abort()
            recorder = None
        raise
    finally:
        result.wall_s = time.perf_counter() - t_start
        grabber.stop()
        restore()
        result.drops = grabber.drops
        result.reconnects = grabber.reconnects
        if window:
            with contextlib.suppress(cv2.error):
                cv2.destroyAllWindows()
                cv2.waitKey(1)
        if recorder is not None:
            written = recorder.finish()
            result.record = str(written) if written else None
            result.record_frames = recorder.frames
    return result


def _window_closed() -> bool:
    try:
        return cv2.getWindowProperty(WINDOW, cv2.WND_PROP_VISIBLE) < 1
    except cv2.error:
        return True


def _snapshot(canvas: np.ndarray, folder: str | os.PathLike) -> Path:
    from edgeseg.fileio import atomic_file

    path = Path(folder) / time.strftime("edgeseg-demo-%Y%m%d-%H%M%S.png")
    n = 1
    while path.exists():
        path = path.with_name(f"{path.stem.split('_')[0]}_{n}.png")
        n += 1
    ok, buf = cv2.imencode(".png", canvas)
    if not ok:
        raise EdgesegError(f"{path}: could not encode the snapshot")
    with atomic_file(path) as f:
        f.write(buf.tobytes())
    print(f"edgeseg demo: saved {path}", file=sys.stderr)
    return path


def _install_stop_signals(stop: threading.Event, reason: list[str]) -> Callable[[], None]:
    """Ctrl-C and SIGTERM end the run like q, between frames, so the recording's frame count is exact.

    A second Ctrl-C raises KeyboardInterrupt at once (for a stuck model). Only possible from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum: int, _frame) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        reason.append("interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)")
        stop.set()

    try:
        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    except (ValueError, OSError):
        return lambda: None

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return restore


# --------------------------------------------------------------------------------------------------- sessions
def open_demo_session(path: str | os.PathLike) -> SegSession:
    """Open an artifact or checkpoint folder with `edgeseg.runtime.open_session`."""
    path = Path(path)
    if not path.exists():
        raise EdgesegError(f"{path}: artifact or checkpoint folder not found")
    from edgeseg.runtime import open_session

    return open_session(path)

