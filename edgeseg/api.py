"""The Python API: load a checkpoint or an artifact and segment images; export and validate from a script.

What `edgeseg predict`, `edgeseg export` and `edgeseg validate` do, as typed functions (the commands call these)::

    import edgeseg
    import numpy as np
    from PIL import Image

    seg = edgeseg.load("runs/pipeline/artifacts/onnx-fp32")  # an artifact folder, or a checkpoint folder
    image = np.asarray(Image.open("street.jpg").convert("RGB"))  # (H, W, 3) uint8 RGB, any size
    class_map = seg.predict(image)                    # (H, W) uint8 class indices at the image's size
    class_map, conf = seg.predict(image, return_confidence=True)  # + float32 max-softmax per pixel
    seg.classes[class_map[0, 0]]                      # "Sky"
    Image.fromarray(seg.overlay(image, class_map)).save("overlay.png")

    art = edgeseg.export("ckpts/offseg_t_camvid", "onnx", precision="int8")   # -> artifact folder
    record = edgeseg.validate(art, data="data/camvid")                         # -> {"verdict": "pass", ...}

The preprocessing is the evaluation protocol of `edgeseg eval` / `validate` / `demo` (docs/DESIGN.md): the image
is resized (bilinear) to the model's input size (`input_size`: the manifest's, or the checkpoint's `input_hw`),
normalised as the manifest says, and the model's logits (stride s) are upsampled (bilinear) to the image's own size
before the argmax; an artifact that outputs a class map (`output = "argmax"`) has it resized with nearest
neighbour. A checkpoint can instead run at the image's own size padded to a multiple of 32
(`load(..., native_size=True)`). Importing this module is cheap: numpy only; the runtimes load in `load`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence, overload

import numpy as np

from edgeseg.artifact import MANIFEST
from edgeseg.errors import ArtifactError, DataError, UsageError

if TYPE_CHECKING:
    from edgeseg.runtime.base import Session

__all__ = ["Prediction", "Predictor", "load", "export", "validate"]

PAD_MULTIPLE = 32  # native_size: the models' total stride; a padded side is a multiple of it


@dataclass(frozen=True)
class Prediction:
    """One image's result: what `Predictor.infer` returns and `edgeseg predict` writes.

    Attributes:
        class_map: (H, W) class indices at the image's size, uint8 (uint16 for more than 256 classes).
        confidence: (H, W) float32 in (0, 1]: the softmax probability of the predicted class; None unless asked.
        latency_ms: wall time of the model call alone (the runtime's `run`), without pre/post-processing.
    """

    class_map: np.ndarray
    confidence: np.ndarray | None
    latency_ms: float


def as_rgb(image: Any, what: str = "image") -> np.ndarray:
    """An image as a contiguous (H, W, 3) uint8 RGB array: (H, W, 3) uint8 as is, (H, W) or (H, W, 1) grey
    repeated, (H, W, 4) RGBA without its alpha. A PIL image works too (`np.asarray`). UsageError otherwise."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)) \
            or img.size == 0:
        raise UsageError(f"{what}: expected an RGB uint8 (H, W, 3) array, got {img.dtype} {tuple(img.shape)}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


class Predictor:
    """A loaded model, ready to segment images of any size. Make one with `edgeseg.load(path)`.

    Use it as a context manager, or call `close()`, to free the runtime early.

    Example::

        with edgeseg.load("ckpts/offseg_t_camvid") as seg:
            class_map = seg.predict(image)           # (H, W) uint8
            print(seg.target, seg.precision, seg.input_size, seg.classes)
    """

    def __init__(self, session: "Session", path: Path, kind: str, native_size: bool = False,
                 model: Any = None, spec: Any = None):
        self.session = session  #: the runtime session (edgeseg.runtime.base.Session)
        self.path = path  #: the artifact or checkpoint folder
        self.kind = kind  #: "artifact" or "checkpoint"
        self.native_size = native_size  #: a checkpoint run at each image's own size (padded to a multiple of 32)
        self._model, self._spec = model, spec
        self._sized: tuple[tuple[int, int], "Session"] | None = None

    # -- what the model is ---------------------------------------------------------------------------------------
    @property
    def manifest(self):
        """The artifact's `Manifest` (for a checkpoint, the one its eager session synthesises)."""
        return self.session.manifest

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, index i = class i."""
        return tuple(self.manifest.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.manifest.class_names)

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        """RGB colour of each class (the manifest's / model.json's palette)."""
        return tuple((int(c[0]), int(c[1]), int(c[2])) for c in self.manifest.palette)

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) the model runs at: every image is resized to it (native_size: the image's own size, padded)."""
        return self.session.input_hw

    @property
    def target(self) -> str:
        """The artifact's target ("torch" for a checkpoint, run eagerly in PyTorch)."""
        return str(self.manifest.target)

    @property
    def precision(self) -> str:
        return str(self.manifest.precision)

    @property
    def model(self) -> str:
        """The architecture's registered name (e.g. "offseg_t")."""
        return str(self.manifest.model)

    @property
    def runtime(self) -> str:
        """The runtime that runs it here: its target package in edgeseg/targets/ (the profile's `runtime`), or
        "torch" for a checkpoint."""
        if self.kind == "checkpoint":
            return "torch"
        from edgeseg.targets import artifact_runtime

        return str(artifact_runtime(self.manifest)["package"])

    @property
    def threads(self) -> int | None:
        """CPU threads given to the runtime (None: its default)."""
        return self.session.num_threads

    @property
    def has_confidence(self) -> bool:
        """Whether the model outputs logits (so a confidence exists); False for an argmax-output artifact."""
        return self.session.output_kind == "logits"

    @property
    def resize(self) -> str:
        """How an image reaches the model, in words (recorded by `edgeseg predict`)."""
        if self.native_size:
            return (f"own size, zero-padded (after normalisation) at the bottom/right to a multiple of "
                    f"{PAD_MULTIPLE}; logits upsampled (bilinear) to the padded size and cropped")
        h, w = self.input_size
        back = ("class map resized back (nearest)" if not self.has_confidence
                else "logits upsampled (bilinear) to the image's size before argmax")
        return f"resized (bilinear) to {h}x{w}; {back}"

    # -- prediction ----------------------------------------------------------------------------------------------
    @overload
    def predict(self, image: Any, return_confidence: Literal[False] = ...) -> np.ndarray: ...

    @overload
    def predict(self, image: Any, return_confidence: Literal[True]) -> tuple[np.ndarray, np.ndarray]: ...

    def predict(self, image: Any, return_confidence: bool = False):
        """Segment one image.

        Args:
            image: (H, W, 3) uint8 RGB of any size (grey (H, W) and RGBA are converted; see `as_rgb`).
            return_confidence: also return the per-pixel confidence (logits models only).
        Returns:
            (H, W) uint8 class map at the image's size (uint16 above 256 classes), or with `return_confidence`
            the tuple (class map, (H, W) float32 confidence in (0, 1]).

        Example::

            class_map = seg.predict(np.asarray(Image.open("a.jpg").convert("RGB")))
            counts = np.bincount(class_map.ravel(), minlength=seg.num_classes)
        """
        res = self.infer(image, confidence=return_confidence)
        return (res.class_map, res.confidence) if return_confidence else res.class_map

    def infer(self, image: Any, confidence: bool = False) -> Prediction:
        """`predict` with the model call's latency: a `Prediction` (what `edgeseg predict` records)."""
        img = as_rgb(image)
        if confidence:
            self.require_confidence()
        h, w = img.shape[:2]
        session, x, padded = self._model_input(img)
        t0 = time.perf_counter()
        y = session.run(x)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if session.output_kind == "argmax":
            from edgeseg.data.transforms import resize_label

            return Prediction(resize_label(np.asarray(y[0], np.uint8), (h, w)), None, latency_ms)
        from edgeseg.eval.evaluate import upsample_argmax, upsample_argmax_confidence

        out_hw = padded or (h, w)
        if confidence:
            cmap, conf = upsample_argmax_confidence(y[0], out_hw)
            conf = conf[:h, :w] if padded else conf
        else:
            cmap = upsample_argmax(y[0], out_hw)
            cmap, conf = cmap.astype(np.uint8 if self.num_classes <= 256 else np.uint16, copy=False), None
        if padded:
            cmap = cmap[:h, :w]
        return Prediction(np.ascontiguousarray(cmap), None if conf is None else np.ascontiguousarray(conf),
                          latency_ms)

    def require_confidence(self) -> None:
        """UsageError (one line) unless the model outputs logits, which a confidence needs."""
        if not self.has_confidence:
            raise UsageError(f"{self.path}: this artifact outputs a class map (output \"argmax\"), not logits: it "
                             "has no confidence (export with output = \"logits\", the default)")

    def predict_logits(self, image: Any) -> np.ndarray:
        """The raw logits of the model call on `image`: (K, h, w) float32 at the model's output stride for the
        image as the model sees it (resized to `input_size`; native_size: padded), not upsampled.
        ArtifactError for an argmax-output artifact."""
        if not self.has_confidence:
            raise ArtifactError(f"{self.path}: this artifact outputs a class map (output \"argmax\"), not logits")
        session, x, _ = self._model_input(as_rgb(image))
        return np.asarray(session.run(x)[0], dtype=np.float32)

    def _model_input(self, img: np.ndarray) -> tuple["Session", np.ndarray, tuple[int, int] | None]:
        """(session, its input batch, padded (H, W) or None) for one RGB image."""
        if not self.native_size:
            return self.session, self.session.input_for(img), None
        from edgeseg.cli_args import MAX_SIDE
        from edgeseg.data.transforms import normalize

        h, w = img.shape[:2]
        hp, wp = -(-h // PAD_MULTIPLE) * PAD_MULTIPLE, -(-w // PAD_MULTIPLE) * PAD_MULTIPLE
        if max(hp, wp) > MAX_SIDE:
            raise DataError(f"image of {h}x{w}: native_size runs at most {MAX_SIDE} px per side (the model's memory "
                            "grows with the input); load without native_size to resize it")
        x = normalize(img, self.manifest.mean, self.manifest.std)
        x = np.pad(x, ((0, 0), (0, hp - h), (0, wp - w)))[None]  # 0 after normalisation: the mean colour
        if self._sized is None or self._sized[0] != (hp, wp):
            from edgeseg.runtime.torch import TorchSession

            self._sized = ((hp, wp), TorchSession.from_model(self._model, self._spec, path=self.path,
                                                             input_hw=(hp, wp), num_threads=self.threads))
        return self._sized[1], np.ascontiguousarray(x, dtype=np.float32), (hp, wp)

    # -- drawing -------------------------------------------------------------------------------------------------
    def colorize(self, class_map: np.ndarray) -> np.ndarray:
        """(H, W) class map -> (H, W, 3) uint8 RGB image in the palette's colours (classes beyond it: black)."""
        from edgeseg.demo.render import palette_bgr

        cmap = np.asarray(class_map)
        lut = palette_bgr(self.palette, max(256, int(cmap.max(initial=0)) + 1))[:, ::-1]
        return np.ascontiguousarray(lut[cmap])

    def overlay(self, image: Any, class_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """The image with the class colours blended over it: round((1 - alpha) * image + alpha * colour), (H, W, 3)
        uint8 RGB (the demo's overlay); classes beyond the palette (ignore) leave the image as is."""
        import cv2

        from edgeseg.demo.render import blend_overlay

        if not 0.0 <= float(alpha) <= 1.0:
            raise UsageError(f"alpha {alpha}: must be between 0 and 1")
        img = as_rgb(image)
        bgr = blend_overlay(cv2.cvtColor(img, cv2.COLOR_RGB2BGR), np.asarray(class_map), self.palette, float(alpha))
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    # -- lifetime ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the runtime."""
        self.session.close()
        if self._sized is not None:
            self._sized[1].close()
            self._sized = None

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        h, w = self.input_size
        return (f"Predictor({str(self.path)!r}, {self.model}, {self.target} {self.precision}, input {h}x{w}"
                f"{' (native size)' if self.native_size else ''}, {self.num_classes} classes)")


def load(path: str | Path, threads: int | None = None, *, native_size: bool = False) -> Predictor:
    """Open an artifact folder (manifest.json, run on its target's runtime, every file's sha256 checked first) or a
    checkpoint folder (model.json + model.safetensors, run eagerly in PyTorch) for prediction.

    Args:
        path: the folder.
        threads: CPU threads for the runtime (None: its default).
        native_size: checkpoints only: run each image at its own size, padded to a multiple of 32, instead of
            resizing it to the checkpoint's input size (artifacts have a fixed input size).
    Returns:
        A `Predictor`.
    Raises:
        ArtifactError: not an artifact or checkpoint, a file changed since export, or an artifact this host cannot
            run (a Core ML artifact off macOS: one line saying so).
        UsageError: bad `threads`, or `native_size` for an artifact.

    Example::

        seg = edgeseg.load("edgeseg/assets/checkpoints/offseg_t_camvid", threads=2)
        class_map = seg.predict(image)
    """
    from edgeseg.runtime import open_session

    path = Path(path)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads {threads!r}: must be a positive integer (or None for the runtime's default)")
    if not (path / MANIFEST).is_file() and (path / "model.json").is_file():
        from edgeseg.checkpoint import load_checkpoint
        from edgeseg.runtime.torch import TorchSession

        model, spec = load_checkpoint(path)  # what open_session does for a checkpoint, keeping the model for
        session = TorchSession.from_model(model, spec, path=path, num_threads=threads)  # native_size's sizes
        return Predictor(session, path, "checkpoint", native_size=native_size, model=model, spec=spec)
    if native_size and (path / MANIFEST).is_file():
        raise UsageError(f"{path}: native_size is for checkpoints; an artifact has the fixed input size of its "
                         "manifest")
    session = open_session(path, num_threads=threads)  # ArtifactError for a folder that is neither
    why = session.why_not_here
    if why:
        session.close()
        raise ArtifactError(f"{path}: {why}")
    return Predictor(session, path, "artifact")


def export(checkpoint: str | Path, target: str, precision: str | None = "fp32", out: str | Path | None = None, *,
           input_size: tuple[int, int] | None = None, calib: str | Path | None = None,
           data: str | Path | None = None, force: bool = False, progress: bool = True, **options: Any) -> Path:
    """Export a checkpoint to `target` and prove it against eager: `edgeseg export` as a function
    (`edgeseg.export.export_checkpoint`). `edgeseg.export(...)` is this function.

    Args:
        checkpoint: checkpoint folder (model.safetensors + model.json).
        target: a target profile name (`edgeseg export --list-targets`).
        precision: "fp32" | "fp16" | "int8" (None: the profile's default).
        out: artifact folder (None: `<checkpoint>-<target>-<precision>` beside the checkpoint).
        input_size: static (H, W) (None: the checkpoint's input_hw).
        calib: int8 calibration: a recipe name (`calibration/*.toml`) or an image/dataset folder (None: the
            embedded CamVid mini set).
        data: the dataset folder of a calibration recipe drawn from "data" (e.g. camvid-train-64).
        force: replace an existing `out` (only a folder edgeseg wrote).
        progress: progress bars on stderr.
        **options: the profile's options (e.g. `output="argmax"`), checked against the exporter.
    Returns:
        The artifact folder (files + manifest.json).
    Raises:
        UsageError: bad target/precision/option, or `out` exists without `force`.
        ArtifactError: the export failed, or an fp32 artifact disagrees with eager.

    Example::

        art = edgeseg.export("ckpts/offseg_t_camvid", "openvino", precision="int8", out="out/ov-int8")
    """
    from edgeseg.export import export_checkpoint

    hw = None if input_size is None else (int(input_size[0]), int(input_size[1]))
    return Path(export_checkpoint(checkpoint, target, precision, input_hw=hw, calib=calib, out=out, force=force,
                                  progress=progress, calib_root=data, **options))


@overload
def validate(artifact: str | Path, data: str | Path | None = ..., **kwargs: Any) -> dict[str, Any]: ...


@overload
def validate(artifact: Sequence[str | Path], data: str | Path | None = ..., **kwargs: Any) -> list[dict[str, Any]]:
    ...


def validate(artifact, data=None, *, split: str = "val", reference: str | Path | None = None,
             max_images: int | None = None, boundary_px: int = 3, progress: bool = True):
    """Validate artifacts on real images, each on its own runtime, against a reference: `edgeseg validate` as a
    function (`edgeseg.eval.validate.validate`).

    Args:
        artifact: an artifact folder (returns its record) or a list of them (returns a list of records).
        data: dataset root (None: the embedded CamVid clip).
        split: dataset split.
        reference: fp32 artifact or checkpoint to compare with (None: each artifact's source checkpoint, else its
            fp32 sibling).
        max_images: the first N images only.
        boundary_px: pixels within K px of a reference class edge count as boundary.
        progress: progress bars on stderr.
    Returns:
        A record per artifact: `verdict` ("pass", "fail", "no reference", "not run", "failed"), `miou`,
        `miou_drop`, `agreement`, `passed`, `reasons`, ... (see edgeseg/eval/validate.py). A failure is a record,
        not an exception.

    Example::

        rec = edgeseg.validate("out/onnx-int8", data="data/camvid", max_images=20)
        assert rec["verdict"] == "pass", rec["reasons"]
    """
    from edgeseg.eval.validate import validate as _validate

    if data is None:
        from edgeseg.data.embedded import default_data_dir

        data = default_data_dir()
    single = isinstance(artifact, (str, Path))
    records = _validate([artifact] if single else list(artifact), data, split=split, reference=reference,
                        boundary_px=boundary_px, max_images=max_images, progress=progress)
    return records[0] if single else records
