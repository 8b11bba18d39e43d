"""Demo outputs: the mp4 recording and PNG snapshots, both written through edgeseg.fileio (atomic).

Recording writes a hidden temporary sibling (`.<name>.tmp-<pid>.mp4`) and renames it into place when the run
ends (normal end, q/Esc, end of stream or Ctrl-C/SIGTERM), so an interrupted run never leaves a half file under
the final name; a failure removes the temporary file, and one left by a killed run is removed by the next
recording to the same name.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edgeseg.errors import EdgesegError, UsageError
from edgeseg.fileio import atomic_file, publish, temp_sibling


class Recorder:
    """mp4 (mp4v) writer that writes a hidden temporary sibling and renames it into place on `finish()`."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]):
        self.path = Path(path)
        # the temporary keeps the .mp4 suffix: OpenCV picks the container from it
        self.tmp = temp_sibling(self.path, keep_suffix=True)
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
        return publish(self.tmp, self.path)

    def abort(self) -> None:
        self.writer.release()
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def save_snapshot(canvas: np.ndarray, folder: str | os.PathLike) -> Path:
    """Write `canvas` as a new timestamped PNG in `folder` (never over an existing one); returns its path."""
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
