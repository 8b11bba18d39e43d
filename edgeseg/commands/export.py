"""`edgeseg export`: turn a checkpoint into a deployable artifact for a named target and prove it."""
from __future__ import annotations

from edgeseg.artifact import MANIFEST
from edgeseg.cli_args import parse_hw

HELP = "export a checkpoint to a target (ExecuTorch, ONNX, OpenVINO, Core ML, Jetson TensorRT) and prove it"
EPILOG = """examples:
  edgeseg export --list-targets
  edgeseg export --checkpoint ckpts/offseg_t_camvid --target executorch-xnnpack --out out/et-fp32
  edgeseg export --checkpoint ckpts/offseg_t_camvid --target onnx --precision int8 --calib data/camvid --out out/onnx-int8
  edgeseg export --checkpoint ckpts/segnext_t --target jetson-tensorrt --precision int8 --input-size 512x512 --force
  edgeseg export --checkpoint ckpts/offseg_t_camvid --target openvino --precision int8 --max-miou-drop 0.01 --data data/camvid
"""


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", metavar="CKPT", help="checkpoint folder (model.safetensors + model.json)")
    p.add_argument("--target", metavar="TARGET", help="target profile name (see --list-targets)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), help="default: the profile's default")
    p.add_argument("--input-size", metavar="HxW", help="static input size (default: the checkpoint's input_hw)")
    p.add_argument("--calib", metavar="DIR|RECIPE", help="int8 calibration: a recipe from calibration/ (e.g. "
                   "camvid-train-16), or a dataset root / image folder (default: the embedded CamVid mini set)")
    p.add_argument("--out", metavar="DIR", help="artifact folder (default: <checkpoint>-<target>-<precision>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out or --json")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile option (TOML value syntax, e.g. output=\"argmax\"); repeatable")
    p.add_argument("--max-miou-drop", type=float, metavar="X",
                   help="int8 accuracy budget (fraction, 0.01 = one mIoU point): validate on --data's val split "
                        "against the fp32 checkpoint and keep the most sensitive layers float until the drop "
                        "is at most X; exit 1 with the round table if it cannot (needs a target that runs here)")
    p.add_argument("--data", metavar="DIR", help="dataset root: the source of a --calib recipe drawn from \"data\" "
                                               "(e.g. camvid-train-64), and with --max-miou-drop the val split "
                                               "that validates")
    p.add_argument("--val-images", type=int, metavar="N", help="with --max-miou-drop: validate on the first N "
                   "images only (default: all)")
    p.add_argument("--list-targets", action="store_true", help="print the target profiles and exit")
    p.add_argument("--json", metavar="OUT", help="write the summary (or the target list) as JSON")


def _parse_options(items: list[str]) -> dict:
    import tomllib

    from edgeseg.errors import UsageError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option: {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare word is a string
    return out


def _list_targets(args) -> int:
    from edgeseg.export.profiles import exporter_class, list_profiles, load_profile
    from edgeseg.errors import EdgesegError
    from edgeseg.fileio import write_json

    rows = []
    for name in list_profiles():
        try:
            p = load_profile(name)
            missing = exporter_class(p)().check_environment()
            rows.append({"name": name, "precisions": list(p.precisions), "default": p.default_precision,
                         "input": f"{p.input_dtype} {p.input_layout}", "output": p.output,
                         "ready": not missing, "missing": missing, "description": p.description})
        except EdgesegError as e:
            rows.append({"name": name, "precisions": [], "default": "", "input": "", "output": "", "ready": False,
                         "missing": [str(e)], "description": ""})
    print(f"{'target':<20} {'precisions':<16} {'default':<8} {'input':<14} {'output':<7} ready")
    for r in rows:
        print(f"{r['name']:<20} {','.join(r['precisions']):<16} {r['default']:<8} {r['input']:<14} "
              f"{r['output']:<7} {'yes' if r['ready'] else 'no: ' + '; '.join(r['missing'])}")
    if args.json:
        write_json(args.json, rows)
    return 0


def run(args) -> int:
    import json
    from pathlib import Path

    from edgeseg.errors import UsageError
    from edgeseg.export import export_checkpoint
    from edgeseg.fileio import write_json
    from edgeseg.outputs import Output, check_outputs

    inputs = [("--checkpoint", args.checkpoint), ("--calib", args.calib), ("--data", args.data)]
    check_outputs(args.force, [Output("--json", args.json), Output("--out", None if args.list_targets else args.out,
                                                                    "dir")], [] if args.list_targets else inputs)
    if args.list_targets:
        return _list_targets(args)
    if not args.checkpoint or not args.target:
        raise UsageError("--checkpoint and --target are required (or --list-targets)")
    if args.max_miou_drop is not None:
        return _run_budget(args)
    if args.val_images is not None:
        raise UsageError("--val-images: only used with --max-miou-drop")
    if args.data and not args.calib:
        raise UsageError("--data: only used with a --calib recipe or with --max-miou-drop")
    out = export_checkpoint(args.checkpoint, args.target, args.precision,
                            input_hw=parse_hw(args.input_size, "--input-size", multiple_of=1), calib=args.calib,
                            out=args.out, force=args.force, calib_root=args.data, **_parse_options(args.option))
    m = json.loads((Path(out) / MANIFEST).read_text())
    proof = m.get("proof") or {}
    size_mb = sum((Path(out) / f).stat().st_size for f in m["sha256"]) / 1e6
    rows = [("artifact", str(out)), ("target", m["target"]), ("precision", m["precision"]), ("model", m["model"]),
            ("input", f"{m['input']['name']} {m['input']['dtype']} {m['input']['layout']} {m['input']['shape']}"),
            ("output", f"{m['output']['name']} {m['output']['kind']} {m['output']['shape']}"),
            ("files", f"{', '.join(m['files'])} ({size_mb:.2f} MB)"),
            ("fallback ops", "unknown" if m["fallback_ops"] is None else (", ".join(m["fallback_ops"]) or "none")),
            ("export time", f"{m['export_seconds']} s")]
    if m["executed_here"] and proof:
        agree = f"{proof['argmax_agreement']:.4%}"
        diff = proof["max_abs_logit_diff"]
        rows.append(("proof", f"argmax agreement {agree} vs PyTorch on {proof['images']} images ({proof['source']})"
                     + (f", max |dlogit| {diff:.3g}" if diff is not None else "")))
    else:
        rows.append(("proof", f"not executed here: {m.get('not_executed_reason') or 'unknown'}"))
    if m.get("calibration"):
        rows.append(("calibration", f"{m['calibration']['count']} images from {m['calibration']['source']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.json:
        write_json(args.json, {"artifact": str(out), "manifest": m})
    return 0


def _run_budget(args) -> int:
    from edgeseg.errors import ArtifactError, UsageError
    from edgeseg.fileio import write_json
    from edgeseg.export.budget import check_budget, check_runnable, format_table, quantize_with_budget

    check_budget(args.max_miou_drop)
    if args.precision != "int8":
        raise UsageError("--max-miou-drop: needs --precision int8")
    if not args.data:
        raise UsageError("--max-miou-drop: needs --data DIR (the validation set)")
    check_runnable(args.target)
    header = format_table([], args.max_miou_drop)
    print(header, flush=True)

    def show(row):
        print(format_table([row], args.max_miou_drop).splitlines()[1], flush=True)

    res = quantize_with_budget(args.checkpoint, args.target, args.data, args.max_miou_drop, out=args.out,
                               force=args.force, input_hw=parse_hw(args.input_size, "--input-size", multiple_of=1),
                               calib=args.calib, max_images=args.val_images, on_round=show,
                               **_parse_options(args.option))
    if args.json:
        write_json(args.json, {k: v for k, v in res.items() if k != "table"})
    if not res["passed"]:
        hint = (f"; try --option keep_float=[...] with {', '.join(res['suggested_keep_float'])}"
                if res["suggested_keep_float"] else "")
        last = res["rounds"][-1] if res["rounds"] else None
        raise ArtifactError(
            f"--max-miou-drop {args.max_miou_drop}: int8 still loses {100 * last['miou_drop']:.2f} mIoU points "
            f"after {len(res['rounds'])} round(s) ({last['num_float_layers']} layers float); nothing written to "
            f"the artifact folder; table: {res['json']}{hint}")
    print(f"artifact  {res['artifact']}  ({len(res['float_layers'])} layers kept float: "
          f"{', '.join(res['float_layers']) or 'none'}; table: {res['json']})")
    return 0
