"""`edgeseg pipeline`: the main job (export every target at fp32 and int8, validate, bench, report)."""
from __future__ import annotations

HELP = "export every target at fp32 and int8, validate, bench and report (embedded default when given nothing)"
EPILOG = """examples:
  edgeseg pipeline                                   # shipped checkpoint + shipped CamVid images
  edgeseg pipeline --checkpoint ckpts/segnext_t_camvid --data data/camvid --targets onnx openvino --force
  edgeseg pipeline --input-size 384x480 --targets openvino onnx    # at CamVid's resolution (360x480 padded)
"""


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", metavar="CKPT", help="checkpoint folder (default: the shipped checkpoint)")
    p.add_argument("--data", metavar="DIR", help="dataset root (default: the embedded CamVid images)")
    p.add_argument("--split", default="val", help="evaluation split of --data (default: val)")
    p.add_argument("--targets", nargs="+", metavar="TARGET", help="targets (default: every profile)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "fp16", "int8"],
                   help="precisions per target (default: fp32 int8)")
    p.add_argument("--out", default="runs/pipeline", metavar="DIR", help="output folder (default: runs/pipeline)")
    p.add_argument("--force", action="store_true", help="overwrite --out and --json")
    p.add_argument("--max-images", type=int, metavar="N", help="validate on the first N images only")
    p.add_argument("--threads", type=int, metavar="N", help="bench threads (default: min(4, CPU count))")
    p.add_argument("--jobs", type=int, metavar="N", help="exports running at once, each in its own process "
                   "(default: the CPU count, at most 4; 1 = one after the other)")
    p.add_argument("--runs", type=int, default=10, metavar="N", help="bench timed runs (default: 10)")
    p.add_argument("--input-size", metavar="HxW", help="export, validate and bench at this size (multiples of 32, "
                   "e.g. 384x480 for CamVid's 360x480; default: the checkpoint's input size)")
    p.add_argument("--json", metavar="OUT", help="also write the final rows as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from edgeseg.errors import UsageError

    for flag in ("jobs", "runs", "threads", "max_images"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {v}: must be >= 1")
    from edgeseg.cli_args import parse_hw
    from edgeseg.fileio import write_json
    from edgeseg.outputs import Output, check_outputs
    from edgeseg.pipeline import run_pipeline

    input_hw = parse_hw(args.input_size, "--input-size", multiple_of=32)
    from edgeseg.report.render import text_table

    check_outputs(args.force, [Output("--out", args.out, "dir"), Output("--json", args.json)],
                  [("--checkpoint", args.checkpoint), ("--data", args.data)])
    res = run_pipeline(checkpoint=args.checkpoint, data=args.data, targets=args.targets, out=args.out,
                       force=args.force, precisions=args.precisions, split=args.split, max_images=args.max_images,
                       threads=args.threads, runs=args.runs, export_jobs=args.jobs, input_hw=input_hw,
                       progress=not args.no_progress)
    print(text_table(res.rows))
    for n in res.notes:
        print(f"note: {n}")
    print(f"report: {res.report}  ({res.seconds:.0f} s)")
    if args.json:
        write_json(args.json, res.rows)
    for f in res.failures:
        print(f"FAILED {f}")
    if res.failures:
        print(f"edgeseg: {len(res.failures)} target(s) failed", flush=True)
    return res.exit_code
