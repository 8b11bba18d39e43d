"""Accuracy budget for int8: export, validate on the target's own runtime against the fp32 checkpoint, and keep
the most sensitive layers in float until the mIoU drop fits (issue #5, NNCF-accuracy-control-like, every target).

Loop (greedy, bounded): round 0 exports int8 with the user's float policy; while the drop on the validation split
exceeds the budget, the next most sensitive layers (SQNR ranking of `edgeseg.quant.sensitivity`, cheap: no
per-layer mIoU) are added to `keep_float` and the target's exporter runs again. Round r adds
`per_round * 2**(r-1)` layers, so a large model reaches a few dozen float layers within the round limit.

Every round is exported into a hidden work folder beside `out` (`.NAME.tmp-PID-budget-*`, removed at the end,
or by the next write of `out` after a SIGKILL); only a passing artifact is moved to `out`, with the budget record
in its manifest (`quantization.budget`). The round table is written as JSON either way (`<out>.budget.json` by
default). A QAT checkpoint gets one round: its float modules were fixed in training, so a miss is reported with
the most sensitive layers to pass to `edgeseg qat --keep-float`, never "fixed" by silent retraining.

Must not import export runtimes at module level.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from edgeseg.errors import ArtifactError, UsageError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def check_runnable(target: str) -> None:
    """UsageError when `target`'s int8 artifacts cannot be executed on this host (the budget needs an mIoU)."""
    if target == "coreml" and sys.platform != "darwin":
        raise UsageError("--max-miou-drop: the accuracy budget needs a target that runs here, and Core ML runs "
                         f"only on macOS (this host: {sys.platform}); use quant-report + --keep-float instead")


def check_budget(x: float) -> float:
    if not (0.0 <= float(x) < 1.0):
        raise UsageError(f"--max-miou-drop: {x} is not a fraction in [0, 1) (e.g. 0.01 = one mIoU point)")
    return float(x)


def format_table(rows: Sequence[dict[str, Any]], budget: float) -> str:
    """The round table: round, float layers, mIoU, drop, agreement, verdict (percentages)."""
    lines = [f"{'round':>5}  {'float layers':>12}  {'mIoU %':>7}  {'drop pts':>8}  {'agree %':>7}  verdict "
             f"(budget {100 * budget:.2f} pts)"]
    for r in rows:
        added = f" +{', '.join(r['added'])}" if r.get("added") else ""
        lines.append(f"{r['round']:>5}  {r['num_float_layers']:>12}  {100 * r['miou']:>7.2f}  "
                     f"{100 * r['miou_drop']:>8.2f}  {100 * r['agreement']:>7.2f}  "
                     f"{'fits' if r['fits'] else 'over budget'}{added}")
    return "\n".join(lines)


def sensitivity_order(checkpoint: str | Path, data: str | Path, split: str, images: int,
                      skip: Callable[[str], bool]) -> list[dict[str, Any]]:
    """Layers of the checkpoint's export-form model, most sensitive (lowest int8 SQNR) first, minus `skip`."""
    import torch

    from edgeseg.checkpoint import load_checkpoint
    from edgeseg.data.datasets import open_dataset
    from edgeseg.data.transforms import preprocess
    from edgeseg.models import prepare_for_export
    from edgeseg.quant.sensitivity import LAYER_TYPES, layer_sensitivity

    model, spec = load_checkpoint(checkpoint)
    model = prepare_for_export(model, tuple(spec.input_hw))
    ds = open_dataset(data, split=split)
    inputs = [torch.from_numpy(preprocess(ds[i][0], spec.input_hw, spec.mean, spec.std))[None]
              for i in range(min(images, len(ds)))]
    names = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES) and not skip(n)]
    if not names:
        return []
    with torch.no_grad():
        return layer_sensitivity(model, inputs, layers=names)


def quantize_with_budget(checkpoint: str | Path, target: str, data: str | Path, max_miou_drop: float, *,
                         out: str | Path | None = None, force: bool = False, input_hw=None, calib=None,
                         split: str = "val", max_images: int | None = None, per_round: int = 2,
                         max_rounds: int = 5, sensitivity_images: int = 4, json_path: str | Path | None = None,
                         reference: str | Path | None = None,
                         on_round: Callable[[dict[str, Any]], None] | None = None, progress: bool = False,
                         **options: Any) -> dict[str, Any]:
    """Export `checkpoint` to `target` at int8 within an mIoU budget.

    Args:
        checkpoint: fp32 checkpoint (or a QAT checkpoint: one round, no float search).
        target: export target; its artifact must run here (coreml on Linux cannot: UsageError).
        data: dataset root whose `split` is the validation set.
        max_miou_drop: allowed mIoU drop vs the fp32 checkpoint (fraction, 0.01 = one point).
        out: artifact folder (default `<checkpoint>-<target>-int8`); written only on success.
        per_round: layers added to the float set in round 1 (doubling each round after).
        max_rounds: exports in all (round 0 included).
        sensitivity_images: validation images for the SQNR ranking.
        json_path: the round table as JSON (default `<out>.budget.json`).
        reference: the fp32 checkpoint the drop is measured against (default `checkpoint`; `edgeseg qat` passes
            the checkpoint QAT started from).
        on_round: called with each round's row as soon as it is known (the CLI prints it).
        **options: exporter options (as `export_checkpoint`); `keep_float` is the starting float set.
    Returns:
        {passed, artifact (None on failure), budget, rounds: [row...], float_layers, table, json, suggestion}.
    Raises:
        UsageError: bad budget/target/out; ArtifactError: an export or a validation run failed.
    """
    from edgeseg.checkpoint import load_spec
    from edgeseg.eval.validate import Thresholds, validate
    from edgeseg.export import export_checkpoint
    from edgeseg.fileio import atomic_dir, clean_stale, write_json

    budget = check_budget(max_miou_drop)
    check_runnable(target)
    if per_round < 1 or max_rounds < 1:
        raise UsageError("budget: per_round and max_rounds must be at least 1")
    checkpoint = Path(checkpoint)
    spec = load_spec(checkpoint)
    out = Path(out) if out else checkpoint.parent / f"{checkpoint.name}-{target}-int8"
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    json_path = Path(json_path) if json_path else out.parent / f"{out.name}.budget.json"
    is_qat = bool((spec.quant or {}).get("program"))
    base_float = list(options.pop("keep_float", None) or [])
    from edgeseg.data.datasets import open_dataset

    open_dataset(data, split=split)  # a bad --data fails before the first export

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-budget-", dir=out.parent))
    rows: list[dict[str, Any]] = []
    order: list[str] | None = None
    added: list[str] = []
    winner: Path | None = None
    try:
        for rnd in range(max_rounds):
            new: list[str] = []
            if rnd > 0:
                if is_qat:
                    break
                if order is None:
                    order = _ranking(checkpoint, data, split, sensitivity_images, spec, base_float, options)
                want = per_round * 2 ** (rnd - 1)
                new = [n for n in order if n not in added][:want]
                if not new:
                    break
                added += new
            t0 = time.perf_counter()
            art = export_checkpoint(checkpoint, target, "int8", input_hw=input_hw, calib=calib,
                                    out=work / f"round{rnd}", force=True, progress=progress, calib_root=data,
                                    keep_float=base_float + added, **options)
            # judged by the budget alone (validate's own int8 rules would log FAILED on a fitting round)
            rec = validate([art], data, split, reference=reference or checkpoint, max_images=max_images,
                           progress=progress, thresholds=Thresholds(min_agreement={"int8": 0.0},
                                                                    max_miou_drop={"int8": budget}))[0]
            if rec["status"] == "not run":
                raise UsageError(f"--max-miou-drop: {target} artifacts do not run on this host "
                                 f"({'; '.join(rec['notes']) or 'not executed'}); the budget needs a runnable target")
            if rec["status"] != "ok" or rec["miou_drop"] is None:
                raise ArtifactError(f"--max-miou-drop: validating round {rnd} ({art}) failed: "
                                    f"{rec.get('error') or 'no reference mIoU'}")
            row = {"round": rnd, "added": new, "float_layers": list(added), "num_float_layers": len(added),
                   "keep_float": base_float + added, "miou": rec["miou"], "reference_miou": rec["reference_miou"],
                   "miou_drop": rec["miou_drop"], "agreement": rec["agreement"],
                   "fits": rec["miou_drop"] <= budget, "num_images": rec["num_images"],
                   "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            if on_round is not None:
                on_round(row)
            log.info("budget round %d: %d float layers, drop %.4f (budget %.4f)", rnd, len(added),
                     rec["miou_drop"], budget)
            if row["fits"]:
                winner = art
                break
        passed = winner is not None
        suggestion: list[str] = []
        if not passed:
            if order is None:  # the hint: what to keep float next (for a QAT checkpoint: in `edgeseg qat`)
                try:
                    order = _ranking(checkpoint, data, split, sensitivity_images, spec, base_float, options)
                except Exception as e:  # noqa: BLE001 - a hint only
                    log.debug("budget: ranking for the hint failed: %s", e)
                    order = []
            suggestion = [n for n in order if n not in added][:4]
        record = {"passed": passed, "budget": budget, "target": target, "checkpoint": str(checkpoint),
                  "reference": str(reference or checkpoint),
                  "data": {"root": str(data), "split": split, "max_images": max_images},
                  "validated_with": _runtime_note(target), "qat_checkpoint": is_qat,
                  "float_layers": list(added), "keep_float": base_float + added, "rounds": rows,
                  "suggested_keep_float": suggestion, "artifact": str(out) if passed else None}
        write_json(json_path, record)
        if passed:
            with atomic_dir(out, force=force) as tmp:
                for p in winner.iterdir():
                    shutil.move(str(p), str(tmp / p.name))
                m = json.loads((tmp / MANIFEST).read_text())
                m.setdefault("quantization", {})["budget"] = {k: v for k, v in record.items() if k != "artifact"}
                write_json(tmp / MANIFEST, m)  # manifest.json is not among the hashed files
        return {**record, "table": format_table(rows, budget), "json": str(json_path)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _runtime_note(target: str) -> str:
    if target == "jetson-tensorrt":
        return "ONNX Runtime CPU on the QDQ ONNX (TensorRT builds its engine on the Jetson)"
    from edgeseg.export import TARGETS

    return f"edgeseg.runtime.{TARGETS[target].runtime}"


def _ranking(checkpoint, data, split, images, spec, base_float, options) -> list[str]:
    """Layer names in the order they go float: lowest SQNR first, skipping what the policy already keeps float."""
    from edgeseg.checkpoint import load_checkpoint
    from edgeseg.quant.policy import float_policy

    model, _ = load_checkpoint(checkpoint)
    policy = float_policy(model, tuple(base_float), defaults=options.get("float_defaults", True))
    rows = sensitivity_order(checkpoint, data, split, images, policy.covers)
    return [r["layer"] for r in rows]


__all__ = ["quantize_with_budget", "format_table", "check_runnable", "check_budget", "sensitivity_order"]
