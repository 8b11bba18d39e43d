"""`edgeseg validate`: run artifacts in their own runtimes on a dataset and compare them with a reference."""
from __future__ import annotations

HELP = "validate artifacts on real images against the fp32 reference (mIoU, drop, agreement, boundaries)"
EPILOG = """examples:
  edgeseg validate runs/pipeline/artifacts/onnx-fp32 runs/pipeline/artifacts/onnx-int8 --data data/camvid
  edgeseg validate out/ov-int8 --data data/camvid --reference ckpts/offseg_t_camvid --json val.json --report rep/
"""


def add_arguments(p) -> None:
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR", help="artifact folders (with manifest.json)")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset root")
    p.add_argument("--split", default="val", help="dataset split (default: val)")
    p.add_argument("--reference", metavar="ARTIFACT_DIR|CKPT",
                   help="fp32 artifact or checkpoint to compare with (default: each artifact's source checkpoint, "
                        "else its fp32 sibling)")
    p.add_argument("--max-images", type=int, metavar="N", help="validate on the first N images only")
    p.add_argument("--boundary-px", type=int, default=3, metavar="K",
                   help="pixels within K px of a reference class edge count as boundary (default: 3)")
    p.add_argument("--json", metavar="OUT", help="write the records as JSON")
    p.add_argument("--report", metavar="OUT_DIR", help="write report.md and plots into OUT_DIR")
    p.add_argument("--allow-unchecked", action="store_true",
                   help="exit 0 even when an artifact ran but had no reference to compare with, or when nothing "
                        "was compared at all (default: exit 1; such artifacts are \"no reference\", never \"pass\")")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file or --report folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from pathlib import Path

    from edgeseg import vendorlog
    from edgeseg.eval.validate import validate
    from edgeseg.errors import UsageError
    from edgeseg.fileio import write_json
    from edgeseg.outputs import Output, check_outputs
    from edgeseg.report.render import merge, render, text_table

    if args.max_images is not None and args.max_images < 1:
        raise UsageError(f"--max-images {args.max_images}: must be >= 1")
    if args.boundary_px < 0:
        raise UsageError(f"--boundary-px {args.boundary_px}: must be >= 0")
    check_outputs(args.force, [Output("--json", args.json), Output("--report", args.report, "dir")],
                  [("ARTIFACT_DIR", a) for a in args.artifacts] + [("--data", args.data),
                                                                   ("--reference", args.reference)])
    maps = Path(args.report) / "maps" if args.report else None
    import torch  # noqa: F401 - first: torch's log handlers keep the sys.stderr of its import

    with vendorlog.quiet(python_too=False):  # runtimes' native output to the vendor log; our bars stay
        records = validate(args.artifacts, args.data, split=args.split, reference=args.reference,
                           boundary_px=args.boundary_px, max_images=args.max_images, maps_dir=maps,
                           progress=not args.no_progress)
    print(text_table(merge(records)))
    if args.json:
        write_json(args.json, records)
        print(f"wrote {args.json}")
    if args.report:
        print(f"wrote {render(records, None, args.report)}")
    bad = [r for r in records if r["status"] == "failed" or r["passed"] is False]
    for r in bad:
        print(f"FAILED {r['name']}: {r['error'] or '; '.join(r['reasons'])}")
    # an mIoU with nothing to compare it with is not a pass: exit 1 unless the user accepts that
    unchecked = [r for r in records if r["status"] == "ok" and r["passed"] is None]
    for r in unchecked:
        print(f"NO REFERENCE {r['name']}: nothing to compare with (no --reference, no source checkpoint, no fp32 "
              "sibling); pass --reference or --allow-unchecked")
    if not bad and not any(r["passed"] is not None for r in records):
        print(f"nothing was compared: none of the {len(records)} artifact(s) got a pass/fail verdict"
              + ("" if args.allow_unchecked else "; pass --allow-unchecked to accept that"))
        return 0 if args.allow_unchecked else 1
    return 1 if bad or (unchecked and not args.allow_unchecked) else 0
