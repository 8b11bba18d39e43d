"""Reading one image or label file (with a one-line DataError naming the file for anything bad), the raw
label value -> class index tables, and matching images with their labels.

`IMAGE_EXTS` is the one list of image file extensions edgeseg reads (datasets, calibration folders, demo
sources); `LABEL_EXTS` the extensions a mask may have.
"""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from edgeseg.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXTS = (".png", ".bmp", ".tif", ".tiff")

# ------------------------------------------------------------------------------------------------ one file

def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise DataError(f"{path}: empty file (0 bytes)")
    return data


def _truncation(data: bytes) -> str | None:
    """A reason if a JPEG/PNG byte string is cut short (OpenCV decodes a truncated JPEG without failing)."""
    if data[:3] == b"\xff\xd8\xff":  # JPEG: the last scan must be followed by the end-of-image marker
        sos, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
        if sos < 0 or eoi < sos:
            return "truncated JPEG (no end-of-image marker after the last scan)"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if data.rfind(b"IEND") < max(data.rfind(b"IDAT"), 8):
            return "truncated PNG (no IEND chunk after the image data)"
    return None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3) with OpenCV; DataError naming the file if it is not one."""
    path = Path(path)
    data = _read_bytes(path)
    why = _truncation(data)
    if why:
        raise DataError(f"{path}: {why}")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except (cv2.error, ValueError, OverflowError, MemoryError) as e:
        raise DataError(f"{path}: unreadable image ({str(e).strip().splitlines()[-1] if str(e).strip() else e})") \
            from None
    if img is None or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise DataError(f"{path}: unreadable image (not a valid or supported image file)")
    if img.dtype != np.uint8:  # IMREAD_COLOR gives 8-bit, but be explicit
        img = cv2.convertScaleAbs(img)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _is_palette_png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[12:16] == b"IHDR" and data[25] == 3


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a class-index mask (H, W) uint8/uint16 as stored (no mapping). OpenCV IMREAD_UNCHANGED; palette
    PNGs (VOC) are read as their palette indices (Pillow), since OpenCV would expand them to colours.

    DataError for an unreadable/truncated file or an RGB colour mask (a 3-channel mask whose channels differ).
    """
    path = Path(path)
    data = _read_bytes(path)
    why = _truncation(data)
    if why:
        raise DataError(f"{path}: {why}")
    if _is_palette_png(data):
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                im.load()
                lab = np.array(im)
        except Exception as e:  # Pillow raises many types for corrupt data
            raise DataError(f"{path}: unreadable label PNG ({type(e).__name__}: {str(e)[:80]})") from None
        if lab.ndim != 2:
            raise DataError(f"{path}: unreadable label PNG (unexpected palette image shape {lab.shape})")
    else:
        try:
            lab = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        except (cv2.error, ValueError, OverflowError, MemoryError) as e:
            raise DataError(f"{path}: unreadable label image ({str(e).strip()[:80]})") from None
        if lab is None or lab.size == 0:
            raise DataError(f"{path}: unreadable label image (not a valid or supported image file)")
    if lab.ndim == 3:
        ch = lab.shape[2]
        first = lab[..., 0]
        colour = lab[..., :3] if ch >= 3 else lab[..., :1]
        if ch >= 3 and not (np.array_equal(first, colour[..., 1]) and np.array_equal(first, colour[..., 2])):
            raise DataError(f"{path}: RGB colour mask ({lab.shape[1]}x{lab.shape[0]}x{ch}); expected a "
                            "single-channel class-index mask (one class id per pixel)")
        lab = np.ascontiguousarray(first)
    if lab.ndim != 2:
        raise DataError(f"{path}: unreadable label image (unexpected shape {lab.shape})")
    if lab.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: label image has pixel type {lab.dtype}; expected 8- or 16-bit class indices")
    return lab


# ----------------------------------------------------------------------------------------- folders, pairs

def list_files(folder: Path, exts: tuple[str, ...], recursive: bool = False) -> list[Path]:
    """Sorted files of `folder` with one of the extensions `exts` (any case), hidden files left out."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.suffix.lower() in exts and p.is_file() and not p.name.startswith("."))


def identity_lut(num_classes: int, ignore: int, size: int = 65536) -> np.ndarray:
    """Raw label value -> class index table for masks that store class indices: 0..K-1 and `ignore` map to
    themselves, every other value to -1 (invalid)."""
    lut = np.full(size, -1, np.int64)
    lut[:num_classes] = np.arange(num_classes)
    if 0 <= ignore < size:
        lut[ignore] = ignore
    return lut


def pair_files(images: list[Path], label_for: Callable[[Path], list[Path]], skip_bad: bool, where: str
               ) -> tuple[list[Path], list[Path], list[str]]:
    """Match each image with its label; an image without one is an error (or a skipped, logged problem)."""
    out_i, out_l, problems = [], [], []
    for img in images:
        cands = label_for(img)
        lab = next((c for c in cands if c.is_file()), None)
        if lab is None:
            msg = f"{img}: image without a label (expected {cands[0]})"
            if not skip_bad:
                raise DataError(msg)
            log.warning("skipping: %s", msg)
            problems.append(msg)
            continue
        out_i.append(img)
        out_l.append(lab)
    if not out_i:
        raise DataError(f"{where}: no image/label pairs"
                        + (f" ({len(problems)} images without a label skipped)" if problems else ""))
    return out_i, out_l, problems
