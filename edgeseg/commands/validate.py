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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from pathlib import Path

    from edgeseg.eval.validate import validate
    from edgeseg.fileio import write_json
    from edgeseg.report.render import merge, render, text_table

    maps = Path(args.report) / "maps" if args.report else None
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
    return 1 if bad else 0
