"""The device kit of an artifact folder, written by `export_checkpoint` before the folder is published: what an
engineer copies to the device and reads there.

- `README.md`: the input (tensor name, shape, dtype, layout, resize and normalisation), the output (kind, shape,
  stride, how to turn it into a class map), the classes and palette, how the artifact was quantized and validated,
  and the CPU it was checked on.
- `run_<runtime>.py`: segments images with the artifact's runtime, numpy and Pillow only (no edgeseg, no torch
  unless the runtime itself needs it), reading every constant from `manifest.json` beside it; `--self-test`
  reproduces the export's check on `expected/`. The script is this module's `_SCRIPT` around the runtime module's
  `RUN_SCRIPT` (a `Runner`: load, then run one input batch), so it is generic per runtime, not per model.
  A runtime module may add `run_script_settings(manifest) -> dict` (how its session runs this artifact, baked into
  the script as `SETTINGS`) and `EXTRA_FILES` ({name: text}, e.g. Core ML's Swift snippet).
- `expected/`: a few images at the input size and the class maps edgeseg's own session of the artifact produced
  for them (eager PyTorch's where the runtime cannot run on the exporting host), with `expected.json`.

Every kit file is listed in the manifest's `device_kit.files` and hashed in `device_kit.sha256`, which
`verify_manifest` checks like the model's files; the manifest's `files` and `sha256` stay the model's (what a runtime
loads, and the artifact's size).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.errors import ArtifactError, EdgesegError, one_line
from edgeseg.targets import session_module

log = logging.getLogger(__name__)

README = "README.md"
EXPECTED = "expected"
EXPECTED_JSON = "expected.json"
KIT_IMAGES = 3  # images in expected/ (at the input size: ~0.3 MB each at 384x480)
SELF_TEST_MIN_AGREEMENT = 0.999  # the script's class maps vs edgeseg's session's, on the same host


def script_name(runtime: str) -> str:
    return f"run_{runtime}.py"


def write_device_kit(out_dir: Path, manifest, wrapper, runtime: str) -> dict[str, Any]:
    """Write README.md, the run script (where the runtime has one), its extra files and expected/ into `out_dir`
    (the export's temporary folder; its manifest.json already written, so the runtime can open it).

    Returns:
        The manifest's `device_kit` record: {runtime, script (None without one), files (relative paths), cpu,
        self_test: {made_by, min_agreement, agreement_with_eager}}.
    """
    from edgeseg.cpu import host_cpu
    from edgeseg.fileio import sha256_file

    out_dir = Path(out_dir)
    mod = session_module(runtime)
    files: list[str] = []
    expected = _write_expected(out_dir, manifest, wrapper)
    files += expected.pop("files")
    snippet = getattr(mod, "RUN_SCRIPT", None)
    script = None
    if snippet:
        settings = mod.run_script_settings(manifest) if hasattr(mod, "run_script_settings") else {}
        script = script_name(runtime)
        _write(out_dir / script, render_script(snippet, settings, script))
        files.append(script)
    for name, text in (getattr(mod, "EXTRA_FILES", None) or {}).items():
        _write(out_dir / name, text)
        files.append(name)
    kit = {"runtime": runtime, "script": script, "files": [], "sha256": {}, "cpu": host_cpu().summary(),
           "self_test": expected}
    _write(out_dir / README, render_readme(manifest, kit, files + [README]))
    kit["files"] = [README] + files
    kit["sha256"] = {f: sha256_file(out_dir / f) for f in kit["files"]}
    return kit


def render_script(snippet: str, settings: dict[str, Any], name: str) -> str:
    """The run script: `_SCRIPT` around a runtime's `RUN_SCRIPT`, its `SETTINGS` baked in."""
    return _SCRIPT.replace("@NAME@", name).replace("@SETTINGS@", repr(dict(settings))).replace(
        "@RUNNER@", snippet.strip("\n"))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------------------------------------- expected/
def _write_expected(out_dir: Path, manifest, wrapper) -> dict[str, Any]:
    """expected/: KIT_IMAGES default images (edgeseg.quant.calibration.default_images) at the input size, the class
    maps edgeseg's session of the artifact gives them (`Session.segment`) or, where it cannot run here, eager
    PyTorch's, and expected.json. Returns the self-test record plus `files`."""
    import torch
    import torch.nn.functional as F

    from edgeseg.quant.calibration import default_images, resize_image

    imgs, _, source = default_images(KIT_IMAGES)
    imgs = [resize_image(im, wrapper.input_hw) for im in imgs]
    eager = []
    for im in imgs:
        with torch.no_grad():
            y = wrapper(wrapper.make_input(im))
        if wrapper.output == "argmax":
            eager.append(y[0].numpy().astype(np.uint8))
        else:
            up = F.interpolate(y.float(), size=im.shape[:2], mode="bilinear", align_corners=False)
            eager.append(up[0].argmax(0).numpy().astype(np.uint8))
    maps, made_by, threads = _session_maps(out_dir, manifest, imgs)
    floor = SELF_TEST_MIN_AGREEMENT
    if maps is None:
        maps, floor = eager, None
    items, files = [], []
    for i, (im, cmap, ref) in enumerate(zip(imgs, maps, eager)):
        image, classes = f"image_{i}.png", f"classes_{i}.png"
        _save_png(out_dir / EXPECTED / image, im)
        _save_png(out_dir / EXPECTED / classes, cmap, manifest.palette)
        items.append({"image": image, "classes": classes,
                      "agreement_with_eager": round(float((cmap == ref).mean()), 6)})
        files += [f"{EXPECTED}/{image}", f"{EXPECTED}/{classes}"]
    record = {"source": source, "made_by": made_by, "threads": threads, "min_agreement": floor,
              "images": items}
    _write(out_dir / EXPECTED / EXPECTED_JSON, json.dumps(record, indent=2) + "\n")
    files.append(f"{EXPECTED}/{EXPECTED_JSON}")
    agreement = float(np.mean([it["agreement_with_eager"] for it in items]))
    return {"made_by": made_by, "min_agreement": floor, "agreement_with_eager": round(agreement, 6),
            "files": files}


def _session_maps(out_dir: Path, manifest, imgs: list[np.ndarray]):
    """(class maps, who made them, threads) from edgeseg's session of the artifact; (None, why, None) where the
    runtime cannot run it here (a runtime that fails on an artifact the proof ran is an error)."""
    from edgeseg.runtime import open_session

    threads = int((manifest.options or {}).get("num_threads") or 1)
    try:
        with open_session(out_dir, num_threads=threads) as sess:
            if not sess.executes_here:
                return None, f"eager PyTorch ({sess.why_not_here})", None
            maps = [sess.segment(im) for im in imgs]
            return maps, (f"edgeseg's {manifest.target} session ({type(sess).__name__}, {threads} thread"
                          f"{'s' if threads != 1 else ''})"), threads
    except (EdgesegError, ImportError, OSError) as e:
        if manifest.executed_here:
            raise ArtifactError(f"{out_dir}: the device kit's class maps: the session failed after the proof "
                                f"passed ({one_line(e, with_type=True)})") from e
        return None, f"eager PyTorch (the runtime did not run here: {one_line(e)})", None


def _save_png(path: Path, array: np.ndarray, palette=None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        im.putpalette([int(v) for c in list(palette)[:256] for v in list(c)[:3]])
    im.save(path, format="PNG")


# ------------------------------------------------------------------------------------------------- README.md
def render_readme(manifest, kit: dict[str, Any], files: list[str]) -> str:
    """README.md of the artifact folder, from its manifest and kit record."""
    m = manifest
    inp, out = m.input, m.output
    h, w = m.input_hw
    script = kit["script"]
    versions = m.tool_versions or {}
    snippet = getattr(session_module(kit['runtime']), "RUN_SCRIPT", None) or ""
    runtime = _snippet_constant(snippet, "RUNTIME", kit["runtime"])
    pkgs = _packages(snippet, versions)
    L: list[str] = [f"# {m.model}: {m.target} artifact ({m.precision})", "",
                    f"`{m.model_file}` for {runtime}" + (f" ({', '.join(pkgs)})" if pkgs else "")
                    + f", exported by edgeseg {versions.get('edgeseg', '?')} "
                    f"({', '.join(f'{k} {v}' for k, v in versions.items() if k != 'edgeseg')}). Every number below "
                    "comes from `manifest.json`.", ""]
    L += ["## Run it", ""]
    if script:
        L += ["```sh", f"pip install numpy pillow {' '.join(pkgs)}",
              f"python {script} IMAGE... [--threads N] [--out DIR]   # class maps as indexed PNGs, latency per image",
              f"python {script} --self-test                          # reproduce the export's check on expected/",
              "```", "",
              f"`{script}` needs only its runtime, numpy and Pillow (no edgeseg) and reads every constant from "
              "`manifest.json`; it checks the model files against their sha256 before loading them."]
        extra = [n for n in files if n not in (script, README) and not n.startswith(EXPECTED + "/")]
        if extra:
            L += [f"For an app: {', '.join(f'`{n}`' for n in extra)} (the same steps, in that language)."]
    else:
        L += [f"No run script for {runtime} yet: feed the input below to `{m.model_file}` and decode the "
              "output as described."]
    L += ["", "## Input", "",
          f"- tensor `{inp['name']}`: {inp['dtype']}, shape {inp['shape']}, layout {inp['layout']} (RGB channel "
          "order), batch 1",
          f"- resize the RGB image to {h}x{w} (height x width), bilinear with half-pixel centres and no antialiasing "
          "(OpenCV's INTER_LINEAR)"]
    if inp["dtype"] == "uint8":
        L += [f"- feed the 0..255 pixels as uint8: the graph normalises them, (x - mean) / std with mean {m.mean} "
              f"and std {m.std}"]
    else:
        L += [f"- normalise on the 0..255 scale: (x - mean) / std with mean {m.mean}, std {m.std}, then {inp['dtype']}"]
    L += ["", "## Output", ""]
    if out["kind"] == "argmax":
        L += [f"- tensor `{out['name']}`: {out['dtype']}, shape {out['shape']}: the class index of each pixel at the "
              "input size (the graph upsamples the logits bilinearly and takes the argmax)",
              "- to the image's size: nearest-neighbour resize"]
    else:
        L += [f"- tensor `{out['name']}`: {out['dtype']}, shape {out['shape']}: class logits at stride "
              f"{out.get('stride')}",
              "- class map: upsample the logits bilinearly (half-pixel centres, align_corners=False) to the image's "
              "size, then argmax over the class axis"]
    L += ["", "## Classes", "", "| index | class | colour (RGB) |", "|---|---|---|"]
    pal = list(m.palette or [])
    for i, name in enumerate(m.class_names):
        L += [f"| {i} | {name} | {tuple(pal[i]) if i < len(pal) else '-'} |"]
    L += ["", f"Label value {m.ignore_index} means \"ignore\" in ground truth; the model never outputs it. The run "
          "script writes indexed PNGs with this palette.", "", "## Quantization", ""]
    L += _quantization_lines(m)
    L += ["", "## Validation", ""]
    proof = m.proof if isinstance(m.proof, dict) else None
    if proof:
        diff = proof.get("max_abs_logit_diff")
        L += [f"- proof at export: the artifact in {runtime} vs eager PyTorch on {proof.get('images')} images "
              f"({proof.get('source')}): argmax agreement {proof.get('argmax_agreement', 0):.4%}"
              + ("" if diff is None else f", max |logit difference| {diff:.3g}")
              + f", float parts computed in {proof.get('float_compute', 'fp32')}"]
    else:
        L += [f"- not run at export: {m.not_executed_reason or 'the runtime is not on the exporting host'}"]
    st = kit["self_test"]
    n = sum(1 for f in files if f.startswith(f"{EXPECTED}/classes_"))
    L += [f"- `{EXPECTED}/`: {n} images at the input size and the class maps made by {st['made_by']}; they agree "
          f"with eager PyTorch on {st['agreement_with_eager']:.4%} of pixels."]
    if script:
        L += [f"  `python {script} --self-test` recomputes them "
              + (f"and passes at >= {st['min_agreement']:.1%} agreement (the same artifact and runtime on the same "
                 "kind of CPU; another CPU may round differently, int8 most)" if st["min_agreement"] is not None
                 else "and reports the agreement (no pass mark: the runtime did not run at export)") + "."]
    L += ["- `edgeseg validate` measures mIoU and agreement on a dataset; `edgeseg bench` times it "
          "(threads pinned, CPU recorded).", "", "## Host", "",
          f"Exported and checked on {kit['cpu']} ({m.host.get('system')} {m.host.get('machine')}), "
          f"{(m.options or {}).get('num_threads', 1)} thread(s)"
          + (f"; the proof took {proof['seconds']} s" if proof and proof.get("seconds") is not None else "")
          + ". Latency depends on the device: the run script prints it per image.", "", "## Files", ""]
    L += [f"- `{f}`" + (": the model" if f == m.model_file else "") for f in m.files]
    L += ["- `manifest.json`: everything above, and the sha256 of every file"]
    L += [f"- `{f}`" for f in files if not f.startswith(EXPECTED + "/")]
    L += [f"- `{EXPECTED}/`: the self-test's images and class maps"]
    return "\n".join(L) + "\n"


def _snippet_constant(snippet: str, name: str, default: Any) -> Any:
    """The literal value of a `NAME = ...` line of a RUN_SCRIPT (its RUNTIME label, its PACKAGES)."""
    import ast

    for line in snippet.splitlines():
        if line.startswith(f"{name} ="):
            return ast.literal_eval(line.split("=", 1)[1].split("#")[0].strip())
    return default


def runtime_packages(runtime: str) -> list[str]:
    """The pip distributions a device needs to run a runtime package's artifacts (its RUN_SCRIPT's PACKAGES,
    unpinned; numpy and Pillow besides); [] for a runtime without a run script."""
    from edgeseg.targets import session_module

    return list(_snippet_constant(getattr(session_module(runtime), "RUN_SCRIPT", "") or "", "PACKAGES", []))


def _packages(snippet: str, versions: dict[str, str]) -> list[str]:
    """The runtime's pip distributions (RUN_SCRIPT's PACKAGES), pinned to the versions the export recorded."""
    return [f"{p}=={versions[p].split('+')[0]}" if versions.get(p) else p
            for p in _snippet_constant(snippet, "PACKAGES", [])]


def _quantization_lines(m) -> list[str]:
    q = m.quantization or {}
    if m.precision == "fp32" and not q:
        return ["None: fp32 weights and activations."]
    lines = []
    for k, v in q.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            lines.append(f"- {k}: {v}")
        elif isinstance(v, (list, tuple)) and len(v) <= 8 and all(isinstance(x, (str, int, float)) for x in v):
            lines.append(f"- {k}: {', '.join(map(str, v))}")
    cal = m.calibration if isinstance(m.calibration, dict) else None
    if cal:
        lines.append(f"- calibration: {cal.get('count', cal.get('images', '?'))} images from {cal.get('source', '?')}")
    return lines or [f"{m.precision} ({json.dumps(q)[:200]})"]


# --------------------------------------------------------------------------------------------- run_<rt>.py
# The run script around a runtime's `Runner` (@RUNNER@). Python 3.8+, numpy, Pillow for image files, the runtime.
_SCRIPT = '''#!/usr/bin/env python3
"""Segment images with this edgeseg artifact: needs only its runtime, numpy and Pillow (no edgeseg).

  python @NAME@ IMAGE... [--threads N] [--out DIR]   class maps as indexed PNGs (the palette of manifest.json)
  python @NAME@ --self-test [--threads N]            reproduce the export's check on expected/

Every constant (input size, dtype, layout, mean/std, output kind, classes, palette) comes from manifest.json
beside this script; README.md says the same in words. Exit status: 0 ok, 1 self-test below its pass mark, 2 error.
"""
import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SETTINGS = @SETTINGS@  # how edgeseg's own session runs this artifact

@RUNNER@


# -- preprocessing and decoding: exactly what edgeseg's Session.segment does --------------------------------------
def _lerp(a, axis, n_out):
    """Bilinear resampling of `a` along `axis` to n_out samples (half-pixel centres, no antialiasing: OpenCV's
    INTER_LINEAR and torch's interpolate(align_corners=False))."""
    n_in = a.shape[axis]
    if n_in == n_out:
        return a
    src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    shape = [1] * a.ndim
    shape[axis] = n_out
    t = (src - i0).astype(np.float32).reshape(shape)
    return np.take(a, i0, axis) * (1 - t) + np.take(a, i1, axis) * t


def to_input(image, manifest):
    """RGB uint8 (H,W,3) -> the model's input batch of one, as manifest.json's `input` says."""
    h, w = manifest["input_hw"]
    inp = manifest["input"]
    small = image
    if image.shape[:2] != (h, w):
        small = _lerp(_lerp(image.astype(np.float32), 0, h), 1, w)
        small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    if inp["dtype"] == "uint8":  # the graph normalises
        x = small[None]
    else:
        mean = np.asarray(manifest["mean"], np.float32)
        std = np.asarray(manifest["std"], np.float32)
        x = ((small.astype(np.float32) - mean) / std)[None]
    if inp["layout"] == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    dtypes = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}
    return np.ascontiguousarray(x, dtype=dtypes[inp["dtype"]])


def to_classes(y, manifest, h, w):
    """The model's output -> (h, w) uint8 class map: logits upsampled bilinearly then argmax; an argmax output
    resized nearest."""
    y = np.asarray(y)[0]
    if manifest["output"]["kind"] == "argmax":
        rows = np.minimum((np.arange(h) * (y.shape[0] / h)).astype(np.int64), y.shape[0] - 1)
        cols = np.minimum((np.arange(w) * (y.shape[1] / w)).astype(np.int64), y.shape[1] - 1)
        return np.ascontiguousarray(y.astype(np.uint8)[rows][:, cols])
    up = _lerp(_lerp(y.astype(np.float32), 1, h), 2, w)
    return up.argmax(0).astype(np.uint8)


def read_rgb(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_classes(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def save_classes(cmap, palette, path):
    from PIL import Image

    im = Image.frombytes("P", (cmap.shape[1], cmap.shape[0]), np.ascontiguousarray(cmap, np.uint8).tobytes())
    im.putpalette([int(v) for c in palette[:256] for v in c[:3]])
    im.save(path, format="PNG")


def check_files(manifest):
    """The model's files against manifest.json's sha256."""
    for rel, digest in manifest["sha256"].items():
        if hashlib.sha256((HERE / rel).read_bytes()).hexdigest() != digest:
            raise ValueError(f"{HERE / rel}: sha256 does not match manifest.json (file changed or corrupted)")


def segment(runner, manifest, image):
    """(class map at the image's size, model latency in ms)."""
    x = to_input(image, manifest)
    t0 = time.perf_counter()
    y = runner(x)
    ms = (time.perf_counter() - t0) * 1000
    return to_classes(y, manifest, *image.shape[:2]), ms


def self_test(runner, manifest, min_agreement):
    exp_dir = HERE / "expected"
    exp = json.loads((exp_dir / "expected.json").read_text())
    floor = exp.get("min_agreement") if min_agreement is None else min_agreement
    agree = total = 0
    rows = []
    for item in exp["images"]:
        got, ms = segment(runner, manifest, read_rgb(exp_dir / item["image"]))
        want = read_classes(exp_dir / item["classes"])
        if got.shape != want.shape:
            raise ValueError(f"{exp_dir / item['classes']}: shape {want.shape}, the script made {got.shape}")
        same = int((got == want).sum())
        agree, total = agree + same, total + want.size
        rows.append({"image": item["image"], "agreement": same / want.size, "ms": round(ms, 3)})
        print(f"{item['image']}: {same / want.size:.4%} of pixels as expected/{item['classes']} ({ms:.1f} ms)")
    overall = agree / max(total, 1)
    ok = floor is None or overall >= floor
    proof = manifest.get("proof") or {}
    print(f"self-test: {overall:.4%} agreement with {exp['made_by']} on {len(rows)} images"
          + ("" if floor is None else f" (pass mark {floor:.2%})")
          + (f"; the export's proof: {proof['argmax_agreement']:.4%} vs eager PyTorch" if proof else "")
          + (": PASS" if ok and floor is not None else ": FAIL" if not ok else " (no pass mark)"))
    return {"agreement": overall, "min_agreement": floor, "passed": ok, "images": rows}


def main(argv=None):
    manifest = json.loads((HERE / "manifest.json").read_text())
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="*", help="image files (anything Pillow reads)")
    ap.add_argument("--threads", type=int, default=int((manifest.get("options") or {}).get("num_threads") or 1),
                    help="CPU threads for the runtime (default: the export's, %(default)s)")
    ap.add_argument("--out", default="segmentation", help="folder for the class maps (default %(default)s)")
    ap.add_argument("--self-test", action="store_true", help="compare with expected/ (made at export)")
    ap.add_argument("--min-agreement", type=float, help="the self-test's pass mark (default: expected.json's)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before the first image (default 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON summary line at the end")
    args = ap.parse_args(argv)
    if not args.images and not args.self_test:
        ap.error("give images to segment, or --self-test")
    check_files(manifest)
    runner = Runner(HERE, manifest, max(1, args.threads))
    warm = to_input(np.zeros((*manifest["input_hw"], 3), np.uint8), manifest)
    for _ in range(args.warmup):
        runner(warm)
    summary = {"runtime": RUNTIME, "threads": args.threads}
    status = 0
    if args.self_test:
        summary["self_test"] = self_test(runner, manifest, args.min_agreement)
        status = 0 if summary["self_test"]["passed"] else 1
    if args.images:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.images:
            cmap, ms = segment(runner, manifest, read_rgb(name))
            dst = out / (Path(name).stem + ".png")
            save_classes(cmap, manifest["palette"], dst)
            rows.append({"image": str(name), "out": str(dst), "ms": round(ms, 3)})
            print(f"{name}: {ms:.1f} ms ({RUNTIME}, {args.threads} thread{'s' if args.threads != 1 else ''}) -> {dst}")
        summary["images"] = rows
    if args.json:
        print(json.dumps(summary))
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ImportError as e:
        print(f"{Path(__file__).name}: error: {e} (pip install numpy pillow {' '.join(PACKAGES)}; README.md has "
              "the versions)", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # one line, whatever the runtime raised
        print(f"{Path(__file__).name}: error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}",
              file=sys.stderr)
        sys.exit(2)
'''
