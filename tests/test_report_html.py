"""report.html: one self-contained page (plots inlined as PNG data URIs) that a real browser shows with the table
and every plot; re-rendering removes the plots of a previous render that no longer apply; the CPU every latency
was measured on is named. Rendered from records (no model runs); the page is opened in headless Chromium.
"""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeseg.report.render import COLUMNS, cpu_label, render, text_table

CLASSES = ["sky", "road", "car"]
PALETTE = [[128, 128, 128], [128, 64, 128], [64, 0, 128]]
CPU = {"model": "Intel(R) Xeon(R) Test CPU", "machine": "x86_64", "flags": ["avx2", "avx512f", "avx512_vnni",
       "amx_int8"], "vnni": True, "int8_saturates": False, "forced": False}


def _maps(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {"palette": np.array(PALETTE, np.uint8)}
    for i in range(2):
        ref = rng.integers(0, 3, (24, 32)).astype(np.uint8)
        pred = ref.copy()
        pred[rng.random(ref.shape) < 0.1] = 1
        arrays.update({f"image_{i}": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), f"ref_{i}": ref,
                       f"pred_{i}": pred})
    np.savez(path, **arrays)
    return path


def _records(tmp: Path, targets=("onnx", "openvino")) -> tuple[list[dict], list[dict]]:
    vrecs, brecs = [], []
    for k, t in enumerate(targets):
        for prec, miou, p50 in (("fp32", 0.61, 12.0 + k), ("int8", 0.60, 7.0 + k)):
            art = str(tmp / "artifacts" / f"{t}-{prec}")
            v = {"artifact": art, "name": f"{t}-{prec}", "target": t, "precision": prec, "model": "tiny_ops",
                 "input_hw": [24, 32], "status": "ok", "miou": miou, "aacc": 0.9, "macc": 0.7,
                 "miou_drop": 0.61 - miou, "agreement": 0.97, "boundary_disagreement": 0.08,
                 "interior_disagreement": 0.01, "per_class_iou": [0.9, 0.6, 0.3],
                 "per_class_iou_delta": [0.0, -0.01, 0.005], "class_names": CLASSES, "passed": True,
                 "reasons": [], "notes": [], "size_bytes": 2_000_000 if prec == "fp32" else 600_000,
                 "reference": {"kind": "checkpoint", "path": str(tmp / "ckpt")}, "num_images": 2, "cpu": CPU,
                 "data": {"root": str(tmp / "data"), "split": "val", "num_images": 2}}
            if prec == "int8":
                v["maps"] = str(_maps(tmp / f"maps_{t}.npz", k))
            vrecs.append(v)
            brecs.append({"artifact": art, "name": f"{t}-{prec}", "target": t, "precision": prec, "status": "ok",
                          "latency_ms": {"p50": p50, "p90": p50 * 1.1, "mean": p50}, "threads": 2,
                          "speedup_vs_fp32": None if prec == "fp32" else (12.0 + k) / p50,
                          "int8_not_faster": False, "cpu": CPU})
    return vrecs, brecs


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _browser(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp / 'chromium-profile'}", *args, page.resolve().as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=dict(os.environ, HOME=str(tmp)))
    assert p.returncode == 0, p.stderr[-2000:]
    return p


class _Page(HTMLParser):
    """The rendered DOM's table rows (cell texts) and images (src)."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self.imgs: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.imgs.append(dict(attrs).get("src") or "")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _png(data_uri: str) -> np.ndarray:
    assert data_uri.startswith("data:image/png;base64,"), data_uri[:80]
    raw = base64.b64decode(data_uri.split(",", 1)[1], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[0] > 50 and img.shape[1] > 50
    return img


def test_report_html_is_self_contained_and_a_browser_shows_table_and_plots(tmp_path):
    vrecs, brecs = _records(tmp_path)
    out = tmp_path / "report"
    render(vrecs, brecs, out, notes=["Note with `code` & <angle> brackets"], title="edgeseg test report")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["accuracy_vs_latency.png", "disagreement_onnx-int8.png", "disagreement_openvino-int8.png",
                    "per_class_iou_delta.png"], pngs
    page = out / "report.html"
    text = page.read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", text)  # nothing outside the page
    assert "&lt;angle&gt;" in text and "<code>code</code>" in text  # escaped, inline markup kept
    # the CPU of every latency, in both reports
    label = cpu_label(CPU)
    assert label == "Intel(R) Xeon(R) Test CPU (AVX2, AVX-512, VNNI, AMX)"
    assert f"Latency measured on: {label}" in (out / "report.md").read_text()
    assert f"latency measured on: {label}" in text_table(_merged(vrecs, brecs))

    # moved away from its folder, the page still has everything (no sibling files needed)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(page, alone / "report.html")
    dom = _browser(alone / "report.html", tmp_path, "--dump-dom").stdout
    parsed = _Page()
    parsed.feed(dom)
    assert parsed.rows[0] == list(COLUMNS), parsed.rows[:1]
    body = [r for r in parsed.rows[1:] if r]
    assert [(r[0], r[1], r[2]) for r in body] == [("onnx", "fp32", "ok"), ("onnx", "int8", "ok"),
                                                  ("openvino", "fp32", "ok"), ("openvino", "int8", "ok")]
    assert body[0][COLUMNS.index("mIoU %")] == "61.00" and body[1][COLUMNS.index("p50 ms")] == "7.00"
    assert len(parsed.imgs) == len(pngs)  # one <img> per plot, each a valid PNG
    for src in parsed.imgs:
        _png(src)
    assert label in dom

    shot = tmp_path / "shot.png"
    _browser(alone / "report.html", tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    img = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[:2] == (1600, 1200)
    assert img.std() > 20 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not blank: text, table, plots


def _merged(vrecs, brecs):
    from edgeseg.report.render import merge

    return merge(vrecs, brecs)


def test_rerender_removes_stale_plots_and_replaces_pages(tmp_path):
    vrecs, brecs = _records(tmp_path)
    out = tmp_path / "report"
    render(vrecs, brecs, out)
    assert (out / "disagreement_openvino-int8.png").is_file()
    (out / "notes.txt").write_text("mine")  # not a plot of ours: kept
    keep = [r for r in vrecs if r["target"] == "onnx"]
    render(keep, [b for b in brecs if b["target"] == "onnx"], out)
    assert sorted(p.name for p in out.glob("*.png")) == ["accuracy_vs_latency.png", "disagreement_onnx-int8.png",
                                                         "per_class_iou_delta.png"]
    assert (out / "notes.txt").read_text() == "mine"
    assert "openvino" not in (out / "report.html").read_text()
    # no plot at all (no latency, no deltas, no maps): every old plot goes
    bare = [{**r, "per_class_iou_delta": None, "maps": None} for r in keep]
    render(bare, [], out)
    assert sorted(p.name for p in out.glob("*.png")) == []
    assert "<img" not in (out / "report.html").read_text()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # atomic writes left no temporary


def test_records_relative_to_a_run_folder_render_from_anywhere(tmp_path, monkeypatch):
    """A pipeline run's records name paths relative to its folder: render(base=folder) finds the npz maps from any
    working directory and writes the records as given (relative, in the report's JSON)."""
    run = tmp_path / "run"
    run.mkdir()
    vrecs, brecs = _records(run)
    for r in vrecs + brecs:
        r["artifact"] = str(Path(r["artifact"]).relative_to(run))
        if "maps" in r:
            r["maps"] = str(Path(r["maps"]).relative_to(run))
    monkeypatch.chdir(tmp_path)  # not the run folder: the relative maps do not resolve from here
    render(vrecs, brecs, tmp_path / "rep_cwd")
    assert not list((tmp_path / "rep_cwd").glob("disagreement_*.png"))
    render(vrecs, brecs, run / "report", base=run)
    assert len(list((run / "report").glob("disagreement_*.png"))) == 2  # one per int8 row, maps read from `base`
    results = (run / "report" / "results.json").read_text()
    assert '"maps": "maps_onnx.npz"' in results and '"artifact": "artifacts/onnx-int8"' in results


def test_cpu_label_names_what_the_host_lacks():
    epyc = {"model": "AMD EPYC 7B13", "machine": "x86_64", "flags": ["avx2"], "forced": False}
    assert cpu_label(epyc) == "AMD EPYC 7B13 (AVX2; no AVX-512, no VNNI, no AMX)"
    assert cpu_label({"model": "Apple M2", "machine": "arm64", "flags": []}) == "Apple M2 (arm64)"
    assert cpu_label(None) == "CPU not recorded"
