"""Render validation + bench records (JSON) into one report folder: report.md, results.json, PNG plots.

Never runs a model: everything comes from the records `edgeseg.eval.validate.validate` and
`edgeseg.eval.bench.bench` return (and the npz maps validate saves), so a report can be rebuilt from the JSON.
mIoU and friends are 0..1 fractions in the records and percentages here.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

COLUMNS = ("target", "precision", "status", "mIoU %", "drop pts", "agree %", "bnd/int dis %", "p50 ms",
           "size MB", "int8 x", "check")


def merge(validation: Sequence[dict[str, Any]], bench: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """One row per artifact: the validation record's accuracy fields plus the bench record's latency.

    Artifacts are matched by path; an artifact only in `bench` still gets a row. p50/p90 come from bench when
    it ran, else from validate's per-image timing (marked in `latency_source`)."""
    bench_by = {str(Path(b["artifact"])): b for b in bench}
    rows, seen = [], set()
    for v in validation:
        key = str(Path(v["artifact"]))
        seen.add(key)
        rows.append(_row(v, bench_by.get(key)))
    for key, b in bench_by.items():
        if key not in seen:
            rows.append(_row(None, b))
    return rows


def _row(v: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    src = v or b or {}
    row = {k: src.get(k) for k in ("artifact", "name", "target", "precision", "model", "input_hw")}
    statuses = [r["status"] for r in (v, b) if r]
    errors = [r.get("error") for r in (v, b) if r and r.get("status") == "failed" and r.get("error")]
    row["status"] = "failed" if "failed" in statuses else ("not run" if "not run" in statuses else "ok")
    row["error"] = errors[0] if errors else None
    for k in ("miou", "aacc", "macc", "miou_drop", "agreement", "boundary_disagreement", "interior_disagreement",
              "disagreement_on_boundary_share", "per_class_iou", "per_class_iou_delta", "class_names", "reference",
              "passed", "maps", "num_images", "calibration"):
        row[k] = (v or {}).get(k)
    row["reasons"] = list((v or {}).get("reasons") or [])
    row["notes"] = list((v or {}).get("notes") or [])
    row["size_bytes"] = src.get("size_bytes") if v is None else (v.get("size_bytes") or (b or {}).get("size_bytes"))
    row["fallback_ops"] = (v or b or {}).get("fallback_ops")
    if b and b.get("status") == "ok":
        row.update(p50_ms=b["latency_ms"]["p50"], p90_ms=b["latency_ms"]["p90"], mean_ms=b["latency_ms"]["mean"],
                   latency_source="bench: Session.run", threads=b.get("threads"),
                   speedup_vs_fp32=b.get("speedup_vs_fp32"), int8_not_faster=b.get("int8_not_faster"),
                   peak_rss_mb=b.get("peak_rss_mb"))
    else:
        lat = (v or {}).get("latency_ms") or {}
        row.update(p50_ms=lat.get("p50"), p90_ms=lat.get("p90"), mean_ms=lat.get("mean"),
                   latency_source="validate: segment() per image" if lat.get("p50") is not None else None,
                   threads=None, speedup_vs_fp32=None, int8_not_faster=None, peak_rss_mb=None)
    if row["status"] == "failed":
        row["passed"] = False
    return row


def _pct(v, digits=2):
    return "–" if v is None else f"{100 * v:.{digits}f}"


def _num(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


def row_cells(r: dict[str, Any]) -> list[str]:
    """The table cells of one merged row (see COLUMNS)."""
    if r["status"] == "failed":
        status = "FAILED"
    elif r["status"] == "not run":
        status = "converted, not run"
    else:
        status = "ok"
    bnd = ("–" if r.get("boundary_disagreement") is None else
           f"{_pct(r['boundary_disagreement'])}/{_pct(r['interior_disagreement'])}")
    speed = "–"
    if r.get("speedup_vs_fp32") is not None:
        speed = f"{r['speedup_vs_fp32']:.2f}" + (" (not faster)" if r.get("int8_not_faster") else "")
    if r["status"] == "failed":
        check = "FAILED: " + (r.get("error") or "; ".join(r.get("reasons") or []))
    elif r.get("passed") is None:
        check = "not run" if r["status"] == "not run" else "no reference"
    else:
        check = "pass" if r["passed"] else "FAIL: " + "; ".join(r["reasons"])
    return [str(r.get("target") or r.get("name")), str(r.get("precision") or "–"), status, _pct(r.get("miou")),
            _num(None if r.get("miou_drop") is None else 100 * r["miou_drop"]), _pct(r.get("agreement")), bnd,
            _num(r.get("p50_ms")), _num(None if r.get("size_bytes") is None else r["size_bytes"] / 1e6),
            speed, check]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row_cells(r)) + " |")
    return "\n".join(lines)


def text_table(rows: Sequence[dict[str, Any]], max_check: int = 70) -> str:
    """Plain-text table for the terminal (the check column is cut to `max_check` characters)."""
    cells = []
    for r in rows:
        c = row_cells(r)
        if len(c[-1]) > max_check:
            c[-1] = c[-1][: max_check - 1] + "…"
        cells.append(c)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(COLUMNS)]
    fmt = lambda cs: "  ".join(s.ljust(w) for s, w in zip(cs, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(COLUMNS), fmt(["-" * w for w in widths]), *(fmt(c) for c in cells)])


def render(validation: Sequence[dict[str, Any]] | str | Path, bench: Sequence[dict[str, Any]] | str | Path | None,
           out_dir: str | Path, notes: Sequence[str] = (), title: str = "edgeseg validation report") -> Path:
    """Write `out_dir/report.md`, `out_dir/results.json` and PNG plots; returns the report.md path.

    Args:
        validation: validate records, or the path of a JSON file holding them.
        bench: bench records, a JSON path, or None.
        out_dir: report folder (created; files inside are replaced atomically one by one).
        notes: extra lines for the report (e.g. how calibration and evaluation images were chosen).
        title: first heading.
    """
    from edgeseg.eval.validate import load_records
    from edgeseg.fileio import write_json, write_text
    from edgeseg.report import plots

    if isinstance(validation, (str, Path)):
        validation = load_records(validation)
    if isinstance(bench, (str, Path)):
        bench = load_records(bench)
    bench = bench or []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = merge(validation, bench)

    images: list[tuple[str, Path]] = []
    p = plots.accuracy_vs_latency(rows, out / "accuracy_vs_latency.png")
    if p:
        images.append(("Accuracy vs latency", p))
    class_names = next((r["class_names"] for r in rows if r.get("class_names")), None)
    if class_names:
        p = plots.iou_delta_chart(rows, class_names, out / "per_class_iou_delta.png")
        if p:
            images.append(("Per-class IoU change against the reference", p))
    for r in rows:
        if r.get("maps") and r.get("precision") != "fp32" and Path(r["maps"]).is_file():
            ref = r.get("reference") or {}
            ref_name = f"{ref.get('kind', 'reference')} {Path(ref.get('path', '')).name}".strip()
            p = plots.disagreement_maps(r["maps"], out / f"disagreement_{r['name']}.png",
                                        title=f"{r['target']} {r['precision']} vs {ref_name}",
                                        ref_label=f"reference ({ref_name})",
                                        pred_label=f"{r['target']} {r['precision']}")
            if p:
                images.append((f"Disagreement maps: {r['target']} {r['precision']}", p))

    md = [f"# {title}", ""]
    models = sorted({str(r["model"]) for r in rows if r.get("model")})
    data = next((v.get("data") for v in validation if v.get("data")), None)
    if models:
        md.append(f"- Model: {', '.join(models)}")
    if data:
        md.append(f"- Evaluation data: `{data['root']}` split `{data['split']}`, {data['num_images']} images")
    for n in notes:
        md.append(f"- {n}")
    md += ["- mIoU, agreement in %; drop = reference mIoU − artifact mIoU in points; bnd/int dis = disagreement "
           "rate on boundary / interior pixels of the reference map; p50 = bench `Session.run` latency (batch 1) "
           "when benchmarked, else validate's per-image `segment()` time; int8 x = fp32 p50 / int8 p50.", "",
           markdown_table(rows), ""]
    failed = [r for r in rows if r["status"] == "failed" or r.get("passed") is False]
    if failed:
        md += ["## Failures", ""]
        md += [f"- **{r.get('target') or r['name']} {r.get('precision') or ''}**: "
               f"{r.get('error') or '; '.join(r['reasons'])}" for r in failed]
        md.append("")
    slow = [r for r in rows if r.get("int8_not_faster")]
    if slow:
        md += ["## int8 not faster than fp32", ""]
        md += [f"- {r['target']}: int8/fp32 speedup {r['speedup_vs_fp32']:.2f}" for r in slow]
        md.append("")
    fb = [r for r in rows if r.get("fallback_ops")]
    md += ["## Ops off the accelerator (fallbacks)", ""]
    if fb:
        md += [f"- {r['target']} {r['precision']}: {', '.join(r['fallback_ops'])}" for r in fb]
    else:
        md.append("- none reported" if rows else "- no artifacts")
    md.append("")
    calib = [r for r in rows if r.get("calibration")]
    if calib:
        md += ["## Calibration (int8)", ""]
        for r in calib:
            c = r["calibration"]
            missing = c.get("classes_missing")
            md.append(f"- {r['target']} {r['precision']}: {c.get('count', '?')} images from {c.get('source', '?')}"
                      + (f"; classes absent from the calibration images: {', '.join(missing)}" if missing else ""))
        md.append("")
    not_run = [r for r in rows if r["status"] == "not run"]
    if not_run:
        md += ["## Converted, not run on this host", ""]
        md += [f"- {r['target']} {r['precision']}: {'; '.join(r['notes']) or 'not executable here'}"
               for r in not_run]
        md.append("")
    for name, p in images:
        md += [f"## {name}", "", f"![{name}]({p.name})", ""]
    write_json(out / "results.json", {"rows": rows, "validation": list(validation), "bench": list(bench),
                                      "notes": list(notes)})
    path = out / "report.md"
    write_text(path, "\n".join(md))
    log.info("report: %s", path)
    return path
