"""int8 accuracy per target, PTQ beside QAT, against the fp32 artifact (the bar: QAT int8 within 0.5 mIoU).

For each checkpoint and each target that runs here, with the CLI a user would type:
  edgeseg export --precision fp32                        -> fp32 artifact (the reference)
  edgeseg export --precision int8 --calib RECIPE         -> PTQ int8 artifact
  edgeseg qat --iters N, then export --precision int8    -> QAT int8 artifact (carries the learned scales)
  edgeseg validate fp32 ptq qat --reference fp32         -> mIoU on --split, drop, argmax agreement
and prints one table (also written as JSON and Markdown into --out). Finished steps are kept: re-running the
same command continues where a stopped run ended (--force starts over).

  python bench/qat_vs_ptq.py --checkpoint runs/offseg_t_camvid_long/best --data ../shared/data/camvid \
      --qat-iters 100 --out runs/qat_vs_ptq
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgeseg.errors import one_line
from edgeseg.fileio import write_json, write_text

TARGETS = ("executorch-xnnpack", "openvino", "onnx")
BAR = 0.005  # mIoU as a fraction: 0.5 points


def _run(cmd: list[str], log: Path, ok=(0,)) -> None:
    """One CLI step; its output goes to `log`. A failure stops the benchmark with the step's last lines."""
    print("  $", " ".join(cmd), flush=True)
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode not in ok:
        tail = log.read_text().splitlines()[-5:]
        sys.exit(f"qat_vs_ptq: step failed (rc {proc.returncode}), see {log}:\n" + "\n".join(tail))
    print(f"    done in {time.perf_counter() - t:.0f} s", flush=True)


def _done(path: Path, marker: str) -> bool:
    return (path / marker).is_file()


def bench_one(ckpt: Path, target: str, args, root: Path) -> dict:
    edgeseg = [sys.executable, "-m", "edgeseg"]
    d = root / ckpt.parent.name / target
    d.mkdir(parents=True, exist_ok=True)
    log = d / "steps.log"
    fp32, ptq, qat_run, qat = d / "fp32", d / "int8-ptq", d / "qat", d / "int8-qat"
    if not _done(fp32, "manifest.json"):
        _run(edgeseg + ["export", "--checkpoint", str(ckpt), "--target", target, "--precision", "fp32",
                        "--out", str(fp32), "--force"], log)
    if not _done(ptq, "manifest.json"):
        _run(edgeseg + ["export", "--checkpoint", str(ckpt), "--target", target, "--precision", "int8",
                        "--calib", args.calib, "--data", args.data, "--out", str(ptq), "--force"], log)
    qat_error = None
    try:  # a failed QAT step still leaves fp32 vs PTQ worth reporting
        if not _done(qat_run / "checkpoint", "model.json"):
            cmd = edgeseg + ["qat", "--checkpoint", str(ckpt), "--target", target, "--data", args.data,
                             "--iters", str(args.qat_iters), "--batch-size", str(args.qat_batch_size),
                             "--lr", str(args.qat_lr), "--val-interval", str(args.qat_iters), "--out", str(qat_run),
                             "--calib", args.calib]  # QAT's ranges start from PTQ's calibration set
            if args.data_size:
                cmd += ["--data-size", args.data_size]
            if args.freeze_ranges:
                cmd += ["--freeze-ranges"]
            resumable = (qat_run / "train" / "train_state.safetensors").is_file()
            _run(cmd + (["--resume"] if resumable else ["--force"]), log)
        if not _done(qat, "manifest.json"):
            _run(edgeseg + ["export", "--checkpoint", str(qat_run / "checkpoint"), "--target", target,
                            "--precision", "int8", "--out", str(qat), "--force"], log)
    except SystemExit as e:
        errors = ["edgeseg: error:" + ln.split("edgeseg: error:", 1)[1] for ln in log.read_text().splitlines()
                  if "edgeseg: error:" in ln]
        qat_error = (errors[-1] if errors else one_line(e))[:300]
        print(f"    QAT failed: {qat_error}", flush=True)
    arts = [fp32, ptq] + ([qat] if qat_error is None else [])
    js = d / ("validate.json" if qat_error is None else "validate-fp32-ptq.json")
    if not js.is_file():
        cmd = edgeseg + ["validate", *map(str, arts), "--data", args.data, "--split", args.split,
                         "--reference", str(fp32), "--json", str(js), "--no-progress"]
        if args.max_images:
            cmd += ["--max-images", str(args.max_images)]
        _run(cmd, log, ok=(0, 1))  # 1: an artifact missed validate's own thresholds; the numbers are what we want
        if not js.is_file():
            sys.exit(f"qat_vs_ptq: validate wrote no {js}, see {log}")
    recs = json.loads(js.read_text())
    recs = recs["records"] if isinstance(recs, dict) else recs
    by_dir = {Path(r["artifact"]).name: r for r in recs}
    f, p = by_dir["fp32"], by_dir["int8-ptq"]
    q = by_dir.get("int8-qat") or {"miou": None}
    quant = {}
    if (qat_run / "checkpoint" / "model.json").is_file():
        quant = json.loads((qat_run / "checkpoint" / "model.json").read_text()).get("quant") or {}
    qat_drop = None if q["miou"] is None else f["miou"] - q["miou"]
    return {"model": ckpt.parent.name, "checkpoint": str(ckpt), "target": target,
            "fp32_miou": f["miou"], "ptq_miou": p["miou"], "ptq_drop": f["miou"] - p["miou"],
            "ptq_agreement": p.get("agreement"), "qat_miou": q["miou"], "qat_drop": qat_drop,
            "qat_agreement": q.get("agreement"), "qat_within_bar": qat_drop is not None and qat_drop <= BAR,
            "qat_error": qat_error, "images": f.get("num_images"), "split": args.split,
            "qat_iters": args.qat_iters,
            # runs from before BN freezing existed let the statistics follow the QAT batches
            "qat_bn_stats": quant.get("bn_stats", "updated during QAT") if quant else None,
            # a dict (the calibration set's info) since range initialisation exists; before it, the first batch
            "qat_range_init": _range_init(quant) if quant else None,
            "qat_activation_ranges": quant.get("activation_ranges", "moving average in training") if quant else None}


def _range_init(quant: dict) -> str:
    init = quant.get("range_init", "first training batch")
    return init.get("recipe") or "custom" if isinstance(init, dict) else init


def table(rows: list[dict]) -> str:
    head = ("| model | target | fp32 mIoU | PTQ int8 mIoU (drop) | PTQ agreement | QAT int8 mIoU (drop) | "
            "QAT agreement | QAT within 0.5 | QAT BN statistics |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['target']} | FAILED: {r['error'].replace('|', '/')} |||||||")
            continue
        pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
        if r.get("qat_error"):
            qat_cells = f"QAT FAILED: {r['qat_error'].replace('|', '/')} | | NO | {r.get('qat_bn_stats') or 'n/a'} |"
        else:
            qat_cells = (f"{pct(r['qat_miou'])} ({100 * r['qat_drop']:+.2f}) | {pct(r['qat_agreement'])} % | "
                         f"{'yes' if r['qat_within_bar'] else 'NO'} | {r.get('qat_bn_stats', 'n/a')} |")
        lines.append(f"| {r['model']} | {r['target']} | {pct(r['fp32_miou'])} | {pct(r['ptq_miou'])} "
                     f"({100 * r['ptq_drop']:+.2f}) | {pct(r['ptq_agreement'])} % | " + qat_cells)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", action="append", required=True, help="fp32 checkpoint folder (repeatable)")
    ap.add_argument("--data", required=True, help="dataset root (train: calibration and QAT; --split: scoring)")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    ap.add_argument("--split", default="val")
    ap.add_argument("--calib", default="camvid-train-64", help="PTQ calibration recipe (default camvid-train-64)")
    ap.add_argument("--qat-iters", type=int, default=100)
    ap.add_argument("--qat-batch-size", type=int, default=8)
    ap.add_argument("--qat-lr", type=float, default=1e-5)
    ap.add_argument("--data-size", default="192x256", help="QAT: resize training pairs like training did")
    ap.add_argument("--freeze-ranges", action="store_true", help="QAT keeps the calibrated activation ranges")
    ap.add_argument("--max-images", type=int, help="score on the first N images only (smoke runs)")
    ap.add_argument("--out", default="runs/qat_vs_ptq")
    ap.add_argument("--force", action="store_true", help="start over (deletes --out)")
    args = ap.parse_args(argv)
    root = Path(args.out)
    if args.force and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for ck in args.checkpoint:
        for target in args.targets:
            print(f"[{ck} x {target}]", flush=True)
            try:
                rows.append(bench_one(Path(ck), target, args, root))
            except SystemExit as e:  # one failed step: record it, go on with the other targets
                print(e, flush=True)
                rows.append({"model": Path(ck).parent.name, "checkpoint": ck, "target": target,
                             "error": str(e).splitlines()[-1][:300]})
    text = table(rows)
    print(text)
    write_json(root / "results.json", rows)
    write_text(root / "results.md", text + "\n")
    print(f"wrote {root / 'results.json'} and {root / 'results.md'}")
    return 0 if all(r.get("qat_within_bar") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
