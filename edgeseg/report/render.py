"""Render validation + bench records (JSON) into one report folder: report.md, report.html, results.json, PNGs.

Never runs a model: everything comes from the records `edgeseg.eval.validate.validate` and
`edgeseg.eval.bench.bench` return (and the npz maps validate saves), so a report can be rebuilt from the JSON.
mIoU and friends are 0..1 fractions in the records and percentages here. A record's `cpu` (host_cpu().to_json(),
stamped by the pipeline) names the CPU its latency was measured on. report.html is the same report in one
self-contained page: the plots are inlined as base64 PNG data URIs, so it can be mailed or archived alone.
"""
from __future__ import annotations

import base64
import html
import logging
import re
from pathlib import Path
from typing import Any, Sequence

from edgeseg.cpu import cpu_label  # re-exported: the reports and tables name the CPU of every latency
from edgeseg.errors import printable

log = logging.getLogger(__name__)

COLUMNS = ("target", "precision", "status", "mIoU %", "drop pts", "agree %", "bnd/int dis %", "p50 ms",
           "size MB", "int8 x", "check")
# the plots render() writes: a previous render's files of these names are removed unless written again
_PLOT_NAMES = ("accuracy_vs_latency.png", "per_class_iou_delta.png", "disagreement_*.png")


def merge(validation: Sequence[dict[str, Any]], bench: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """One row per artifact: the validation record's accuracy fields plus the bench record's latency.

    Artifacts are matched by path; an artifact only in `bench` still gets a row. Every latency in the p50 column is
    one measurement: bench's when there are bench records (a row bench did not run has none; validate's per-image
    `segment()` time stays in `validate_segment_ms`), else validate's for every row (`latency_source` says which)."""
    bench_by = {str(Path(b["artifact"])): b for b in bench}
    rows, seen = [], set()
    for v in validation:
        key = str(Path(v["artifact"]))
        seen.add(key)
        rows.append(_row(v, bench_by.get(key), validate_latency=not bench))
    for key, b in bench_by.items():
        if key not in seen:
            rows.append(_row(None, b))
    return rows


def _row(v: dict[str, Any] | None, b: dict[str, Any] | None, validate_latency: bool = False) -> dict[str, Any]:
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
    row["cpu"] = (b or {}).get("cpu") or (v or {}).get("cpu")  # where the latency below was measured
    row["float_compute"] = (b or {}).get("float_compute") or (v or {}).get("float_compute")
    if b and b.get("status") == "ok":
        row.update(p50_ms=b["latency_ms"]["p50"], p90_ms=b["latency_ms"]["p90"], mean_ms=b["latency_ms"]["mean"],
                   latency_source="bench: Session.run", threads=b.get("threads"),
                   speedup_vs_fp32=b.get("speedup_vs_fp32"), int8_not_faster=b.get("int8_not_faster"),
                   peak_rss_mb=b.get("peak_rss_mb"))
    else:
        # one measurement per column: with bench records, an artifact bench did not run has no latency (validate's
        # per-image time is another measurement); a validate-only report uses validate's time for every row
        lat = (v or {}).get("latency_ms") or {}
        use = validate_latency and lat.get("p50") is not None
        row.update(p50_ms=lat.get("p50") if use else None, p90_ms=lat.get("p90") if use else None,
                   mean_ms=lat.get("mean") if use else None,
                   latency_source="validate: segment() per image" if use else None, threads=None,
                   speedup_vs_fp32=None, int8_not_faster=None, peak_rss_mb=None, validate_segment_ms=lat.get("p50"))
    if row["status"] == "failed":
        row["passed"] = False
    return row


def latency_hosts(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per CPU the rows' latencies were measured on ('<cpu>: <target precision>, ...' when several)."""
    timed = [r for r in rows if r.get("p50_ms") is not None]
    groups: dict[str, list[str]] = {}
    for r in timed:
        groups.setdefault(cpu_label(r.get("cpu")), []).append(f"{r.get('target')} {r.get('precision')}")
    if len(groups) == 1:
        return [next(iter(groups))]
    return [f"{label}: {', '.join(names)}" for label, names in groups.items()]


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
    precision = str(r.get("precision") or "–")
    if r.get("float_compute") not in (None, "fp32"):  # the runtime computes the float parts in another precision
        precision += f" ({r['float_compute']} compute)"
    return [str(r.get("target") or r.get("name")), precision, status, _pct(r.get("miou")),
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
        c = [printable(v) for v in row_cells(r)]  # names and errors from files: no terminal escape sequences
        if len(c[-1]) > max_check:
            c[-1] = c[-1][: max_check - 1] + "…"
        cells.append(c)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(COLUMNS)]
    fmt = lambda cs: "  ".join(s.ljust(w) for s, w in zip(cs, widths)).rstrip()  # noqa: E731
    hosts = [f"latency measured on: {h}" for h in latency_hosts(rows)]
    return "\n".join([fmt(COLUMNS), fmt(["-" * w for w in widths]), *(fmt(c) for c in cells), *hosts])


def render(validation: Sequence[dict[str, Any]] | str | Path, bench: Sequence[dict[str, Any]] | str | Path | None,
           out_dir: str | Path, notes: Sequence[str] = (), title: str = "edgeseg validation report",
           base: str | Path | None = None) -> Path:
    """Write `out_dir/report.md`, `out_dir/report.html` (self-contained), `out_dir/results.json` and PNG plots;
    returns the report.md path. Plots of a previous render that this one does not write again are removed.

    Args:
        validation: validate records, or the path of a JSON file holding them.
        bench: bench records, a JSON path, or None.
        out_dir: report folder (created; files inside are replaced atomically one by one).
        notes: extra lines for the report (e.g. how calibration and evaluation images were chosen).
        title: first heading.
        base: the folder that relative paths in the records (the npz maps) are relative to (a pipeline run
            folder's records are relative to it); None: the working directory. Records are written as given.
    """
    from edgeseg.eval.validate import load_records
    from edgeseg.fileio import write_json, write_text
    from edgeseg.report import plots

    if isinstance(validation, (str, Path)):
        validation = load_records(validation)
    root = Path(base) if base is not None else Path()
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
        maps = root / r["maps"] if r.get("maps") else None  # an absolute path stays itself
        if maps is not None and r.get("precision") != "fp32" and maps.is_file():
            ref = r.get("reference") or {}
            ref_name = f"{ref.get('kind', 'reference')} {Path(ref.get('path', '')).name}".strip()
            p = plots.disagreement_maps(maps, out / f"disagreement_{r['name']}.png",
                                        title=f"{r['target']} {r['precision']} vs {ref_name}",
                                        ref_label=f"reference ({ref_name})",
                                        pred_label=f"{r['target']} {r['precision']}")
            if p:
                images.append((f"Disagreement maps: {r['target']} {r['precision']}", p))
    _remove_stale_plots(out, {p.name for _, p in images})

    blocks = _blocks(rows, validation, notes, title, images)
    write_json(out / "results.json", {"rows": rows, "validation": list(validation), "bench": list(bench),
                                      "notes": list(notes)})
    write_text(out / "report.html", _html(blocks, title))
    path = out / "report.md"
    write_text(path, _markdown(blocks))
    log.info("report: %s", path)
    return path


def _remove_stale_plots(out: Path, keep: set[str]) -> None:
    for pattern in _PLOT_NAMES:
        for f in out.glob(pattern):
            if f.name not in keep and f.is_file():
                f.unlink()


# A report is a list of blocks, written out as Markdown and as HTML: ("h1"|"h2", text), ("ul", [items]),
# ("p", text), ("table", rows), ("img", (caption, png path)). Texts use `code` and **bold** only.
Block = tuple[str, Any]


def _blocks(rows, validation, notes, title, images) -> list[Block]:
    blocks: list[Block] = [("h1", title)]
    head = []
    models = sorted({str(r["model"]) for r in rows if r.get("model")})
    data = next((v.get("data") for v in validation if v.get("data")), None)
    if models:
        head.append(f"Model: {', '.join(models)}")
    if data:
        head.append(f"Evaluation data: `{data['root']}` split `{data['split']}`, {data['num_images']} images")
    head += [f"Latency measured on: {h}" for h in latency_hosts(rows)]
    head += list(notes)
    head.append("mIoU, agreement in %; drop = reference mIoU − artifact mIoU in points; bnd/int dis = disagreement "
                "rate on boundary / interior pixels of the reference map; p50 = bench `Session.run` latency (batch "
                "1), empty where bench did not run the artifact (a validate-only report: validate's per-image `segment()` "
                "time for every row); int8 x = fp32 p50 / int8 p50.")
    blocks += [("ul", head), ("table", list(rows))]
    failed = [r for r in rows if r["status"] == "failed" or r.get("passed") is False]
    if failed:
        blocks += [("h2", "Failures"), ("ul", [f"**{r.get('target') or r['name']} {r.get('precision') or ''}**: "
                                               f"{r.get('error') or '; '.join(r['reasons'])}" for r in failed])]
    slow = [r for r in rows if r.get("int8_not_faster")]
    if slow:
        blocks += [("h2", "int8 not faster than fp32"),
                   ("ul", [f"{r['target']}: int8/fp32 speedup {r['speedup_vs_fp32']:.2f}" for r in slow])]
    fb = [r for r in rows if r.get("fallback_ops")]
    blocks += [("h2", "Ops off the accelerator (fallbacks)"),
               ("ul", [f"{r['target']} {r['precision']}: {', '.join(r['fallback_ops'])}" for r in fb]
                or ["none reported" if rows else "no artifacts"])]
    calib = [r for r in rows if r.get("calibration")]
    if calib:
        items = []
        for r in calib:
            c = r["calibration"]
            missing = c.get("classes_missing")
            items.append(f"{r['target']} {r['precision']}: {c.get('count', '?')} images from {c.get('source', '?')}"
                         + (f"; classes absent from the calibration images: {', '.join(missing)}" if missing else ""))
        blocks += [("h2", "Calibration (int8)"), ("ul", items)]
    not_run = [r for r in rows if r["status"] == "not run"]
    if not_run:
        blocks += [("h2", "Converted, not run on this host"),
                   ("ul", [f"{r['target']} {r['precision']}: {'; '.join(r['notes']) or 'not executable here'}"
                           for r in not_run])]
    for name, p in images:
        blocks += [("h2", name), ("img", (name, p))]
    return blocks


def _markdown(blocks: Sequence[Block]) -> str:
    md: list[str] = []
    for kind, val in blocks:
        if kind == "h1":
            md += [f"# {val}", ""]
        elif kind == "h2":
            md += [f"## {val}", ""]
        elif kind == "ul":
            md += [f"- {item}" for item in val] + [""]
        elif kind == "p":
            md += [val, ""]
        elif kind == "table":
            md += [markdown_table(val), ""]
        elif kind == "img":
            md += [f"![{val[0]}]({val[1].name})", ""]
    return "\n".join(md)


def _inline(text: str) -> str:
    """Escaped HTML of a block text, with `code` and **bold**."""
    out = html.escape(str(text))
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)


_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222}table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;
padding:4px 8px;text-align:left;vertical-align:top}th{background:#f0f0f0}tr.failed td{background:#fde8e8}
td.num{text-align:right;font-variant-numeric:tabular-nums}code{background:#f4f4f4;padding:0 3px}
img{max-width:100%;border:1px solid #ddd}h2{margin-top:1.6em;border-bottom:1px solid #eee}"""


def _html(blocks: Sequence[Block], title: str) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    numeric = {"mIoU %", "drop pts", "agree %", "p50 ms", "size MB"}
    for kind, val in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{_inline(val)}</{kind}>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in val) + "</ul>")
        elif kind == "p":
            parts.append(f"<p>{_inline(val)}</p>")
        elif kind == "table":
            parts.append('<table class="results"><thead><tr>' + "".join(f"<th>{html.escape(c)}</th>"
                                                                         for c in COLUMNS) + "</tr></thead><tbody>")
            for r in val:
                cls = ' class="failed"' if r["status"] == "failed" or r.get("passed") is False else ""
                cells = "".join(f'<td{" class=num" if col in numeric else ""}>{html.escape(c)}</td>'
                                for col, c in zip(COLUMNS, row_cells(r)))
                parts.append(f"<tr{cls}>{cells}</tr>")
            parts.append("</tbody></table>")
        elif kind == "img":
            caption, path = val
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
