"""Demo drawing and the window: overlay, legend, HUD panes, the output canvas, and whether a window can open.

Whether a window can open is decided BEFORE any window call, because OpenCV's Qt build aborts the whole process
when it cannot open a display (no exception to catch): on Linux/BSD no `DISPLAY` and no `WAYLAND_DISPLAY` means
headless; else a probe subprocess creates and destroys a window, and if it dies (Qt abort, a dead X server, an
OpenCV build without GUI) the demo runs headless. The probe costs one short Python start-up.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Sequence

import cv2
import numpy as np

WINDOW = "edgeseg demo"
HUD_H = 62  # px: three text lines under each pane
LEGEND_W = 150
LEGEND_ROW_H = 18
FOOTER_H = 24  # compare mode: agreement line
_FONT = cv2.FONT_HERSHEY_SIMPLEX


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


def window_closed() -> bool:
    """The user closed the demo window (or it is gone)."""
    try:
        return cv2.getWindowProperty(WINDOW, cv2.WND_PROP_VISIBLE) < 1
    except cv2.error:
        return True
