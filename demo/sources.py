"""Demo sources: parse `--source`, read frames, and a capture thread with a one-frame slot.

For live sources (camera, RTSP/HTTP stream) the newest frame overwrites an unconsumed one (counted as a drop), so
the display never lags behind the camera. For finite sources (video file, image folder, the embedded clip) the
reader waits instead, so every frame is shown. A lost camera/stream gets bounded reconnects, then a clean stop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgeseg.data.decoding import IMAGE_EXTS
from edgeseg.errors import EdgesegError

log = logging.getLogger(__name__)


class SourceError(EdgesegError):
    """The video source is missing, unreadable or was lost (exit 1)."""


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


class Reader:
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


def open_reader(spec: SourceSpec, loop: bool, reconnect_retries: int, retry_delay_s: float) -> Reader:
    """An opened Reader for `spec`; a stream gets `reconnect_retries` more tries, `retry_delay_s` apart.

    Raises:
        SourceError: the source cannot be opened at all.
    """
    reader = Reader(spec, loop=loop)
    if reader.open():
        return reader
    kind = {"camera": "camera not found or busy", "stream": "cannot connect to the stream"}.get(
        spec.kind, "unreadable or not a video")
    if spec.kind != "stream":
        raise SourceError(f"--source {spec.label}: {kind}")
    for _ in range(reconnect_retries):
        time.sleep(retry_delay_s)
        if reader.open():
            return reader
    raise SourceError(f"--source {spec.label}: {kind} (after {reconnect_retries} retries)")


class FrameGrabber:
    """Reads a source on its own thread into a one-frame slot.

    live=True: a new frame replaces an unconsumed one (counted in `drops`) — latest frame wins.
    live=False: the reader waits until the slot is free, so no frame is skipped (files, folders).
    On read failure of a live source it reconnects up to `reconnect_retries` times, `retry_delay_s` apart.
    `get()` returns the next frame, or None once the source has ended; `end_reason`/`error` say why.
    """

    def __init__(self, reader: Reader, live: bool, reconnect_retries: int = 3, retry_delay_s: float = 1.0):
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
