"""Accuracy budget for int8: export, validate on the target's own runtime against the fp32 checkpoint, and keep
the most sensitive layers in float until the mIoU drop fits (like NNCF's accuracy control, on every target).

Loop (greedy, bounded): round 0 exports int8 with the user's float policy; while the drop on the validation split
exceeds the budget, the next most sensitive layers (SQNR ranking of `edgeseg.quant.sensitivity`, cheap: no
per-layer mIoU) are added to `keep_float` and the target's exporter runs again. Round r adds
`per_round * 2**(r-1)` layers, so a large model reaches a few dozen float layers within the round limit.

Calibration and evaluation are disjoint, as in `edgeseg qat`: without `calib` the calibration images are drawn
from `data`'s train split (stratified, seed 0, the target's calib_count), and any calibration source that
shares an image with the evaluated split is refused with one line. A round whose export fell back to random
images (calibration: an error; the export's proof: a warning in the round row, the JSON and the manifest) is
never silent.

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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from edgeseg.errors import ArtifactError, UsageError

log = logging.getLogger(__name__)

from edgeseg.artifact import MANIFEST  # noqa: E402  (the one name of the manifest file)
# the source name edgeseg.quant.calibration.default_images gives its random stand-in images
RANDOM_IMAGES = "random uint8 images"


def check_runnable(target: str) -> None:
    """UsageError when `target`'s int8 artifacts cannot be executed on this host (the budget needs an mIoU): its
    exporter's `why_not_here`. An unknown target passes here (the export names the known ones)."""
    from edgeseg.export import get_exporter
    from edgeseg.targets import list_profiles

    if target not in list_profiles():
        return
    why = get_exporter(target).why_not_here()
    if why:
        raise UsageError(f"--max-miou-drop: the accuracy budget needs a target that runs here, and {why}; use "
                         "quant-report + --keep-float instead")


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
        lines += [f"{'':>5}  WARNING: {w}" for w in r.get("warnings") or []]
    return "\n".join(lines)


def sensitivity_order(checkpoint: str | Path, data: str | Path, split: str, images: int,
                      skip: Callable[[str], bool], scheme=None) -> list[dict[str, Any]]:
    """Layers of the checkpoint's export-form model, most sensitive (lowest int8 SQNR in `scheme`, the target's
    int8 scheme) first, minus `skip`."""
    import torch

    from edgeseg.checkpoint import load_checkpoint
    from edgeseg.data.formats import open_dataset
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
        return layer_sensitivity(model, inputs, layers=names, scheme=scheme)


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
        target: export target; its artifact must run here (UsageError where its exporter's `why_not_here` says not).
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
    from edgeseg.export.budget_calib import calibration_note, calibration_source, write_train_recipe
    from edgeseg.fileio import clean_stale, write_json

    budget = check_budget(max_miou_drop)
    check_runnable(target)
    if per_round < 1 or max_rounds < 1:
        raise UsageError("budget: per_round and max_rounds must be at least 1")
    checkpoint = Path(checkpoint)
    spec = load_spec(checkpoint)
    out = Path(out) if out else checkpoint.parent / f"{checkpoint.name}-{target}-int8"
    from edgeseg.outputs import Output, check_outputs

    check_outputs(force, [Output("--out", out, "dir")], [("--checkpoint", checkpoint), ("--data", data)])
    json_path = Path(json_path) if json_path else out.parent / f"{out.name}.budget.json"
    from edgeseg.quant.qat_program import is_qat_record

    is_qat = is_qat_record(spec.quant)
    base_float = list(options.pop("keep_float", None) or [])
    calib, calib_count = calibration_source(target, data, split, calib, is_qat, options)

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-budget-", dir=out.parent))
    try:
        if calib_count is not None:
            calib = write_train_recipe(data, calib_count, work)
        search = _Search(checkpoint=checkpoint, target=target, data=data, split=split, spec=spec, options=options,
                         base_float=base_float, budget=budget, work=work, calib=calib, input_hw=input_hw,
                         progress=progress, reference=reference, max_images=max_images,
                         sensitivity_images=sensitivity_images)
        winner = search.run(max_rounds, per_round, is_qat, on_round)
        passed = winner is not None
        record = {"passed": passed, "budget": budget, "target": target, "checkpoint": str(checkpoint),
                  "reference": str(reference or checkpoint),
                  "data": {"root": str(data), "split": split, "max_images": max_images},
                  "calibration": calibration_note(calib, data, calib_count), "warnings": search.warnings,
                  "validated_with": _runtime_note(target), "qat_checkpoint": is_qat,
                  "float_layers": list(search.added), "keep_float": base_float + search.added, "rounds": search.rows,
                  "suggested_keep_float": [] if passed else search.suggestion(),
                  "artifact": str(out) if passed else None}
        write_json(json_path, record)
        if passed:
            _publish(winner, out, force, record)
        return {**record, "table": format_table(search.rows, budget), "json": str(json_path)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class _Search:
    """One budget search: what every round exports and validates, and what the rounds found so far."""

    checkpoint: Path
    target: str
    data: str | Path
    split: str
    spec: Any
    options: dict[str, Any]
    base_float: list[str]
    budget: float
    work: Path
    calib: Any
    input_hw: Any
    progress: bool
    reference: str | Path | None
    max_images: int | None
    sensitivity_images: int
    added: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    order: list[str] | None = None

    def ranking(self) -> list[str]:
        """Layer names in the order they go float (computed once, on first use)."""
        if self.order is None:
            self.order = _ranking(self.checkpoint, self.data, self.split, self.sensitivity_images, self.spec,
                                  self.base_float, self.options, _scheme(self.target, self.options))
        return self.order

    def run(self, max_rounds: int, per_round: int, is_qat: bool,
            on_round: Callable[[dict[str, Any]], None] | None) -> Path | None:
        """Rounds until one fits the budget -> its artifact folder, or None."""
        for rnd in range(max_rounds):
            new: list[str] = []
            if rnd > 0:
                if is_qat:
                    break
                want = per_round * 2 ** (rnd - 1)
                new = [n for n in self.ranking() if n not in self.added][:want]
                if not new:
                    break
                self.added += new
            row, art = self.export_round(rnd, new)
            self.rows.append(row)
            if on_round is not None:
                on_round(row)
            log.info("budget round %d: %d float layers, drop %.4f (budget %.4f)", rnd, len(self.added),
                     row["miou_drop"], self.budget)
            if row["fits"]:
                return art
        return None

    def export_round(self, rnd: int, new: list[str]) -> tuple[dict[str, Any], Path]:
        """Export with the current float set and validate it -> (round row, artifact folder)."""
        from edgeseg.eval.validate import Thresholds, validate
        from edgeseg.export import export_checkpoint

        t0 = time.perf_counter()
        keep_float = self.base_float + self.added
        art = export_checkpoint(self.checkpoint, self.target, "int8", input_hw=self.input_hw, calib=self.calib,
                                out=self.work / f"round{rnd}", force=True, progress=self.progress,
                                calib_root=self.data, keep_float=keep_float, **self.options)
        row_warnings = _check_images(art, rnd)
        self.warnings += [w for w in row_warnings if w not in self.warnings]
        # judged by the budget alone (validate's own int8 rules would log FAILED on a fitting round)
        rec = validate([art], self.data, self.split, reference=self.reference or self.checkpoint,
                       max_images=self.max_images, progress=self.progress,
                       thresholds=Thresholds(min_agreement={"int8": 0.0}, max_miou_drop={"int8": self.budget}))[0]
        if rec["status"] == "not run":
            raise UsageError(f"--max-miou-drop: {self.target} artifacts do not run on this host "
                             f"({'; '.join(rec['notes']) or 'not executed'}); the budget needs a runnable target")
        if rec["status"] != "ok" or rec["miou_drop"] is None:
            raise ArtifactError(f"--max-miou-drop: validating round {rnd} ({art}) failed: "
                                f"{rec.get('error') or 'no reference mIoU'}")
        row = {"round": rnd, "added": new, "float_layers": list(self.added), "num_float_layers": len(self.added),
               "keep_float": keep_float, "miou": rec["miou"], "reference_miou": rec["reference_miou"],
               "miou_drop": rec["miou_drop"], "agreement": rec["agreement"],
               "fits": rec["miou_drop"] <= self.budget, "num_images": rec["num_images"],
               "warnings": row_warnings, "seconds": round(time.perf_counter() - t0, 2)}
        return row, art

    def suggestion(self) -> list[str]:
        """The hint after a miss: what to keep float next (for a QAT checkpoint: in `edgeseg qat`)."""
        if self.order is None:
            try:
                self.ranking()
            except Exception as e:  # noqa: BLE001 - a hint only
                log.debug("budget: ranking for the hint failed: %s", e)
                self.order = []
        return [n for n in self.order if n not in self.added][:4]


def _publish(winner: Path, out: Path, force: bool, record: dict[str, Any]) -> None:
    """Move the passing round's artifact to `out`, with the budget record in its manifest."""
    from edgeseg.fileio import atomic_dir, write_json

    with atomic_dir(out, force=force) as tmp:
        for p in winner.iterdir():
            shutil.move(str(p), str(tmp / p.name))
        m = json.loads((tmp / MANIFEST).read_text())
        m.setdefault("quantization", {})["budget"] = {k: v for k, v in record.items() if k != "artifact"}
        write_json(tmp / MANIFEST, m)  # manifest.json is not among the hashed files


def _scheme(target: str, options: dict[str, Any]):
    """The target's int8 scheme for the SQNR ranking (the generic one where it cannot be simulated)."""
    from edgeseg.export.schemes import scheme_for_target

    try:
        return scheme_for_target(target, {k: v for k, v in options.items() if k != "float_defaults"})
    except UsageError as e:
        log.info("budget: ranking with the generic int8 scheme: %s", e)
        return None


def _check_images(art: Path, rnd: int) -> list[str]:
    """Refuse a round calibrated on random images; the warnings of a proof run on random images."""
    m = json.loads((Path(art) / MANIFEST).read_text())
    src = str((m.get("calibration") or {}).get("source") or "")
    if src.startswith(RANDOM_IMAGES):
        raise ArtifactError(f"--max-miou-drop: round {rnd} was calibrated on random images ({src}); "
                            "pass --calib with real images")
    proof = str((m.get("proof") or {}).get("source") or "")
    if proof.startswith(RANDOM_IMAGES):
        msg = (f"round {rnd}: the export's proof ran on {proof}, not real images (the embedded CamVid set is "
               "missing); the budget's mIoU comes from --data")
        log.warning("--max-miou-drop: WARNING: %s", msg)
        return [msg]
    return []


def _runtime_note(target: str) -> str:
    """What validated the rounds here: the profile's `host_run_note`, else its runtime module."""
    from edgeseg.targets import load_profile

    profile = load_profile(target)
    return profile.host_run_note or f"edgeseg.targets.{profile.runtime}.session"


def _ranking(checkpoint, data, split, images, spec, base_float, options, scheme=None) -> list[str]:
    """Layer names in the order they go float: lowest SQNR first, skipping what the policy already keeps float."""
    from edgeseg.checkpoint import load_checkpoint
    from edgeseg.quant.policy import float_policy

    model, _ = load_checkpoint(checkpoint)
    policy = float_policy(model, tuple(base_float), defaults=options.get("float_defaults", True))
    rows = sensitivity_order(checkpoint, data, split, images, policy.covers, scheme=scheme)
    return [r["layer"] for r in rows]


__all__ = ["quantize_with_budget", "format_table", "check_runnable", "check_budget", "sensitivity_order"]
