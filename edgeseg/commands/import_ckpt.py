"""`edgeseg import`: turn an official mmseg checkpoint (OffSeg / SegNeXt) into an edgeseg checkpoint."""
from __future__ import annotations

HELP = "import an official OffSeg/SegNeXt (mmseg) checkpoint as an edgeseg checkpoint"
EPILOG = """The file is read without unpickling code (torch.load(weights_only=True); .safetensors also read).
Key names are the official ones (backbone.*, decode_head.*) and load strictly; mmseg's non-model entries
(data_preprocessor.*) are dropped. The class count comes from the classifier weight (decode_head.conv_seg).
Edgeseg-only buffers that official checkpoints lack (SegNeXt's stored NMF bases, which the official head draws
at every forward) are filled with their documented default (the seeded draw); any other missing key is an error.

examples:
  edgeseg import --from offseg offseg-t_ade20k_160k-512x512.pth --model offseg_t --out ckpt/offseg_t_ade
  edgeseg import --from segnext segnext_mscan-t_ade20k.pth --model segnext_t --out ckpt/segnext_t_ade \\
      --classes ade20k --input-size 512x512
  edgeseg import --from offseg my_run.pth --model offseg_t --out ckpt/mine --classes classes.txt
"""

FAMILIES = {"offseg": ("offseg",), "segnext": ("segnext",)}
# mmseg/mmengine entries saved beside the model's own state that are not model state
NON_MODEL_PREFIXES = ("data_preprocessor.",)
CLASSIFIER_KEYS = ("decode_head.conv_seg.weight", "decode_head.cls_seg.weight")
DEFAULT_CLASSES = {150: "ade20k", 19: "cityscapes", 171: "coco-stuff", 59: "pascal-context"}


def add_arguments(p) -> None:
    p.add_argument("--from", dest="family", required=True, choices=sorted(FAMILIES),
                   help="model family of the checkpoint")
    p.add_argument("src", metavar="SRC", help="official checkpoint (.pth/.pt with 'state_dict', or .safetensors)")
    p.add_argument("--model", required=True, help="edgeseg variant with the same architecture, e.g. offseg_t")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--classes", default=None, help="ade20k | cityscapes | coco-stuff | pascal-context | a text "
                   "file with one name per line (default: guessed from the class count)")
    p.add_argument("--input-size", metavar="HxW", default="512x512", help="input size stored in the checkpoint "
                   "(default 512x512)")
    p.add_argument("--force", action="store_true", help="overwrite --out and --json")
    p.add_argument("--json", metavar="OUT", help="write a summary as JSON")


def edgeseg_only_keys(model) -> dict:
    """State keys that edgeseg's modules add beyond the official ones (each module's `EDGESEG_ONLY_BUFFERS`,
    see edgeseg/models/ham_head.py), mapped to the module whose `fill_edgeseg_only_buffers()` fills them."""
    out = {}
    for mname, mod in model.named_modules():
        for b in getattr(type(mod), "EDGESEG_ONLY_BUFFERS", ()):
            out[f"{mname}.{b}" if mname else b] = mod
    return out


def _shorten(keys, n: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def import_checkpoint(family: str, src, model_name: str, out, classes: str | None = None,
                      input_hw: tuple[int, int] = (512, 512), force: bool = False) -> dict:
    """Library form of the command; returns a summary dict."""
    from pathlib import Path

    import torch

    from edgeseg.checkpoint import load_state_dict_file, save_checkpoint
    from edgeseg.data.classes import resolve_classes
    from edgeseg.errors import ArtifactError, UsageError
    from edgeseg.fileio import sha256_file
    from edgeseg.models import create_model, get_entry
    from edgeseg.outputs import Output, check_outputs
    from edgeseg.types import ModelSpec

    get_entry(model_name)
    if not model_name.startswith(FAMILIES[family]):
        raise UsageError(f"--model {model_name}: not a {family} variant (names start with "
                         f"{' / '.join(FAMILIES[family])})")
    out, src = Path(out), Path(src)
    check_outputs(force, [Output("--out", out, "dir")], [("SRC", src)])
    state = load_state_dict_file(src)
    dropped = sorted(k for k in state if k.startswith(NON_MODEL_PREFIXES))
    state = {k: v for k, v in state.items() if k not in dropped}
    cls_key = next((k for k in CLASSIFIER_KEYS if k in state), None)
    if cls_key is None:
        raise ArtifactError(f"{src}: no classifier weight ({' or '.join(CLASSIFIER_KEYS)}); is it an mmseg "
                            f"{family} checkpoint? keys start with: {_shorten({k.split('.')[0] for k in state})}")
    k = int(state[cls_key].shape[0])
    if classes is None:
        if k not in DEFAULT_CLASSES:
            raise UsageError(f"--classes: the checkpoint has {k} classes, which matches no known list; pass "
                             f"--classes FILE with {k} names")
        classes = DEFAULT_CLASSES[k]
    names, palette, ignore = resolve_classes(classes, k)

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=k)
    ref = model.state_dict()
    fillable = {n: m for n, m in edgeseg_only_keys(model).items() if n in ref}
    missing = set(ref) - set(state) - set(fillable)
    unexpected = set(state) - set(ref)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_shorten(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_shorten(unexpected)}")
        raise ArtifactError(f"{src}: does not match model {model_name!r} ({'; '.join(parts)})")
    bad_shape = [f"{n} {tuple(state[n].shape)} vs {tuple(ref[n].shape)}" for n in sorted(state)
                 if tuple(state[n].shape) != tuple(ref[n].shape)]
    if bad_shape:
        raise ArtifactError(f"{src}: shapes differ from model {model_name!r}: {_shorten(bad_shape, 4)}")
    state = {n: v.to(ref[n].dtype) for n, v in state.items()}
    n_official = len(state)
    filled = sorted(n for n in fillable if n not in state)
    for mod in {id(fillable[n]): fillable[n] for n in filled}.values():
        mod.fill_edgeseg_only_buffers()
    if filled:
        now = model.state_dict()
        state.update({n: now[n] for n in filled})
    model.load_state_dict(state, strict=True)
    model.eval()
    spec = ModelSpec(model=model_name, num_classes=k, class_names=names, palette=palette, ignore_index=ignore,
                     input_hw=tuple(input_hw),
                     provenance={"imported_from": str(src), "family": family, "sha256": sha256_file(src),
                                 "classes": classes, "dropped_keys": dropped, "filled_keys": filled})
    save_checkpoint(out, model, spec, force=force)
    return {"out": str(out), "model": model_name, "num_classes": k, "classes": classes,
            "keys_loaded": n_official, "dropped_keys": dropped, "filled_keys": filled,
            "input_hw": list(input_hw)}


def run(args) -> int:
    from edgeseg.cli_args import parse_hw
    from edgeseg.fileio import write_json
    from edgeseg.outputs import Output, check_outputs

    check_outputs(args.force, [Output("--out", args.out, "dir"), Output("--json", args.json)],
                  [("SRC", args.src), ("--classes", args.classes)])
    res = import_checkpoint(args.family, args.src, args.model, args.out, args.classes,
                            parse_hw(args.input_size, "--input-size", multiple_of=32), args.force)
    print(f"imported {args.src} -> {res['out']}")
    print(f"  model {res['model']}, {res['num_classes']} classes ({res['classes']}), {res['keys_loaded']} tensors "
          f"loaded strictly, input {res['input_hw'][0]}x{res['input_hw'][1]}")
    if res["dropped_keys"]:
        print(f"  dropped non-model entries: {', '.join(res['dropped_keys'])}")
    if res["filled_keys"]:
        print(f"  filled edgeseg-only buffers (absent from official checkpoints): {', '.join(res['filled_keys'])}")
    if args.json:
        write_json(args.json, res)
    return 0
