"""`edgeseg models`: list the registered variants with parameters and GMACs (conv / matmul split)."""
from __future__ import annotations

HELP = "list model variants with parameters and GMACs at 1x3x512x512 (and at --input-size)"
EPILOG = """GMAC = 1e9 multiply-accumulates (torch.utils.flop_counter FLOPs / 2) for one image; "conv" counts
convolutions, "matmul" counts mm/addmm/bmm/baddbmm and fused attention; element-wise ops, norms, resizes and
FFTs are not counted (see edgeseg/models/flops.py).

examples:
  edgeseg models
  edgeseg models --pattern 'offseg*' --input-size 360x480
  edgeseg models --pattern 'test_*' --json models.json
"""


def add_arguments(p) -> None:
    p.add_argument("--pattern", default="*", help="shell-style name filter (default: all; 'test_*' = tiny CI "
                   "variants)")
    p.add_argument("--input-size", metavar="HxW", help="also count at this input size (e.g. 360x480)")
    p.add_argument("--num-classes", type=int, default=150, help="classes of the head counted (default 150, "
                   "ADE20K as in the papers)")
    p.add_argument("--json", metavar="OUT", help="write the table as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import sys

    from tqdm import tqdm

    from edgeseg.cli_args import parse_hw
    from edgeseg.errors import UsageError
    from edgeseg.fileio import write_json
    from edgeseg.models import get_entry, list_models
    from edgeseg.models.flops import count_registered

    names = list_models(args.pattern)
    if not names:
        raise UsageError(f"--pattern {args.pattern!r}: matches no model; known: {', '.join(list_models())}")
    if args.num_classes < 1:
        raise UsageError(f"--num-classes {args.num_classes}: must be >= 1")
    hw = parse_hw(args.input_size, "--input-size", multiple_of=1)
    from edgeseg.outputs import Output, check_outputs

    check_outputs(args.force, [Output("--json", args.json)])
    counted_hw = hw
    if hw and (hw[0] % 32 or hw[1] % 32):
        # the models need sides divisible by 32: count what actually runs, the input padded up (mmseg's
        # size_divisor=32)
        counted_hw = (-(-hw[0] // 32) * 32, -(-hw[1] // 32) * 32)
    rows = []
    for name in tqdm(names, desc="counting", unit="model", disable=args.no_progress, file=sys.stderr):
        at512, *at_input = count_registered(name, args.num_classes, [(512, 512)] + ([counted_hw] if hw else []))
        row = {"name": name, "description": get_entry(name).description, "params": at512["params"],
               "num_classes": args.num_classes,
               "gmac_512": {k: at512[k] for k in ("gmac_total", "gmac_conv", "gmac_matmul")}}
        if hw:
            r = at_input[0]
            row["input_hw"] = list(hw)
            row["counted_hw"] = list(counted_hw)
            row["gmac_input"] = {k: r[k] for k in ("gmac_total", "gmac_conv", "gmac_matmul")}
        rows.append(row)

    head = f"{'model':<22}{'params':>9}  {'GMAC@512² (conv+matmul)':>26}"
    if hw:
        head += f"  {f'GMAC@{hw[0]}x{hw[1]} (conv+matmul)':>30}"
    print(head + "  description")
    for r in rows:
        g = r["gmac_512"]
        line = f"{r['name']:<22}{r['params'] / 1e6:>8.2f}M  " + \
            f"{g['gmac_total']:>8.2f} = {g['gmac_conv']:.2f} + {g['gmac_matmul']:.2f}".rjust(26)
        if hw:
            h = r["gmac_input"]
            line += "  " + f"{h['gmac_total']:>8.2f} = {h['gmac_conv']:.2f} + {h['gmac_matmul']:.2f}".rjust(30)
        print(line + "  " + r["description"])
    print(f"({args.num_classes}-class heads; GMAC = conv + matmul, see --help)")
    if hw and counted_hw != hw:
        print(f"({hw[0]}x{hw[1]} counted as {counted_hw[0]}x{counted_hw[1]}: inputs are padded to multiples of 32)")
    if args.json:
        write_json(args.json, {"num_classes": args.num_classes, "models": rows})
    return 0
