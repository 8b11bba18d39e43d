"""Export: the target table and `export_checkpoint`, which turns a checkpoint into a proven artifact folder
(calibration images: edgeseg.quant.calibration; the proof: edgeseg.export.proof).

A target's facts live in its profile (`export_targets/<name>.toml`, read by `edgeseg.targets`); `TARGETS` is a
view of them (exporter and runtime module per target). Nothing heavy is imported here.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeseg import vendorlog
from edgeseg.errors import ArtifactError, UsageError

if TYPE_CHECKING:
    from edgeseg.targets import TargetProfile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A target's exporter and runtime modules (a view of its profile, edgeseg.targets)."""

    exporter: str
    runtime: str


def __getattr__(name: str):
    # TARGETS is derived from the profiles on first use (loading them imports the light exporter modules,
    # which import this package)
    if name == "TARGETS":
        from edgeseg.targets import all_profiles

        return {n: Target(exporter=p.exporter, runtime=p.runtime) for n, p in all_profiles().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ResolvedTarget:
    """A target resolved once per export and passed down: its profile (checked against the exporter), the exporter,
    the precision and the exporter's checked options (the profile's under the caller's overrides). The export reads
    the profile only in `_resolve` (the sessions that the proof and the device kit open still find their runtime
    module through the profile: edgeseg.runtime.open_session)."""

    name: str
    profile: "TargetProfile"
    exporter: Any
    precision: str
    options: Any


def get_exporter(target: str):
    """Instantiate the exporter of `target` (imports edgeseg/targets/<package>/exporter.py, which is light)."""
    from edgeseg.export.profiles import exporter_class, load_profile

    return exporter_class(load_profile(target))()


@vendorlog.quiet()  # converters' native and Python output goes to the vendor log when a CLI session is open
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
    from edgeseg.export.base import ExportJob
    from edgeseg.outputs import Output, check_outputs
    from edgeseg.quant.calibration import calibration_for_export

    resolved = _resolve(target, precision, options)
    precision, opts = resolved.precision, resolved.options
    checkpoint = Path(checkpoint)
    out = Path(out) if out else checkpoint.parent / f"{checkpoint.name}-{target}-{precision}"
    # fail before the slow part (atomic_dir re-checks): an existing out needs force and must be edgeseg's; never
    # an input
    check_outputs(force, [Output("--out", out, "dir")],
                  [("--checkpoint", checkpoint), ("--calib", calib), ("--data", calib_root)])
    wrapper, spec, input_hw, qat_record = _load_model(checkpoint, resolved, input_hw)
    vendorlog.place(vendorlog.log_name(out))

    calib_data = None
    if precision == "int8" and qat_record is None:
        calib_data = calibration_for_export(wrapper, calib, opts.calib_count, spec, data_root=calib_root)
    # out_dir: the temporary folder, set by _write_artifact
    job = ExportJob(model=wrapper, spec=spec, precision=precision, input_hw=input_hw, out_dir=out, options=opts,
                    calib=calib_data, qat=qat_record, target=resolved.name)
    _write_artifact(resolved, job, checkpoint, out, force)
    log.info("wrote %s", out)
    return out


def _resolve(target: str, precision: str | None, options: dict[str, Any]) -> ResolvedTarget:
    """The target of an export, resolved once: its profile's defaults under the caller's overrides, checked
    against the exporter and this host."""
    from edgeseg.export.profiles import exporter_class, load_profile

    profile = load_profile(target)  # UsageError naming the known targets for an unknown one
    exporter = exporter_class(profile)()
    precision = precision or profile.default_precision
    if precision not in profile.precisions:
        raise UsageError(f"--precision: target {target!r} supports {', '.join(profile.precisions)}, "
                         f"not {precision!r}")
    opts = exporter.Options.from_dict({**profile.io_options(), **profile.options, **options}, where="options")
    missing = exporter.check_environment()
    if missing:
        raise UsageError(f"--target {target}: missing on this host: {'; '.join(missing)}")
    return ResolvedTarget(name=target, profile=profile, exporter=exporter, precision=precision, options=opts)


def _load_model(checkpoint: Path, resolved: ResolvedTarget, input_hw: tuple[int, int] | None):
    """(ExportWrapper, spec, input_hw, QAT record or None): the checkpoint in export form, or for int8 from a QAT
    checkpoint its converted int8 graph."""
    from edgeseg.checkpoint import load_checkpoint
    from edgeseg.export.base import ExportWrapper
    from edgeseg.models import prepare_for_export
    from edgeseg.quant.qat_program import is_qat_record

    target, precision, opts = resolved.name, resolved.precision, resolved.options
    model, spec = load_checkpoint(checkpoint)
    input_hw = tuple(int(v) for v in (input_hw or spec.input_hw))
    qat_record = None
    if precision == "int8" and is_qat_record(spec.quant):
        # QAT checkpoint (edgeseg qat): export its int8 graph, rebuilt with the learned scales
        from edgeseg.export.qat_checkpoint import load_qat_program
        from edgeseg.checkpoint import SPEC
        from edgeseg.quant.qat_program import check_export_target, check_qat_record

        check_qat_record(spec.quant, str(checkpoint / SPEC))
        check_export_target(spec.quant, target, str(checkpoint))
        if tuple(getattr(opts, "keep_float", ()) or ()):
            raise UsageError(f"options.keep_float: {checkpoint} is a QAT checkpoint whose float modules were fixed "
                             "in training (edgeseg qat --keep-float); its int8 graph cannot change them")
        if list(input_hw) != list(spec.quant.get("input_hw", input_hw)):
            raise UsageError(f"--input-size: the QAT graph of {checkpoint} is for "
                             f"{spec.quant['input_hw'][0]}x{spec.quant['input_hw'][1]}")
        model, quant = load_qat_program(checkpoint, loaded=(model, spec))
        # the manifest records the scheme; the node map stays with the checkpoint
        qat_record = {k: v for k, v in quant.items() if k != "fake_quants"}
        qat_record["fake_quant_count"] = len(quant["fake_quants"])
    else:
        model = prepare_for_export(model, input_hw, **resolved.profile.export_form)
    wrapper = ExportWrapper(model, input_hw, spec.mean, spec.std, input_dtype=opts.input_dtype,
                            input_layout=opts.input_layout, output=opts.output).eval()
    return wrapper, spec, input_hw, qat_record


def _write_artifact(resolved: ResolvedTarget, job, checkpoint: Path, out: Path, force: bool) -> None:
    """Export `job` into a temporary folder, write its manifest and, where the artifact runs here, its proof; the
    folder becomes `out` only when all of that passed."""
    from edgeseg.export.base import write_manifest
    from edgeseg.export.device_kit import write_device_kit
    from edgeseg.export.proof import check_fp32_proof, prove
    from edgeseg.fileio import atomic_dir

    exporter, target = resolved.exporter, resolved.name
    with atomic_dir(out, force=force) as tmp:
        job = dataclasses.replace(job, out_dir=tmp)
        t0 = time.perf_counter()
        log.info("exporting %s to %s (%s, %dx%d)", job.spec.model, target, job.precision, *job.input_hw)
        result = exporter.export(job)
        seconds = time.perf_counter() - t0
        if not result.files:
            raise ArtifactError(f"--target {target}: the exporter wrote no files")
        manifest = _manifest(exporter, job, result, resolved, checkpoint, seconds)
        write_manifest(tmp, manifest)
        if result.executed_here:
            manifest.proof = prove(tmp, job.model, job.options.proof_images, job.options.num_threads)
            check_fp32_proof(target, job.precision, manifest.proof)
        # README.md, run_<runtime>.py and expected/ for the device (edgeseg.export.device_kit), hashed in
        # device_kit.sha256; `files` and `sha256` stay the model's
        manifest.device_kit = write_device_kit(tmp, manifest, job.model, resolved.profile.runtime)
        write_manifest(tmp, manifest)


def _manifest(exporter, job, result, resolved: ResolvedTarget, checkpoint: Path, seconds: float):
    """The artifact's manifest (before its proof)."""
    from edgeseg.export.base import Manifest
    from edgeseg.fileio import sha256_tree
    from edgeseg.targets import runtime_record

    spec, wrapper = job.spec, job.model
    return Manifest(
        target=resolved.name, precision=job.precision, model=spec.model, model_file=result.files[0],
        input=wrapper.input_contract(), output=wrapper.output_contract(spec.num_classes),
        mean=list(spec.mean), std=list(spec.std), class_names=list(spec.class_names),
        palette=[list(c) for c in spec.palette], ignore_index=spec.ignore_index, input_hw=list(job.input_hw),
        files=list(result.files), tool_versions={"edgeseg": _edgeseg_version(), **exporter.tool_versions(),
                                                 **result.tool_versions},
        fallback_ops=result.fallback_ops, calibration=job.calib.info if job.calib else None,
        quantization=result.quantization, executed_here=result.executed_here,
        not_executed_reason=result.not_executed_reason,
        source_checkpoint={"path": str(checkpoint.resolve()), "sha256": sha256_tree(checkpoint)},
        options=job.options.to_json(), inspection={**result.inspection, "timings_s": dict(job.timings)},
        export_seconds=round(seconds, 2), runtime=runtime_record(resolved.profile))


def _edgeseg_version() -> str:
    from edgeseg import __version__

    return __version__


__all__ = ["ResolvedTarget", "Target", "export_checkpoint", "get_exporter"]


# `edgeseg.export(checkpoint, target, ...)` calls edgeseg.api.export: this package is also that function (the
# package's class comes from the root package, which owns the public API)
import sys as _sys  # noqa: E402

import edgeseg as _edgeseg  # noqa: E402

_edgeseg._callable_package(_sys.modules[__name__])
