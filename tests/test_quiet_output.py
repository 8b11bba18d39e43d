"""A clean first run: `edgeseg export` prints only edgeseg's own lines; converter/runtime chatter (Python warnings,
third-party loggers, native stdout/stderr) goes to the vendor log named in the last line, `--verbose` shows it.

Real CLI in a subprocess (the `python -c` bootstrap of test_reliability.py that registers tests/_tiny.py's
`tiny_ops`), one export per target and precision at 64x64.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402  (registers tiny_ops)

from edgeseg.targets import flows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BOOT = ("import sys; sys.path.insert(0, {tests!r}); import _tiny; from edgeseg.cli import main; "
        "sys.argv[0] = 'edgeseg'; raise SystemExit(main(sys.argv[1:]))").format(tests=str(TESTS))
# what the unfiltered run printed on stderr (measured before the vendor log existed)
CHATTER = ("Traceback", "Warning", "[coreml", "Removing op", "not found in decomp table", "Converting op",
           "cpuinfo_utils", "Failed to load")
# target -> a line the vendor log must hold for it (what that converter is known to say on tiny_ops), and the
# precisions each target's CLI export is checked at: declared by each target's package (edgeseg.targets.Flow)
FLOWS = flows()
VENDOR_SAYS = {t: f.vendor_says for t, f in FLOWS.items() if f.vendor_says}
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ([\w.]+): (.*)$")


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
               EDGESEG_DEBUG="", **extra)
    env.pop("EDGESEG_VENDOR_LOG", None)
    env.pop("EDGESEG_VERBOSE", None)
    return env


def _export(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BOOT, "export", *map(str, args)], capture_output=True, text=True,
                          env=_env(**env), cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _tiny.make_checkpoint(tmp_path_factory.mktemp("quiet") / "ckpt")


def _need(target: str) -> None:
    from edgeseg.export import get_exporter

    missing = get_exporter(target).check_environment()
    if missing:
        pytest.skip(f"{target}: missing {missing}")


def _ours(log_text: str) -> list[str]:
    """Messages of the edgeseg.* records in a vendor log (first line of each)."""
    out = []
    for line in log_text.splitlines():
        m = _RECORD.match(line)
        if m and (m.group(2) == "edgeseg" or m.group(2).startswith("edgeseg.")):
            out.append(m.group(3))
    return out


CASES = [(t, precision) for t, f in FLOWS.items() for precision in f.quiet]


@pytest.mark.parametrize("target, precision", CASES, ids=[f"{t}-{p}" for t, p in CASES])
def test_export_prints_only_our_lines(ckpt, tmp_path, target, precision):
    _need(target)
    out = tmp_path / f"{target}-{precision}"
    opts = list(FLOWS[target].quiet[precision])  # e.g. Core ML's int8 weight-only (its W8A8 takes minutes)
    p = _export("--checkpoint", ckpt, "--target", target, "--precision", precision, "--out", out, *opts)
    assert p.returncode == 0, p.stderr[-3000:]
    for needle in CHATTER:
        assert needle not in p.stderr and needle not in p.stdout, (needle, p.stderr[-3000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1] == f"vendor log: {out / 'export.log'}", p.stderr[-3000:]
    log = (out / "export.log").read_text()
    # every other stderr line is one of edgeseg's own log records (the log has them too, with their logger)
    ours = _ours(log)
    assert ours and all(ln in ours for ln in lines[:-1]), (lines, ours)
    # ... and the log holds what the converter said
    foreign = [ln for ln in log.splitlines() if ln.strip() and not any(ln.endswith(o) for o in ours)]
    assert foreign, log[-2000:]
    if target in VENDOR_SAYS:
        assert VENDOR_SAYS[target] in log, log[-3000:]
    # the log is no artifact file: the manifest hashes only what it lists
    import json

    assert "export.log" not in json.loads((out / "manifest.json").read_text())["sha256"]


def test_verbose_shows_the_chatter_live_and_still_logs_it(ckpt, tmp_path):
    _need("openvino")
    out = tmp_path / "ov"
    p = _export("--checkpoint", ckpt, "--target", "openvino", "--out", out, "--verbose")
    assert p.returncode == 0, p.stderr[-3000:]
    assert VENDOR_SAYS["openvino"] in p.stderr  # live
    assert VENDOR_SAYS["openvino"] in (out / "export.log").read_text()
    assert p.stderr.strip().splitlines()[-1] == f"vendor log: {out / 'export.log'}"


def test_a_failed_export_names_its_log_in_the_one_line_error(ckpt, tmp_path):
    """The error stays one line and names the log (left where it was written: the output folder is not made)."""
    _need("onnx")
    out = tmp_path / "bad"
    p = _export("--checkpoint", ckpt, "--target", "onnx", "--out", out, "--option", "opset=99")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[-1].startswith("edgeseg: error: "), p.stderr[-3000:]
    m = re.search(r"\(vendor log: (.+)\)$", lines[-1])
    assert m and Path(m.group(1)).is_file(), lines[-1]
    assert not out.exists()
    Path(m.group(1)).unlink()


def test_pipeline_prints_only_our_lines_and_keeps_the_log_in_the_run_folder(tmp_path):
    """`edgeseg pipeline`: isolated export processes append to the run's vendor.log; validate/bench keep their
    own progress lines while the runtimes' output goes to the log."""
    import torch

    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.data.datasets import CAMVID_INFO
    from edgeseg.models import create_model
    from edgeseg.types import ModelSpec

    _need("openvino")
    torch.manual_seed(0)
    # a registered test model: the isolated export processes do not import tests/_tiny.py
    spec = ModelSpec(model="test_segnext", num_classes=11, class_names=CAMVID_INFO.class_names,
                     palette=CAMVID_INFO.palette, ignore_index=CAMVID_INFO.ignore_index, input_hw=(64, 96))
    ckpt = save_checkpoint(tmp_path / "ckpt", create_model("test_segnext", num_classes=11).eval(), spec)
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", BOOT, "pipeline", "--checkpoint", str(ckpt), "--targets", "onnx",
                        "openvino", "--precisions", "fp32", "--runs", "2", "--jobs", "2", "--out", str(run),
                        "--no-progress"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    for needle in CHATTER:
        assert needle not in p.stderr and needle not in p.stdout, (needle, p.stderr[-3000:])
    assert p.stderr.strip().splitlines()[-1] == f"vendor log: {run / 'vendor.log'}"
    log = (run / "vendor.log").read_text()
    assert "FutureWarning" in log or "Warning" in log or VENDOR_SAYS["openvino"] in log, log[-3000:]
    assert "latency measured on: " in p.stdout and (run / "report" / "report.html").is_file()
