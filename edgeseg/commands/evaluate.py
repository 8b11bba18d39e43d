"""`edgeseg eval`: evaluate a checkpoint on a dataset split (mIoU, per-class IoU, aAcc, mAcc, fwIoU)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edgeseg.cli_args import parse_hw
from edgeseg.errors import UsageError, printable

log = logging.getLogger(__name__)

HELP = "evaluate a checkpoint on a dataset split: per-class IoU table, mIoU, aAcc, mAcc, fwIoU"
EPILOG = """\
examples:
  edgeseg eval                                              # shipped checkpoint on the embedded CamVid clip
  edgeseg eval --checkpoint runs/offseg_t/best --data ../shared/data/camvid --split val
  edgeseg eval --checkpoint runs/offseg_t/best --data data/cityscapes --input-size 512x1024 --json m.json
  edgeseg eval --checkpoint ckpt --data my_masks/ --format folder --skip-bad --batch-size 8

protocol: each image is resized (bilinear) to the input size (default: the checkpoint's), normalised with
the checkpoint's mean/std; the logits are upsampled (bilinear) to the label's own size and argmax'ed; pixels
with the dataset's ignore index are not counted. Classes absent from both labels and predictions are
excluded from the means (the table says which). JSON fields: miou, per_class_iou (class name -> IoU or
null), per_class_acc, aacc, macc, fwiou, num_images, skipped, excluded_classes, checkpoint, split, data,
format, input_hw; all metrics are fractions 0..1.
Exit code 1 on bad data or checkpoint (one line naming the file), 2 on bad arguments.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgeseg.data.formats import FORMATS

    p.add_argument("--checkpoint", metavar="CKPT",
                   help="checkpoint folder (model.safetensors + model.json; default: the shipped checkpoint)")
    p.add_argument("--data", metavar="DIR", help="dataset folder (default: the embedded CamVid clip)")
    p.add_argument("--format", choices=FORMATS, help="dataset layout (default: detected from the folder)")
    p.add_argument("--split", default="val", help="split to evaluate (default val; CamVid also has "
                   "'holdout', the unseen sequence 0006R0, and 'train-all')")
    p.add_argument("--input-size", metavar="HxW", help="model input size (default: the checkpoint's input size)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="images per forward pass (default 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable or inconsistent image/label pairs (warn and count) instead of failing")
    p.add_argument("--json", metavar="OUT", help="also write the metrics as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return dev


def run(args: argparse.Namespace) -> int:
    from edgeseg.checkpoint import load_checkpoint
    from edgeseg.data.embedded import default_checkpoint, default_data_dir
    from edgeseg.data.formats import open_dataset
    from edgeseg.errors import DataError
    from edgeseg.eval.evaluate import evaluate, torch_predictor
    from edgeseg.eval.metrics import format_table
    from edgeseg.fileio import write_json
    from edgeseg.outputs import Output, check_outputs

    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    check_outputs(args.force, [Output("--json", args.json)], [("--checkpoint", args.checkpoint), ("--data", args.data)])
    input_hw = parse_hw(args.input_size, "--input-size", multiple_of=32)
    device = _device(args.device)

    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    data = Path(args.data) if args.data else default_data_dir()
    ds = open_dataset(data, split=args.split, fmt=args.format, skip_bad=args.skip_bad)
    model, spec = load_checkpoint(ckpt)
    if spec.num_classes != ds.info.num_classes:
        raise DataError(f"{data}: {ds.fmt} data has {ds.info.num_classes} classes but checkpoint {ckpt} predicts "
                        f"{spec.num_classes} ({', '.join(map(printable, spec.class_names[:4]))}, ...)")
    if tuple(spec.class_names) != tuple(ds.info.class_names):
        log.warning("class names differ between checkpoint (%s, ...) and data (%s, ...); using the checkpoint's",
                    ", ".join(map(printable, spec.class_names[:3])), ", ".join(map(printable, ds.info.class_names[:3])))
    hw = input_hw or tuple(spec.input_hw)
    model.to(device)
    res = evaluate(torch_predictor(model, device), ds, hw, spec.mean, spec.std, batch_size=args.batch_size,
                   progress=not args.no_progress)

    names = list(spec.class_names)
    print(f"{spec.model} on {data} ({ds.fmt}, split {args.split}): {res['num_images']} images at input "
          f"{hw[0]}x{hw[1]}" + (f", {res['skipped']} bad pairs skipped" if res["skipped"] else ""))
    print(format_table(res, names))
    if args.json:
        write_json(args.json, {
            "miou": res["miou"],
            "per_class_iou": dict(zip(names, res["per_class_iou"])),
            "per_class_acc": dict(zip(names, res["per_class_acc"])),
            "aacc": res["aacc"],
            "macc": res["macc"],
            "fwiou": res["fwiou"],
            "num_images": res["num_images"],
            "skipped": res["skipped"],
            "excluded_classes": [names[i] for i in res["excluded_classes"]],
            "checkpoint": str(ckpt),
            "model": spec.model,
            "split": args.split,
            "data": str(data),
            "format": ds.fmt,
            "input_hw": list(hw),
            "num_pixels": res["num_pixels"],
        })
    return 0
