"""int8 vs fp32 latency per target, measured side by side in one run.

Exports a checkpoint to every runnable target at fp32 and int8, opens both sessions of a target, then alternates
fp32 and int8 runs on the same input (so CPU frequency, thermal state and other load hit both alike) and prints
the int8/fp32 latency ratio per target (< 1: int8 is faster). Writes the numbers as JSON.

    .venv/bin/python bench/int8_vs_fp32.py                      # the shipped checkpoint, every target
    .venv/bin/python bench/int8_vs_fp32.py --checkpoint CKPT --targets onnx openvino --threads 2 --runs 50

Without a shipped checkpoint (and no --checkpoint) it uses a seeded tiny `test_segnext` (the ratios then say
little about real models). Targets that cannot execute here (Core ML on Linux) are listed as not run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeseg.errors import one_line


def tiny_checkpoint(path: Path) -> Path:
    import torch

    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.data.datasets import CAMVID_INFO
    from edgeseg.models import create_model
    from edgeseg.types import ModelSpec

    torch.manual_seed(0)
    model = create_model("test_segnext", num_classes=CAMVID_INFO.num_classes).eval()
    spec = ModelSpec(model="test_segnext", num_classes=CAMVID_INFO.num_classes, class_names=CAMVID_INFO.class_names,
                     palette=CAMVID_INFO.palette, ignore_index=CAMVID_INFO.ignore_index, input_hw=(128, 160))
    return save_checkpoint(path, model, spec)


def side_by_side(fp32_dir: Path, int8_dir: Path, threads: int, warmup: int, runs: int) -> dict:
    """Alternate fp32 / int8 `Session.run` on one input; return both latency stats and the p50 ratio."""
    from edgeseg.artifact import read_manifest
    from edgeseg.eval.bench import make_input
    from edgeseg.eval.validate import latency_stats
    from edgeseg.runtime import open_session

    sessions = {p: open_session(d, num_threads=threads) for p, d in (("fp32", fp32_dir), ("int8", int8_dir))}
    inputs = {p: make_input(read_manifest(d)) for p, d in (("fp32", fp32_dir), ("int8", int8_dir))}
    times = {"fp32": [], "int8": []}
    for i in range(warmup + runs):
        order = ("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")  # neither always goes first
        for p in order:
            t = time.perf_counter()
            sessions[p].run(inputs[p])
            if i >= warmup:
                times[p].append((time.perf_counter() - t) * 1e3)
    for s in sessions.values():
        s.close()
    fp, q = latency_stats(times["fp32"]), latency_stats(times["int8"])
    return {"fp32_ms": fp, "int8_ms": q, "int8_over_fp32_p50": q["p50"] / fp["p50"]}


def main(argv=None) -> int:
    import torch

    from edgeseg.artifact import read_manifest
    from edgeseg.export.profiles import list_profiles, load_profile
    from edgeseg.isolate import export_isolated  # a converter that segfaults fails only its own target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="checkpoint folder (default: the shipped one, else a tiny test model)")
    ap.add_argument("--targets", nargs="+", help="targets (default: every profile with fp32 and int8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", default="int8_vs_fp32.json", help="output JSON (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    args = ap.parse_args(argv)
    from edgeseg.errors import UsageError
    from edgeseg.fileio import refuse_existing, write_json

    try:
        refuse_existing(args.json, "--json", args.force)  # before the exports, not after them
    except UsageError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="int8_vs_fp32-") as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else None
        if ckpt is None:
            from edgeseg.data.embedded import default_checkpoint
            from edgeseg.errors import ArtifactError

            try:
                ckpt = default_checkpoint()
            except ArtifactError:
                ckpt = tiny_checkpoint(tmp / "test_segnext")
        targets = args.targets or [t for t in list_profiles()
                                   if {"fp32", "int8"} <= set(load_profile(t).precisions)]
        results, failed = [], 0
        for t in targets:
            row = {"target": t, "checkpoint": str(ckpt), "threads": args.threads, "runs": args.runs}
            try:
                dirs = {p: export_isolated(ckpt, t, p, out=tmp / f"{t}-{p}", progress=False)
                        for p in ("fp32", "int8")}
                if not all(read_manifest(d).executed_here for d in dirs.values()):
                    row["status"] = "not run (cannot execute on this host)"
                else:
                    row.update(side_by_side(dirs["fp32"], dirs["int8"], args.threads, args.warmup, args.runs))
                    row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - shown as a FAILED row, and the script exits 1
                row["status"] = f"FAILED: {one_line(e, with_type=True)}"
                failed += 1
            results.append(row)
            print(_line(row), flush=True)
    write_json(args.json, results)
    print(f"wrote {args.json}")
    return 1 if failed else 0


def _line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['target']:<20} {r['status']}"
    return (f"{r['target']:<20} fp32 p50 {r['fp32_ms']['p50']:8.2f} ms  int8 p50 {r['int8_ms']['p50']:8.2f} ms  "
            f"int8/fp32 {r['int8_over_fp32_p50']:.2f}" + ("  (int8 NOT faster)" if r['int8_over_fp32_p50'] >= 1
                                                          else ""))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
