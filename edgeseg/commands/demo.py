"""`edgeseg demo`: live segmentation on a camera, video, stream or image folder (the app is edgeseg.demo.app)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeseg.errors import UsageError

HELP = "live demo: segmentation overlay, legend and HUD on a camera, video, stream or image folder"
EPILOG = """\
examples:
  edgeseg demo                                        # default checkpoint on the embedded CamVid clip
  edgeseg demo --artifact runs/export/onnx-int8 --source 0
  edgeseg demo --artifact runs/export/openvino-fp32 --compare runs/export/openvino-int8 --source drive.mp4
  edgeseg demo --source rtsp://192.168.1.20:8554/cam --record out.mp4
  edgeseg demo --source frames/ --headless --record out.mp4 --json summary.json

keys: q/Esc quit, space pause, o toggle overlay, s save a snapshot PNG (in --snapshot-dir).
Without a usable display (no DISPLAY/WAYLAND_DISPLAY, or a window cannot be opened) the demo runs headless.
Exit code 1 when the source cannot be opened or is lost for good (the summary is still printed).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", metavar="DIR", help="artifact or checkpoint folder (default: the shipped checkpoint)")
    p.add_argument("--compare", metavar="DIR", help="second artifact shown side by side on the same frames")
    p.add_argument("--source", metavar="SRC",
                   help="camera index (0), video file, rtsp/http URL or image folder (default: embedded clip)")
    p.add_argument("--headless", action="store_true", help="no window: process (and record), then print a summary")
    p.add_argument("--record", metavar="OUT.mp4", help="write the annotated stream to this mp4 (mp4v)")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N processed frames")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours in the overlay (0..1)")
    p.add_argument("--reconnect-retries", type=int, default=3, metavar="N",
                   help="reconnect attempts after a camera/stream stops delivering frames (default 3)")
    p.add_argument("--retry-delay", type=float, default=1.0, metavar="S", help="seconds between reconnects")
    p.add_argument("--snapshot-dir", default=".", metavar="DIR", help="where the s key saves PNG snapshots")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads per runtime session")
    p.add_argument("--json", metavar="OUT", help="write the run summary as JSON")
    p.add_argument("--force", action="store_true", help="overwrite existing --record/--json outputs")


def run(args: argparse.Namespace) -> int:
    from edgeseg.demo.app import SourceError, run_demo
    from edgeseg.fileio import write_json
    from edgeseg.outputs import Output, check_outputs
    from edgeseg.runtime import open_session

    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError(f"--max-frames {args.max_frames}: must be at least 1")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha {args.alpha}: must be between 0 and 1")
    if args.reconnect_retries < 0:
        raise UsageError(f"--reconnect-retries {args.reconnect_retries}: must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    check_outputs(args.force, [Output("--record", args.record), Output("--json", args.json)],
                  [("--artifact", args.artifact), ("--compare", args.compare), ("--source", args.source)])
    if args.artifact:
        artifact = Path(args.artifact)
    else:
        from edgeseg.data.embedded import default_checkpoint

        artifact = default_checkpoint()
    paths = [artifact] + ([Path(args.compare)] if args.compare else [])
    sessions = [open_session(p, num_threads=args.threads) for p in paths]
    result = run_demo(sessions, args.source, names=[p.name for p in paths], headless=args.headless,
                      record=args.record, max_frames=args.max_frames, alpha=args.alpha,
                      reconnect_retries=args.reconnect_retries, retry_delay_s=args.retry_delay,
                      snapshot_dir=args.snapshot_dir)
    print(result.format_table())
    if args.json:
        write_json(args.json, result.summary())
    if result.error:
        raise SourceError(result.error)
    if result.stop_reason == "interrupted":
        print("edgeseg: interrupted", file=sys.stderr)
        return 130
    return 0
