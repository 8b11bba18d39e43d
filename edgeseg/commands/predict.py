"""`edgeseg predict`: segment your own images, folders, globs and videos with a checkpoint or an artifact."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeseg.errors import UsageError

HELP = "segment images, folders, globs and videos: indexed class-map PNGs, overlays, confidence, predictions.json"
EPILOG = """\
examples:
  edgeseg predict photos/                                   # the shipped checkpoint, out: runs/predict/<model>
  edgeseg predict 'photos/**/*.jpg' clip.mp4 --artifact runs/pipeline/artifacts/onnx-int8 --out preds --confidence
  edgeseg predict img.png --checkpoint runs/offseg_t/best --native-size --threads 2
  edgeseg predict frames/ --artifact out/ov-int8 --strict --limit 100 --force

SOURCE: image files, folders (searched recursively for images and videos), globs (quote them; ** recurses) and
video files (every frame, read with OpenCV). Each image is resized to the model's input size (the manifest's, or
the checkpoint's input_hw) and its logits upsampled (bilinear) to the image's own size before the argmax, as
`edgeseg eval` and `validate` do; --native-size runs a checkpoint at the image's own size padded to a multiple
of 32 instead.
out folder: masks/<name>.png (indexed PNG, mode P: pixel = class index, palette = the model's), overlays/<name>.png,
confidence/<name>.png (--confidence: 16-bit grey, max softmax probability x 65535) and predictions.json (per
image: source, outputs, size, latency; model, target, precision, runtime, CPU, summary). <name> mirrors the source
(a folder's files keep their path inside it; a video's frames are <video>/<frame index>); colliding names get -2,
-3, ... A bad file is skipped with one line naming it (--strict: exit 1, nothing written).
Exit code 1 when nothing could be predicted or the artifact cannot run here (Core ML off macOS), 2 on bad arguments.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="image, video, folder or glob")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--artifact", metavar="DIR", help="artifact folder (manifest.json), run on its runtime")
    which.add_argument("--checkpoint", metavar="DIR",
                       help="checkpoint folder (model.json + model.safetensors), run eagerly in PyTorch "
                            "(default: the shipped checkpoint)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/predict/<model folder name>)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (only a folder edgeseg wrote)")
    p.add_argument("--strict", action="store_true",
                   help="a bad or unreadable file is an error (exit 1, nothing written) instead of a skip")
    p.add_argument("--confidence", action="store_true",
                   help="also write the per-pixel confidence (max softmax probability) as 16-bit grey PNGs")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for the runtime (default: its own)")
    p.add_argument("--limit", type=int, metavar="N", help="stop after N images (video frames count one each)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours in the overlays (0..1, "
                   "default 0.5)")
    p.add_argument("--native-size", action="store_true",
                   help="checkpoints only: run each image at its own size padded to a multiple of 32 instead of "
                        "resizing it to the input size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from edgeseg import api, vendorlog
    from edgeseg.outputs import Output, check_outputs
    from edgeseg.predictions import RECORD, expand_sources, predict_to_folder, summary_line

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: must be at least 1")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha {args.alpha}: must be between 0 and 1")
    if args.native_size and args.artifact:
        raise UsageError("--native-size: only for a checkpoint (an artifact has a fixed input size)")
    files, empty = expand_sources(args.sources)
    if args.artifact:
        model = Path(args.artifact)
    elif args.checkpoint:
        model = Path(args.checkpoint)
    else:
        from edgeseg.data.embedded import default_checkpoint

        model = default_checkpoint()
    out = Path(args.out) if args.out else Path("runs") / "predict" / (model.resolve().name or "model")
    check_outputs(args.force, [Output("--out", out, "dir")],
                  [("--artifact", args.artifact), ("--checkpoint", args.checkpoint)]
                  + [("SOURCE", s) for s in args.sources] + [("SOURCE", f.path) for f in files])
    import torch  # noqa: F401 - first: torch's log handlers keep the sys.stderr of its import

    def on_skip(s) -> None:
        from tqdm import tqdm

        tqdm.write(f"skipping {s.reason}", file=sys.stderr)

    vendorlog.place(out / "vendor.log")
    with vendorlog.quiet(python_too=False):  # runtimes' native output to the vendor log; our bar stays
        with vendorlog.quiet():  # and what a runtime prints through Python while it opens (ExecuTorch)
            predictor = api.load(model, threads=args.threads, native_size=args.native_size)
        with predictor:
            record = predict_to_folder(predictor, files, out, force=args.force, strict=args.strict,
                                       confidence=args.confidence, limit=args.limit, alpha=args.alpha,
                                       progress=not args.no_progress, skipped=empty, on_skip=on_skip)
    print(summary_line(record))
    print(f"wrote {out / RECORD}")
    return 0
