"""`edgeseg qat`: fine-tune a checkpoint with fake quantization matching a target's int8 scheme."""
from __future__ import annotations

HELP = "quantization-aware fine-tuning for a target's int8 scheme (then: edgeseg export --precision int8)"
EPILOG = """examples:
  edgeseg qat --checkpoint ckpts/offseg_t_camvid --target executorch-xnnpack --data data/camvid --iters 2000
  edgeseg qat --checkpoint ckpts/segnext_t --target onnx --data data/camvid --out runs/qat-onnx --resume
  edgeseg export --checkpoint runs/qat-onnx/checkpoint --target onnx --precision int8
  edgeseg qat --checkpoint ckpts/offseg_t_camvid --target openvino --data data/camvid --max-miou-drop 0.005
"""


def add_arguments(p) -> None:
    from edgeseg.targets import qat_targets

    p.add_argument("--checkpoint", metavar="CKPT", required=True, help="fp32 checkpoint folder")
    p.add_argument("--target", metavar="TARGET", required=True,
                   help="a target whose profile has a [qat] table: " + " | ".join(qat_targets()))
    p.add_argument("--data", metavar="DIR", required=True, help="dataset root (train split for training, val "
                                                               "split for the fake-quant validation mIoU)")
    p.add_argument("--iters", type=int, default=1000, help="fine-tuning iterations (default 1000)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size (default 8)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5; head x10)")
    p.add_argument("--data-size", metavar="HxW", help="resize training pairs to HxW on load, as `edgeseg train "
                                                      "--data-size` did (default: as stored)")
    p.add_argument("--out", metavar="DIR", help="run folder (default <checkpoint>-qat-<target>); the QAT "
                                               "checkpoint is <out>/checkpoint")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="start over in a non-empty --out (and overwrite --json)")
    p.add_argument("--keep-float", action="append", default=[], metavar="PATTERN",
                   help="module-name pattern to keep in float (fnmatch; '!PATTERN' drops a default); repeatable")
    p.add_argument("--max-miou-drop", type=float, metavar="X",
                   help="accuracy budget (fraction, 0.01 = one mIoU point): after training, export int8 to "
                        "<out>/int8, validate it on --data's val split against the fp32 checkpoint; exit 1 with "
                        "the table if it loses more (no silent retraining; the hint names layers for --keep-float)")
    p.add_argument("--val-interval", type=int, help="validate every N iterations (default: min(iters, 1000))")
    p.add_argument("--update-bn-stats", action="store_true",
                   help="let BatchNorm running statistics follow the QAT batches (default: keep the float "
                        "checkpoint's; a short QAT at a small batch otherwise drifts them)")
    p.add_argument("--calib", metavar="RECIPE", help="images that set the activation ranges before training: a "
                   "recipe from calibration/ or a .toml (default: up to 64 images of --data's train split, "
                   "stratified; never its val split)")
    p.add_argument("--no-range-init", action="store_true",
                   help="skip that: ranges start from the first training batch (measured worse: README, int8 section)")
    p.add_argument("--freeze-ranges", action="store_true",
                   help="keep the initial activation ranges through training (weights' ranges still follow)")
    p.add_argument("--json", metavar="OUT", help="write the summary as JSON")


def run(args) -> int:
    from pathlib import Path

    from edgeseg.outputs import Output, check_outputs

    ck = Path(args.checkpoint)
    out = Path(args.out) if args.out else ck.parent / f"{ck.name}-qat-{args.target}"
    # before the calibration and training; a resumed run continues its folder and rewrites its summary
    check_outputs(args.force, [
        Output("--out", out, "run", force=True if args.resume else None,
               hint="use --resume to continue its run or --force to start over"),
        Output("--json", args.json, force=args.force or args.resume)],
        [("--checkpoint", args.checkpoint), ("--data", args.data), ("--calib", args.calib)])
    if args.max_miou_drop is not None:  # checked before a whole training run is spent
        from edgeseg.export.budget import check_budget, check_runnable

        check_budget(args.max_miou_drop)
        check_runnable(args.target)

    from edgeseg.cli_args import parse_hw
    from edgeseg.fileio import write_json
    from edgeseg.train.qat import QatOptions, qat, qat_train_config

    config = qat_train_config(iters=args.iters, batch_size=args.batch_size, lr=args.lr, device=args.device,
                              resume=args.resume, force=args.force, val_interval=args.val_interval,
                              data_hw=parse_hw(args.data_size, "--data-size", multiple_of=1))
    options = QatOptions(keep_float=args.keep_float, freeze_bn=not args.update_bn_stats, calib=args.calib,
                         init_ranges=not args.no_range_init, freeze_ranges=args.freeze_ranges)
    res = qat(args.checkpoint, args.target, args.data, out, config=config, options=options)
    val = (res["fit"] or {}).get("last") or {}
    rows = [("checkpoint", res["checkpoint"]), ("learned scales", res["params"]), ("target", res["target"]),
            ("scheme", res["scheme"]), ("iterations", str(res["fit"]["step"])),
            ("fake-quant val mIoU", f"{100 * val['miou']:.2f}" if "miou" in val else "not validated"),
            ("float modules", ", ".join(res["float_modules"]) or "none"),
            ("next", f"edgeseg export --checkpoint {res['checkpoint']} --target {args.target} --precision int8")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    budget = None
    if args.max_miou_drop is not None:
        budget = _check_budget(args, res["checkpoint"], out)
        res["budget"] = {k: v for k, v in budget.items() if k != "table"}
    if args.json:
        write_json(args.json, {k: v for k, v in res.items()})
    if budget is not None and not budget["passed"]:
        from edgeseg.errors import ArtifactError

        last = budget["rounds"][-1]
        hint = (f"; re-run qat with --keep-float for {', '.join(budget['suggested_keep_float'])}"
                if budget["suggested_keep_float"] else "")
        raise ArtifactError(f"--max-miou-drop {args.max_miou_drop}: the QAT int8 artifact loses "
                            f"{100 * last['miou_drop']:.2f} mIoU points; the QAT checkpoint is kept, no artifact "
                            f"written; table: {budget['json']}{hint}")
    return 0


def _check_budget(args, checkpoint, out):
    """Export the QAT checkpoint to <out>/int8 and validate it against the fp32 checkpoint QAT started from
    (one round: no retraining here)."""
    from edgeseg.export.budget import format_table, quantize_with_budget

    print(format_table([], args.max_miou_drop))
    res = quantize_with_budget(checkpoint, args.target, args.data, args.max_miou_drop, out=out / "int8",
                               force=True, json_path=out / "budget.json", reference=args.checkpoint,
                               on_round=lambda row: print(format_table([row], args.max_miou_drop).splitlines()[1]))
    if res["passed"]:
        print(f"int8 artifact  {res['artifact']}  (within the budget; table: {res['json']})")
    return res
