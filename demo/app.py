"""Live segmentation demo (OpenCV): capture → Session.segment → overlay + legend + HUD → window and/or mp4.

One job: show a segmentation artifact running on a live source. It runs any artifact through
`edgeseg.runtime.open_session` (PyTorch checkpoint, ExecuTorch, OpenVINO, ONNX Runtime) and only calls
`session.segment(image_rgb) -> (H, W) uint8 class map` and reads `session.manifest`; letterboxing/resizing to
the artifact's static input is the session's job. Must not import export/ or train/.

Modules: demo/sources.py (parse `--source`, the capture thread: live sources drop stale frames, finite ones
wait; bounded reconnects), demo/render.py (overlay, legend, HUD, canvas; whether a window can open, decided
before any window call), demo/record.py (atomic mp4 recording and snapshots), and this file: the main loop,
keys, signals and the run summary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import cv2
import numpy as np

from edgeseg.demo.record import Recorder, save_snapshot
from edgeseg.demo.render import WINDOW, PaneStats, Renderer, blend_overlay, display_available, window_closed
from edgeseg.demo.sources import FrameGrabber, SourceError, open_reader, parse_source
from edgeseg.errors import EdgesegError, UsageError

__all__ = ["DemoResult", "FrameInfo", "SegSession", "SourceError", "run_demo"]

log = logging.getLogger(__name__)

KEY_ESC = 27


class SegSession(Protocol):
    """What the demo needs from a runtime session (edgeseg.runtime.Session satisfies it)."""

    manifest: Any  # edgeseg.export.base.Manifest: target, precision, class_names, palette

    def segment(self, image_rgb: np.ndarray) -> np.ndarray: ...


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
    for s in sessions:  # a manifest the demo cannot colour fails before the source is opened
        _manifest_classes(s)

    spec = parse_source(source)
    result = DemoResult(source=spec.label, panes=[_pane_stats(s, n) for s, n in zip(sessions, names)])
    window = _choose_window(headless, result)
    loop = (window if loop_default is None else loop_default) and spec.kind == "embedded"
    reader = open_reader(spec, loop, reconnect_retries, retry_delay_s)
    grabber = FrameGrabber(reader, live=spec.live, reconnect_retries=reconnect_retries,
                           retry_delay_s=retry_delay_s).start()
    app = _DemoLoop(sessions, result, grabber, window=window, alpha=alpha, record=record,
                    snapshot_dir=snapshot_dir, on_frame=on_frame)
    stop = threading.Event()
    stop_reason: list[str] = []
    restore = _install_stop_signals(stop, stop_reason)
    t_start = time.perf_counter()
    try:
        app.run(stop, stop_reason, max_frames)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread's handler
        result.stop_reason = "interrupted"
    except BaseException:
        app.abort_recording()
        raise
    finally:
        result.wall_s = time.perf_counter() - t_start
        grabber.stop()
        restore()
        result.drops = grabber.drops
        result.reconnects = grabber.reconnects
        app.close()
    return result


def _choose_window(headless: bool, result: DemoResult) -> bool:
    """Show a window? Decided before any window call (see demo/render.py); the reason goes into `result`."""
    window = False
    if headless:
        result.headless_reason = "--headless"
    else:
        window, reason = display_available()
        if not window:
            print(f"edgeseg demo: {reason}; running headless", file=sys.stderr)
        result.headless_reason = reason
    result.headless = not window
    return window


class _DemoLoop:
    """The frame loop of one run: segment, draw, record, show, and the keys (q/Esc, space, o, s)."""

    def __init__(self, sessions: Sequence[SegSession], result: DemoResult, grabber: FrameGrabber, *, window: bool,
                 alpha: float, record: str | os.PathLike | None, snapshot_dir: str | os.PathLike,
                 on_frame: Callable[[FrameInfo], None] | None):
        self.sessions = sessions
        self.result = result
        self.grabber = grabber
        self.window = window
        self.alpha = alpha
        self.record = record
        self.snapshot_dir = snapshot_dir
        self.on_frame = on_frame
        self.class_names, self.palette = _manifest_classes(sessions[0])
        self.palettes = [_manifest_classes(s)[1] for s in sessions]
        self.recorder: Recorder | None = None
        self.renderer: Renderer | None = None
        self.canvas: np.ndarray | None = None
        self.show_overlay = True
        self.paused = False
        self.paused_drops = 0
        self.fps_ema = 0.0
        self.t_prev = time.perf_counter()

    def run(self, stop: threading.Event, stop_reason: list[str], max_frames: int | None) -> None:
        result = self.result
        while not stop.is_set():
            if max_frames is not None and result.frames >= max_frames:
                result.stop_reason = f"--max-frames {max_frames}"
                return
            if self.paused:
                if self._on_key(cv2.waitKey(30) & 0xFF):
                    return
                continue
            frame = self.grabber.get(cancel=stop)
            if frame is None and stop.is_set():
                continue  # a signal asked to stop: leave through the loop's condition
            if frame is None:
                result.stop_reason = self.grabber.end_reason or "source ended"
                result.error = self.grabber.error
                return
            self._process(frame)
            if self.window and self._show():
                return
        result.stop_reason = stop_reason[0] if stop_reason else "stopped"

    def _on_key(self, key: int) -> bool:
        """Act on a key (or the window being closed); True means quit."""
        if key in (ord("q"), KEY_ESC) or window_closed():
            self.result.stop_reason = "quit"
            return True
        if key == ord(" "):
            if self.paused:
                self.paused = False
                self.grabber.drops = self.paused_drops  # frames skipped while paused are not drops
            else:
                self.paused, self.paused_drops = True, self.grabber.drops
        elif key == ord("o"):
            self.show_overlay = not self.show_overlay
        elif key == ord("s") and self.canvas is not None:
            self.result.snapshots.append(str(save_snapshot(self.canvas, self.snapshot_dir)))
        return False

    def _show(self) -> bool:
        if self.result.frames == 1:
            cv2.namedWindow(WINDOW, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
            log.info("window %r opened (q/Esc quit, space pause, o overlay, s snapshot)", WINDOW)
        cv2.imshow(WINDOW, self.canvas)
        return self._on_key(cv2.waitKey(1) & 0xFF)

    def _segment(self, frame: np.ndarray) -> list[np.ndarray]:
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        maps = []
        for sess, pane in zip(self.sessions, self.result.panes):
            t0 = time.perf_counter()
            cmap = np.asarray(sess.segment(rgb))
            pane.latencies_ms.append((time.perf_counter() - t0) * 1e3)
            if cmap.shape != frame.shape[:2]:
                raise EdgesegError(f"{pane.name}: segment() returned {cmap.shape}, expected the frame's "
                                   f"{frame.shape[:2]}")
            maps.append(cmap.astype(np.uint8, copy=False))
        return maps

    def _renderer_for(self, frame: np.ndarray) -> Renderer:
        """The renderer for this frame size (made on the first frame; with it the recorder)."""
        r = self.renderer
        if r is not None and (r.h, r.w) == frame.shape[:2]:
            return r
        if self.recorder is not None and r is not None:
            raise SourceError(f"--source {self.result.source}: frame size changed mid-stream "
                              f"({r.w}x{r.h} → {frame.shape[1]}x{frame.shape[0]})")
        self.renderer = Renderer(frame.shape[:2], len(self.sessions), self.class_names, self.palette)
        self.result.canvas_size = self.renderer.size
        if self.record is not None and self.recorder is None:
            self.recorder = Recorder(Path(self.record), self.grabber.reader.fps or 15.0, self.renderer.size)
        return self.renderer

    def _process(self, frame: np.ndarray) -> None:
        result = self.result
        maps = self._segment(frame)
        renderer = self._renderer_for(frame)
        now = time.perf_counter()
        dt, self.t_prev = now - self.t_prev, now
        if dt > 0:
            self.fps_ema = 1.0 / dt if self.fps_ema == 0.0 else 0.9 * self.fps_ema + 0.1 / dt
        panes = [blend_overlay(frame, m, pal, self.alpha) if self.show_overlay else frame
                 for m, pal in zip(maps, self.palettes)]
        huds = [p.hud_lines(self.fps_ema, self.grabber.drops) for p in result.panes]
        footer = None
        if len(maps) == 2:
            agree = float(np.mean(maps[0] == maps[1]))
            result.agreement.append(agree)
            footer = f"pixel agreement {100 * agree:.2f}%"
        self.canvas = renderer.render(panes, huds, footer)
        result.frames += 1
        if self.recorder is not None:
            self.recorder.write(self.canvas)
        if self.on_frame is not None:
            self.on_frame(FrameInfo(result.frames - 1, frame, maps, self.canvas, renderer))

    def abort_recording(self) -> None:
        if self.recorder is not None:
            self.recorder.abort()
            self.recorder = None

    def close(self) -> None:
        """Close the window and finish the recording (renamed into place)."""
        if self.window:
            with contextlib.suppress(cv2.error):
                cv2.destroyAllWindows()
                cv2.waitKey(1)
        if self.recorder is not None:
            written = self.recorder.finish()
            self.result.record = str(written) if written else None
            self.result.record_frames = self.recorder.frames


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
