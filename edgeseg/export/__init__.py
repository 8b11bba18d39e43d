"""Export: the target table and `export_checkpoint`, which turns a checkpoint into a proven artifact folder.

`TARGETS` maps a target name (== its profile `export_targets/<name>.toml`) to the module in `edgeseg/export/`
that converts it and the module in `edgeseg/runtime/` that runs it. Nothing heavy is imported here.
"""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeseg.errors import ArtifactError, DataError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One row of the target table: modules under edgeseg/export/ and edgeseg/runtime/."""

    exporter: str
    runtime: str


# target name -> (exporter module, runtime module). The jetson-tensorrt artifact is an ONNX file that ONNX
# Runtime can run here (TensorRT builds the engine on the device).
TARGETS: dict[str, Target] = {
    "executorch-xnnpack": Target(exporter="executorch", runtime="executorch"),
    "onnx": Target(exporter="onnx", runtime="onnx"),
    "jetson-tensorrt": Target(exporter="tensorrt", runtime="onnx"),
    "openvino": Target(exporter="openvino", runtime="openvino"),
    "coreml": Target(exporter="coreml", runtime="coreml"),
}

# fp32 artifacts that run here must agree with eager PyTorch at least this well (argmax, per pixel).
FP32_MIN_AGREEMENT = 0.999
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def get_exporter(target: str):
    """Instantiate the exporter of `target` (imports edgeseg/export/<module>.py, which is light)."""
    if target not in TARGETS:
        raise UsageError(f"--target: unknown target {target!r}; known: {', '.join(sorted(TARGETS))}")
    mod = importlib.import_module(f"edgeseg.export.{TARGETS[target].exporter}")
    return mod.EXPORTER()


def export_checkpoint(checkpoint: str | Path, target: str, precision: str | None = None,
                      input_hw: tuple[int, int] | None = None, calib: str | Path | None = None,
                      out: str | Path | None = None, force: bool = False, progress: bool = True,
                      calib_root: str | Path | None = None, **options: Any) -> Path:
    """Export a checkpoint folder to `target` and prove the artifact.

    Args:
        checkpoint: checkpoint folder (model.safetensors + model.json).
        target: a profile name (`edgeseg export --list-targets`).
        precision: "fp32" | "fp16" | "int8"; None = the profile's default.
        input_hw: static (H, W) to export at; None = the checkpoint's input_hw.
        calib: for int8: a calibration recipe name/path (`calibration/*.toml`), or a folder of calibration images
            (a dataset root or a plain image folder); None = the embedded CamVid mini set (or deterministic random
            images if it is not installed).
        out: artifact folder; None = `<checkpoint>-<target>-<precision>` beside the checkpoint.
        force: overwrite an existing `out`.
        calib_root: the dataset folder of a recipe whose source is "data" (e.g. camvid-train-64).
        **options: overrides of the profile's options (checked against the exporter's Options).
    Returns:
        The artifact folder, holding the files and manifest.json.
    Raises:
        UsageError: bad target/precision/option, or `out` exists without force.
        ArtifactError: the export failed, or an fp32 artifact disagrees with eager (< 99.9 % argmax).
    """
    from edgeseg.checkpoint import load_checkpoint
    from edgeseg.export.base import ExportWrapper, Manifest, write_manifest
    from edgeseg.export.profiles import load_profile
    from edgeseg.fileio import atomic_dir, sha256_tree
    from edgeseg.models import prepare_for_export

    if target not in TARGETS:
        raise UsageError(f"--target: unknown target {target!r}; known: {', '.join(sorted(TARGETS))}")
    profile = load_profile(target)
    exporter = get_exporter(target)
    if profile.exporter != TARGETS[target].exporter:
        raise UsageError(f"{profile.source}: exporter: {profile.exporter!r} but the target table says "
                         f"{TARGETS[target].exporter!r}")
    precision = precision or profile.default_precision
    if precision not in profile.precisions:
        raise UsageError(f"--precision: target {target!r} supports {', '.join(profile.precisions)}, "
                         f"not {precision!r}")
    opts = exporter.Options.from_dict({**profile.io_options(), **profile.options, **options}, where="options")
    missing = exporter.check_environment()
    if missing:
        raise UsageError(f"--target {target}: missing on this host: {'; '.join(missing)}")

    checkpoint = Path(checkpoint)
    if out is not None and Path(out).exists() and not force:  # fail before the slow part; atomic_dir re-checks
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    model, spec = load_checkpoint(checkpoint)
    input_hw = tuple(int(v) for v in (input_hw or spec.input_hw))
    qat_record = None
    if precision == "int8" and (spec.quant or {}).get("program"):
        # QAT checkpoint (edgeseg qat): export its converted int8 graph, which carries the learned scales
        from edgeseg.quant.qat import check_export_target, load_qat_program

        check_export_target(spec.quant, target, str(checkpoint))
        if tuple(getattr(opts, "keep_float", ()) or ()):
            raise UsageError(f"options.keep_float: {checkpoint} is a QAT checkpoint whose float modules were fixed "
                             "in training (edgeseg qat --keep-float); its int8 graph cannot change them")
        model, qat_record = load_qat_program(checkpoint)
        if list(input_hw) != list(qat_record.get("input_hw", input_hw)):
            raise UsageError(f"--input-size: the QAT program of {checkpoint} is for "
                             f"{qat_record['input_hw'][0]}x{qat_record['input_hw'][1]}")
    else:
        model = prepare_for_export(model, input_hw)
    wrapper = ExportWrapper(model, input_hw, spec.mean, spec.std, input_dtype=opts.input_dtype,
                            input_layout=opts.input_layout, output=opts.output).eval()
    wrapper.prequantized = qat_record  # exporters skip their PTQ when set (quant record of the QAT checkpoint)
    out = Path(out) if out else checkpoint.parent / f"{checkpoint.name}-{target}-{precision}"

    calib_data = None
    if precision == "int8" and qat_record is None:
        calib_data = build_calibration(wrapper, calib, opts.calib_count, spec, data_root=calib_root)

    with atomic_dir(out, force=force) as tmp:
        t0 = time.perf_counter()
        log.info("exporting %s to %s (%s, %dx%d)", spec.model, target, precision, *input_hw)
        result = exporter.export(wrapper, spec, precision, input_hw, calib_data, tmp, opts)
        seconds = time.perf_counter() - t0
        if not result.files:
            raise ArtifactError(f"--target {target}: the exporter wrote no files")
        manifest = Manifest(
            target=target, precision=precision, model=spec.model, model_file=result.files[0],
            input=wrapper.input_contract(), output=wrapper.output_contract(spec.num_classes),
            mean=list(spec.mean), std=list(spec.std), class_names=list(spec.class_names),
            palette=[list(c) for c in spec.palette], ignore_index=spec.ignore_index, input_hw=list(input_hw),
            files=list(result.files), tool_versions={"edgeseg": _edgeseg_version(), **exporter.tool_versions(),
                                                     **result.tool_versions},
            fallback_ops=result.fallback_ops, calibration=calib_data.info if calib_data else None,
            quantization=result.quantization, executed_here=result.executed_here,
            not_executed_reason=result.not_executed_reason,
            source_checkpoint={"path": str(checkpoint.resolve()), "sha256": sha256_tree(checkpoint)},
            options=opts.to_json(), inspection=result.inspection, export_seconds=round(seconds, 2))
        write_manifest(tmp, manifest)
        if result.executed_here:
            manifest.proof = prove(tmp, wrapper, opts.proof_images, opts.num_threads)
            if precision == "fp32" and manifest.proof["argmax_agreement"] < FP32_MIN_AGREEMENT:
                raise ArtifactError(
                    f"--target {target}: the fp32 artifact disagrees with PyTorch: argmax agreement "
                    f"{manifest.proof['argmax_agreement']:.4%} < {FP32_MIN_AGREEMENT:.1%} "
                    f"(max |dlogit| {manifest.proof['max_abs_logit_diff']:.3g}); nothing was written")
        write_manifest(tmp, manifest)
    log.info("wrote %s", out)
    return out


def _edgeseg_version() -> str:
    from edgeseg import __version__

    return __version__


# ----------------------------------------------------------------------------------------------------------------
# Images for calibration and proof
# ----------------------------------------------------------------------------------------------------------------
def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: unreadable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    import cv2

    if img.shape[:2] == tuple(hw):
        return img
    return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def _image_pairs(root: Path, count: int) -> tuple[list[np.ndarray], list[np.ndarray | None], str]:
    """Up to `count` (image, label or None) from a dataset root (edgeseg.data.datasets when available) or a plain
    folder of images. Deterministic order (sorted, evenly spaced)."""
    try:
        from edgeseg.data.datasets import open_dataset
    except ImportError:
        open_dataset = None
    if open_dataset is not None:
        for split in ("train", "val"):
            try:
                ds = open_dataset(root, split=split)
            except Exception:  # noqa: BLE001 - not a dataset layout: try the plain-folder reading below
                continue
            n = len(ds)
            idx = np.linspace(0, n - 1, min(count, n)).round().astype(int) if n else []
            imgs, labels = [], []
            for i in dict.fromkeys(int(i) for i in idx):
                img, lab = ds[i]
                imgs.append(np.asarray(img))
                labels.append(np.asarray(lab))
            if imgs:
                return imgs, labels, f"{root} (split {split})"
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES
                   and "annot" not in str(p.parent.name).lower() and "label" not in str(p.parent.name).lower())
    if not files:
        raise DataError(f"{root}: no images found (expected a dataset root or a folder of .png/.jpg)")
    idx = np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)
    files = [files[i] for i in dict.fromkeys(int(i) for i in idx)]
    return [_read_rgb(p) for p in files], [None] * len(files), str(root)


def default_images(count: int) -> tuple[list[np.ndarray], list[np.ndarray | None], str]:
    """The embedded CamVid mini set when installed, else deterministic random RGB images."""
    try:
        from edgeseg.data.embedded import default_data_dir

        root = default_data_dir()
        files = sorted(p for p in (root / "val").iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if files:
            idx = np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)
            files = [files[i] for i in dict.fromkeys(int(i) for i in idx)]
            return [_read_rgb(p) for p in files], [None] * len(files), f"embedded {root.name} val"
    except Exception as e:  # noqa: BLE001 - the embedded data is optional
        log.debug("embedded data unavailable: %s", e)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(count)]
    return imgs, [None] * count, "random uint8 images (seed 0)"


def _calibration_recipe(calib) -> str | None:
    """`calib` when it names a calibration recipe (a name in calibration/ or a .toml file), else None."""
    if calib is None:
        return None
    text = str(calib)
    if text.endswith(".toml") and Path(text).is_file():
        return text
    if Path(text).exists():
        return None
    try:
        from edgeseg.quant.calibration import list_recipes
    except ImportError:
        return None
    return text if text in list_recipes() else None


def build_calibration(wrapper, calib: str | Path | None, count: int, spec, data_root: str | Path | None = None):
    """CalibrationData for an int8 export: images from `calib` (or the default images) resized to the export
    size, in the wrapper's input contract, with the manifest's `calibration` info (source, count, class coverage
    when labels are available)."""
    from edgeseg.export.base import CalibrationData

    if count < 1:
        raise UsageError("options.calib_count: must be at least 1 for an int8 export")
    recipe = _calibration_recipe(calib)
    if recipe is not None:  # a calibration/*.toml recipe (edgeseg.quant.calibration): its own selection rules
        from edgeseg.quant.calibration import build_calibration_set

        cset = build_calibration_set(recipe, wrapper.input_hw, spec.mean, spec.std, data_root=data_root)
        return cset.to_calibration_data(wrapper)
    if calib is not None:
        if not Path(calib).exists():
            raise UsageError(f"--calib: {calib} does not exist")
        imgs, labels, source = _image_pairs(Path(calib), count)
    else:
        imgs, labels, source = default_images(count)
    inputs = [wrapper.make_input(_resize(im, wrapper.input_hw)) for im in imgs]
    info: dict[str, Any] = {"source": source, "count": len(inputs), "input_hw": list(wrapper.input_hw)}
    labelled = [lab for lab in labels if lab is not None]
    if labelled:
        k = spec.num_classes
        hist = np.zeros(k, dtype=np.int64)
        for lab in labelled:
            lab = lab.astype(np.int64).ravel()
            lab = lab[(lab >= 0) & (lab < k)]
            hist += np.bincount(lab, minlength=k)[:k]
        total = max(int(hist.sum()), 1)
        info["class_pixel_share"] = {spec.class_names[i]: round(float(hist[i]) / total, 5) for i in range(k)}
        info["classes_missing"] = [spec.class_names[i] for i in range(k) if hist[i] == 0]
    if count > len(inputs):
        log.warning("calibration: asked for %d images, %s has %d", count, source, len(inputs))
    return CalibrationData(inputs=inputs, info=info)


def prove(artifact_dir: Path, wrapper, num_images: int, num_threads: int = 1) -> dict[str, Any]:
    """Run the artifact in its runtime and eager `wrapper` on the same inputs; return the proof record.

    Returns:
        {source, images, argmax_agreement (0..1), max_abs_logit_diff (None for argmax outputs), seconds}.
    """
    from edgeseg.runtime import open_session

    imgs, _, source = default_images(max(1, num_images))
    inputs = [wrapper.make_input(_resize(im, wrapper.input_hw)) for im in imgs]
    agree = total = 0
    max_diff = 0.0
    t0 = time.perf_counter()
    with open_session(artifact_dir, num_threads=num_threads) as sess:
        for x in inputs:
            with torch.no_grad():
                ref = wrapper(x).numpy()
            got = np.asarray(sess.run(x.numpy()))
            if got.shape != ref.shape:
                raise ArtifactError(f"{artifact_dir}: artifact output shape {got.shape} != eager {ref.shape}")
            if wrapper.output == "argmax":
                agree += int((got == ref).sum())
                total += ref.size
            else:
                agree += int((got.argmax(1) == ref.argmax(1)).sum())
                total += ref.shape[0] * ref.shape[2] * ref.shape[3]
                max_diff = max(max_diff, float(np.abs(got.astype(np.float64) - ref).max()))
    return {"source": source, "images": len(inputs), "argmax_agreement": agree / max(total, 1),
            "max_abs_logit_diff": None if wrapper.output == "argmax" else max_diff,
            "seconds": round(time.perf_counter() - t0, 2)}


__all__ = ["TARGETS", "Target", "export_checkpoint", "get_exporter", "build_calibration", "prove",
           "FP32_MIN_AGREEMENT"]
