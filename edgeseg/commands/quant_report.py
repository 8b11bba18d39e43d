"""`edgeseg quant-report`: per-layer int8 sensitivity of a checkpoint (SQNR and mIoU change), sorted."""
from __future__ import annotations

HELP = "per-layer int8 sensitivity: SQNR vs float and the mIoU change when that layer alone is int8"
EPILOG = """examples:
  edgeseg quant-report --checkpoint ckpts/offseg_t_camvid --target onnx --data data/camvid --limit 8 --json s.json
"""


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", metavar="CKPT", required=True, help="checkpoint folder")
    p.add_argument("--target", metavar="TARGET", required=True, help="target whose int8 scheme is simulated, as "
                   "its exporter would quantize on this host (weight bits and granularity, activation scheme); "
                   "recorded as \"scheme\" in --json")
    p.add_argument("--data", metavar="DIR", required=True, help="dataset root; its val split is used")
    p.add_argument("--limit", type=int, default=8, help="validation images (default 8)")
    p.add_argument("--json", metavar="OUT", help="write the rows as JSON (a PNG bar plot is written beside it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file and its PNG")


def run(args) -> int:
    from pathlib import Path

    from edgeseg.errors import UsageError
    from edgeseg.fileio import write_json
    from edgeseg.outputs import Output, check_outputs
    from edgeseg.export.schemes import scheme_for_target
    from edgeseg.quant.sensitivity import checkpoint_sensitivity, format_table, plot

    if args.limit < 1:
        raise UsageError(f"--limit {args.limit}: must be >= 1")
    if args.json:
        check_outputs(args.force, [Output("--json", args.json),
                                   Output("the plot beside --json,", Path(args.json).with_suffix(".png"))],
                      [("--checkpoint", args.checkpoint), ("--data", args.data)])
    scheme = scheme_for_target(args.target)  # refuses a target it cannot simulate, before the slow part
    print(f"simulated int8 scheme ({args.target}): {scheme.description}")
    rows = checkpoint_sensitivity(args.checkpoint, args.data, limit=args.limit, scheme=scheme)
    print(format_table(rows))
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "target": args.target, "images": args.limit,
                               "scheme": scheme.to_json(), "rows": rows})
        plot(rows, Path(args.json).with_suffix(".png"))
    return 0
