"""`edgeseg predict`'s work: expand image/video sources, segment every image with an `edgeseg.api.Predictor`, and
write a predictions folder atomically.

The folder (`fileio.atomic_dir`: nothing half-written, an existing one replaced only with `force` and only if
edgeseg wrote it, `predictions.json` marks it as edgeseg's):

    masks/<name>.png        class map as an indexed PNG (mode "P"): pixel = class index, palette = the model's
    overlays/<name>.png     the image with the class colours blended over it (RGB)
    confidence/<name>.png   with confidence: max softmax probability per pixel, 16-bit grey (value / 65535)
    predictions.json        per image: source, outputs, size, latency; the model, runtime, CPU and a summary

`<name>` mirrors the source: a file's stem, a file found in a folder its path inside that folder (without the
suffix), a video's frames `<video stem>/<frame index, 6 digits>`; names that would collide (two folders with an
`img.jpg`, `a.jpg` beside `a.png`) get `-2`, `-3`, ... in the order given.
"""
from __future__ import annotations

import glob
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from edgeseg.errors import DataError, UsageError

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
OUTPUT_FOLDERS = {"class_map": "masks", "overlay": "overlays", "confidence": "confidence"}
RECORD = "predictions.json"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SourceFile:
    """One file to predict on: `kind` "image", "video" or "unknown" (a file named on the command line whose suffix
    is neither: read as an image, else as a video); `name` the output name it mirrors (see module docstring)."""

    path: Path
    name: str
    kind: str


@dataclass(frozen=True)
class Skip:
    """A source left out, with the one-line reason (which names it)."""

    source: str
    reason: str


def _kind(path: Path) -> str:
    from edgeseg.data.decoding import IMAGE_EXTS

    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_EXTS else "video" if suffix in VIDEO_EXTS else "unknown"


def expand_sources(sources: Sequence[str | Path]) -> tuple[list[SourceFile], list[Skip]]:
    """Image files, video files, folders (searched recursively for images and videos, hidden files left out) and
    globs (`photos/*.jpg`, `**` recursive) -> (files in the order given, each once; folders with nothing to read).

    Raises:
        UsageError: a source that does not exist or a glob that matches nothing; no source at all.
    """
    from edgeseg.data.decoding import IMAGE_EXTS, list_files

    if not sources:
        raise UsageError("SOURCE: give at least one image, video, folder or glob")
    found: list[tuple[Path, str, str]] = []  # (path, natural name, kind)
    empty: list[Skip] = []
    for src in sources:
        s = str(src)
        p = Path(s).expanduser()
        if p.exists():
            matches = [p]
        elif _GLOB_CHARS & set(s):
            matches = [Path(m) for m in sorted(glob.glob(str(p), recursive=True))]
            if not matches:
                raise UsageError(f"SOURCE {s}: the pattern matches no file")
        else:
            raise UsageError(f"SOURCE {s}: no such file or folder")
        for m in matches:
            if m.is_dir():
                files = list_files(m, IMAGE_EXTS + VIDEO_EXTS, recursive=True)
                files = [f for f in files if not any(part.startswith(".") for part in f.relative_to(m).parts)]
                if not files:
                    empty.append(Skip(str(m), f"{m}: folder holds no image or video "
                                              f"({', '.join(IMAGE_EXTS + VIDEO_EXTS)})"))
                found += [(f, f.relative_to(m).with_suffix("").as_posix(), _kind(f)) for f in files]
            elif m.is_file():
                found.append((m, m.stem or m.name, _kind(m)))
            else:
                empty.append(Skip(str(m), f"{m}: not a regular file"))
    seen: set[Path] = set()
    unique = []
    for path, name, kind in found:
        real = path.resolve()
        if real not in seen:  # a file named twice (a folder and a glob over it) is predicted once
            seen.add(real)
            unique.append((path, name, kind))
    names = Names(n for _, n, _ in unique)
    return [SourceFile(path, names.take(name), kind) for path, name, kind in unique], empty


class Names:
    """Unique output names: the first to ask for a name gets it, later ones `name-2`, `name-3`, ... skipping the
    names reserved for files further on. Compared case-insensitively (macOS and Windows file systems)."""

    def __init__(self, reserved=()):
        self.reserved = {n.lower() for n in reserved}
        self.used: set[str] = set()

    def take(self, natural: str) -> str:
        name, k = natural, 2
        while name.lower() in self.used or (name != natural and name.lower() in self.reserved):
            name, k = f"{natural}-{k}", k + 1
        self.used.add(name.lower())
        return name


# --------------------------------------------------------------------------------------------------- reading

def _video_frames(path: Path) -> Iterator[np.ndarray]:
    """RGB frames of a video (OpenCV); DataError naming the file when it cannot be opened or holds no frame."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise DataError(f"{path}: not an image or a video OpenCV can read")
        n = 0
        while True:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            n += 1
            yield cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB if frame.ndim == 2 else cv2.COLOR_BGR2RGB)
        if n == 0:
            raise DataError(f"{path}: no frame could be read (not a video OpenCV can decode)")
    finally:
        cap.release()


def _frame_count(path: Path) -> int | None:
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    finally:
        cap.release()
    return n if n > 0 else None


def _images(src: SourceFile) -> Iterator[tuple[str, int | None, np.ndarray]]:
    """(output name, frame index or None, RGB image) for each image of a source; DataError for a bad file (before
    any image for an image file; a video that stops early just ends)."""
    from edgeseg.data.decoding import read_image

    if src.kind in ("image", "unknown"):
        try:
            img = read_image(src.path)
        except DataError:
            if src.kind == "image":
                raise
            img = None
        if img is not None:
            yield src.name, None, img
            return
    for i, frame in enumerate(_video_frames(src.path)):
        yield f"{src.name}/{i:06d}", i, frame


# --------------------------------------------------------------------------------------------------- writing

def indexed_png(class_map: np.ndarray, palette: Sequence[Sequence[int]]) -> bytes:
    """A class map as PNG bytes: indexed (mode "P", the palette as given) when it fits 8 bits, else 16-bit grey
    (more than 256 classes; no palette possible)."""
    import io

    from PIL import Image

    cmap = np.ascontiguousarray(class_map)
    if cmap.dtype != np.uint8 and int(cmap.max(initial=0)) > 255:
        return _png(cmap.astype(np.uint16))
    im = Image.fromarray(cmap.astype(np.uint8, copy=False))
    im.putpalette([int(v) for c in list(palette)[:256] for v in c[:3]])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _png(array: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise DataError(f"could not encode a PNG of shape {array.shape}")
    return buf.tobytes()


def confidence_png(confidence: np.ndarray) -> bytes:
    """Confidence in [0, 1] as a 16-bit grey PNG: value = round(confidence * 65535)."""
    return _png(np.round(np.clip(confidence, 0.0, 1.0) * 65535.0).astype(np.uint16))


def _write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --------------------------------------------------------------------------------------------------- the run

def predict_to_folder(predictor, files: Sequence[SourceFile], out: str | Path, *, force: bool = False,
                      strict: bool = False, confidence: bool = False, limit: int | None = None, alpha: float = 0.5,
                      progress: bool = True, skipped: Sequence[Skip] = (),
                      on_skip: Callable[[Skip], None] | None = None) -> dict[str, Any]:
    """Segment every image of `files` (`expand_sources`) with `predictor` (`edgeseg.api.load`) and publish the
    predictions folder `out` (module docstring). Returns the `predictions.json` record.

    Args:
        force: replace an existing `out` (only a folder edgeseg wrote).
        strict: a bad file (or an empty folder in `skipped`) is an error and nothing is written; otherwise it is
            left out, reported through `on_skip` and listed under "skipped".
        confidence: also write the confidence PNGs (logits models only).
        limit: stop after this many images (video frames count one each).
        alpha: weight of the class colours in the overlays.
        skipped: sources already left out (`expand_sources`' empty folders).
    Raises:
        DataError: with `strict`, the first bad file; without, when no image at all could be read.
        UsageError: `out` exists without `force`, or is not edgeseg's; confidence for an argmax artifact.
    """
    import cv2
    from tqdm import tqdm

    from edgeseg.eval.compare import latency_stats
    from edgeseg.fileio import atomic_dir, write_json

    if confidence:
        predictor.require_confidence()
    skips: list[Skip] = []

    def skip(s: Skip) -> None:
        if strict:
            raise DataError(f"{s.reason} (--strict: nothing written)")
        skips.append(s)
        if on_skip is not None:
            on_skip(s)

    for s in skipped:
        skip(s)
    total = 0
    for f in files:
        total += (_frame_count(f.path) or 1) if f.kind == "video" else 1
    total = min(total, limit) if limit else total
    images: list[dict[str, Any]] = []
    names = Names()
    t_start = time.perf_counter()
    with atomic_dir(out, force) as tmp:
        bar = tqdm(total=total, desc="predict", unit="img", disable=not progress, leave=False, dynamic_ncols=True)
        try:
            for src in files:
                if limit and len(images) >= limit:
                    break
                try:
                    for name, frame, img in _images(src):
                        res = predictor.infer(img, confidence=confidence)
                        name = names.take(name)
                        outputs = {"class_map": f"{OUTPUT_FOLDERS['class_map']}/{name}.png",
                                   "overlay": f"{OUTPUT_FOLDERS['overlay']}/{name}.png"}
                        _write(tmp, outputs["class_map"], indexed_png(res.class_map, predictor.palette))
                        rgb = predictor.overlay(img, res.class_map, alpha)
                        _write(tmp, outputs["overlay"], _png(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)))
                        if res.confidence is not None:
                            outputs["confidence"] = f"{OUTPUT_FOLDERS['confidence']}/{name}.png"
                            _write(tmp, outputs["confidence"], confidence_png(res.confidence))
                        rec = {"source": str(src.path), "outputs": outputs, "size": [int(img.shape[0]),
                                                                                     int(img.shape[1])],
                               "latency_ms": round(res.latency_ms, 3)}
                        if frame is not None:
                            rec["frame"] = frame
                        images.append(rec)
                        bar.update(1)
                        if limit and len(images) >= limit:
                            break
                except DataError as e:
                    skip(Skip(str(src.path), str(e)))
        finally:
            bar.close()
        if not images:
            raise DataError(f"no image could be predicted ({len(skips)} source(s) skipped; nothing written)")
        seconds = time.perf_counter() - t_start
        record = _record(predictor, images, skips, seconds, latency_stats([r["latency_ms"] for r in images]),
                         confidence, alpha)
        write_json(tmp / RECORD, record)
    return record


def _record(predictor, images, skips, seconds, latency, confidence, alpha) -> dict[str, Any]:
    from edgeseg import __version__
    from edgeseg.cpu import cpu_label, host_cpu

    cpu = host_cpu().to_json()
    return {
        "images": images,
        "skipped": [{"source": s.source, "reason": s.reason} for s in skips],
        "model": str(predictor.path),
        "kind": predictor.kind,
        "architecture": predictor.model,
        "target": predictor.target,
        "precision": predictor.precision,
        "runtime": predictor.runtime,
        "threads": predictor.threads,
        "input_size": list(predictor.input_size) if not predictor.native_size else None,
        "native_size": predictor.native_size,
        "preprocessing": predictor.resize,
        "classes": list(predictor.classes),
        "palette": [list(c) for c in predictor.palette],
        "class_map_png": "indexed (mode P): pixel value = class index, PNG palette = the model's palette",
        "confidence_png": ("16-bit grey: max softmax probability x 65535" if confidence else None),
        "overlay_alpha": alpha,
        "cpu": cpu,
        "cpu_label": cpu_label(cpu),
        "summary": {"images": len(images), "skipped": len(skips), "seconds": round(seconds, 3),
                    "images_per_s": round(len(images) / seconds, 3) if seconds > 0 else None,
                    "latency_ms": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in latency.items()}},
        "edgeseg_version": __version__,
    }


def summary_line(record: dict[str, Any]) -> str:
    """'12 images in 1.9 s (6.3 images/s); model call p50 41.2 ms on onnx (onnx fp32, 2 threads); CPU ...'
    (images/s: the whole run, reading and writing included; p50: the model call alone)."""
    s = record["summary"]
    threads = record["threads"]
    threads = "runtime's default threads" if threads is None else f"{threads} thread{'' if threads == 1 else 's'}"
    return (f"{s['images']} image{'' if s['images'] == 1 else 's'} in {s['seconds']:.1f} s "
            f"({s['images_per_s'] or 0:.1f} images/s); model call p50 {s['latency_ms']['p50']:.1f} ms on "
            f"{record['runtime']} ({record['target']} {record['precision']}, {threads}); CPU {record['cpu_label']}"
            + (f"; {s['skipped']} skipped" if s["skipped"] else ""))


def load_record(out: str | Path) -> dict[str, Any]:
    """Read a predictions folder's `predictions.json`."""
    return json.loads((Path(out) / RECORD).read_text())
