"""`SegDataset`: the image/label pairs of one split, read lazily and validated on read (what every reader in
`edgeseg.data.formats` returns)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeseg.data.decoding import read_image, read_label
from edgeseg.errors import DataError
from edgeseg.types import DatasetInfo

log = logging.getLogger(__name__)


class SegDataset:
    """Image/label pairs of one split, read lazily and validated on read.

    `ds[i] -> (image uint8 (H,W,3) RGB, label int64 (H,W))`. Attributes: `info` (DatasetInfo), `fmt`, `root`,
    `split`, `image_paths`, `label_paths`, `skip_bad`, `skipped` (bad pairs met so far, including images
    without a label found at open), `problems` (their one-line messages).

    Reading a bad pair raises DataError. With `skip_bad=True`:
    - `ds.get(i)` logs a warning, counts the pair in `skipped` and returns None (evaluation uses this, so a
      bad pair is left out of the metrics, never replaced);
    - `ds[i]` returns the next good pair instead (for training loaders that need an item per index);
    - `ds.check()` drops every bad pair, so `len(ds)` then counts only good ones.
    Counts made inside DataLoader worker processes stay in those processes.
    """

    def __init__(self, root: Path, split: str, fmt: str, info: DatasetInfo, image_paths: Sequence[Path],
                 label_paths: Sequence[Path], lut: np.ndarray, skip_bad: bool = False,
                 problems: Sequence[str] = (), raw_valid: str = "", note: str = ""):
        self.root = Path(root)
        self.split = split
        self.note = note  # e.g. which sequence this split holds out (HOLDOUT_RULES); "" when none
        self.fmt = fmt
        self.info = info
        self.image_paths = list(image_paths)
        self.label_paths = list(label_paths)
        self.skip_bad = skip_bad
        self.problems: list[str] = list(problems)
        self.skipped = len(self.problems)
        self._n_open_problems = len(self.problems)  # images without a label, found at open
        self._lut = lut  # raw label value -> class index / ignore, -1 = invalid
        self._raw_valid = raw_valid
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return (f"SegDataset({self.fmt}, {str(self.root)!r}, split={self.split!r}, {len(self)} pairs, "
                f"{self.info.num_classes} classes, ignore {self.info.ignore_index}"
                + (f"; {self.note}" if self.note else "") + ")")

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def map_label(self, raw: np.ndarray, path: Path | str = "label") -> np.ndarray:
        """Raw stored label values -> int64 class indices / ignore; DataError naming the bad values."""
        lut = self._lut
        if raw.max(initial=0) >= len(lut):
            bad = np.unique(raw[raw >= len(lut)])
        else:
            lab = lut[raw]
            if lab.min(initial=0) >= 0:
                return lab
            bad = np.unique(raw[lab < 0])
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise DataError(f"{path}: label values {shown} outside the {self.info.num_classes} classes of "
                        f"{self.fmt} ({self._raw_valid})")

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Read and validate pair `i`; DataError if it is bad (whatever skip_bad says)."""
        ipath, lpath = self.image_paths[i], self.label_paths[i]
        img = read_image(ipath)
        raw = read_label(lpath)
        if raw.shape != img.shape[:2]:
            raise DataError(f"{lpath}: mask size {raw.shape[1]}x{raw.shape[0]} differs from its image "
                            f"{ipath.name} ({img.shape[1]}x{img.shape[0]})")
        return img, self.map_label(raw, lpath)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Pair `i`, or None for a bad pair when skip_bad is set (warned once and counted in `skipped`)."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i in self._bad:
            return None
        try:
            return self.load(i)
        except DataError as e:
            if not self.skip_bad:
                raise
            self._mark_bad(i, str(e))
            return None

    def _mark_bad(self, i: int, msg: str) -> None:
        if i not in self._bad:
            self._bad.add(i)
            self.skipped += 1
            self.problems.append(msg)
            log.warning("skipping bad pair: %s", msg)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        for k in range(n):
            item = self.get((i + k) % n)
            if item is not None:
                return item
        raise DataError(f"{self.root}: every pair of split {self.split!r} is bad ({self.skipped} skipped)")

    def __iter__(self):
        for i in range(len(self)):
            item = self.get(i)
            if item is not None:
                yield item

    def check(self, progress: bool = True) -> int:
        """Read every pair now and return the number of bad pairs (images without a label found at open
        included). Each problem is logged as a warning and kept in `problems`; it never raises for a bad
        pair. With skip_bad, bad pairs are dropped from the dataset afterwards and the count is every pair
        skipped so far (`skipped`)."""
        from tqdm import tqdm

        n_bad = self._n_open_problems
        self.problems = self.problems[: self._n_open_problems] + [
            p for p in self.problems[self._n_open_problems:] if self.skip_bad]  # keep skipped ones, re-scan the rest
        for i in tqdm(range(len(self)), desc=f"checking {self.fmt}/{self.split}", unit="img",
                      disable=not progress, leave=False):
            if i in self._bad:
                n_bad += 1
                continue
            try:
                self.load(i)
            except DataError as e:
                n_bad += 1
                if self.skip_bad:
                    self._mark_bad(i, str(e))
                else:
                    self.problems.append(str(e))
                    log.warning("%s", e)
        if self.skip_bad and self._bad:
            keep = [i for i in range(len(self)) if i not in self._bad]
            self.image_paths = [self.image_paths[i] for i in keep]
            self.label_paths = [self.label_paths[i] for i in keep]
            self._bad = set()
            if not self.image_paths:
                raise DataError(f"{self.root}: every pair of split {self.split!r} is bad ({self.skipped} skipped)")
        return self.skipped if self.skip_bad else n_bad
