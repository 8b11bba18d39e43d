"""FreqFusion's CARAFE export forms side by side on ONNX Runtime and OpenVINO: one call exported alone per form
(edgeseg.models.carafe.CARAFE_FORMS), checked against mmcv's definition, timed interleaved in one run. The
profiles' `[export_form] carafe` comes from this table (export_targets/onnx.toml, openvino.toml).

    .venv/bin/python bench/carafe_forms.py                          # offseg_t's largest call at 384x480
    .venv/bin/python bench/carafe_forms.py --channels 64 --hw 96x120 --kernel 3 --scale 1 --threads 2

Prints p50 ms per runtime x form and the max |difference| from `carafe_reference`; the CPU is named.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeseg.models.carafe import (CARAFE_FORMS, carafe_export, carafe_export_channels_last,  # noqa: E402
                                   carafe_export_gather, carafe_reference, gather_index, unfold_kernel)


class Call(torch.nn.Module):
    """One CARAFE call in export form `form`, with the constants its model would bake."""

    def __init__(self, form: str, hw: tuple[int, int], kernel: int, scale: int):
        super().__init__()
        self.form, self.kernel, self.scale = form, kernel, scale
        self.register_buffer("unfold", unfold_kernel(kernel))
        self.register_buffer("index", gather_index(*hw, kernel))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.form == "channels_last":
            return carafe_export_channels_last(x, mask, self.kernel, self.scale)
        if self.form == "gather":
            return carafe_export_gather(x, mask, self.kernel, self.scale, self.index)
        return carafe_export(x, mask, self.kernel, self.scale, self.unfold)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=224)
    ap.add_argument("--hw", default="48x60", help="source size HxW (default %(default)s)")
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import openvino as ov

    from edgeseg.cpu import host_cpu

    h, w = (int(v) for v in args.hw.lower().split("x"))
    k, s = args.kernel, args.scale
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.channels, h, w, generator=g)
    mask = torch.randn(1, k * k, h * s, w * s, generator=g).softmax(1)
    ref = carafe_reference(x, mask, k, s).numpy()
    feed = {"x": x.numpy(), "m": mask.numpy()}
    runners, errors = {}, {}
    core = ov.Core()
    with tempfile.TemporaryDirectory() as d:
        for form in CARAFE_FORMS:
            path = Path(d) / f"{form}.onnx"
            torch.onnx.export(Call(form, (h, w), k, s), (x, mask), str(path), dynamo=True, opset_version=18,
                              input_names=["x", "m"], verbose=False)
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            errors[form] = float(np.abs(sess.run(None, feed)[0] - ref).max())
            runners[("onnxruntime", form)] = lambda sess=sess: sess.run(None, feed)
            req = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                       "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
            runners[("openvino f32", form)] = lambda req=req: req.infer(feed)
    for run in runners.values():
        run()
    times = {key: [] for key in runners}
    keys = list(runners)
    for r in range(args.runs):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # round-robin, starting one further each run
            t = time.perf_counter()
            runners[key]()
            times[key].append((time.perf_counter() - t) * 1e3)
    print(f"CARAFE {args.channels} ch, {h}x{w} -> {h * s}x{w * s}, k={k}; {args.threads} thread(s), {args.runs} "
          f"runs interleaved; CPU: {host_cpu().model}")
    print(f"{'runtime':14s} {'form':14s} {'p50 ms':>8s}  max |diff| vs reference")
    for (rt, form), t in times.items():
        print(f"{rt:14s} {form:14s} {np.median(t):8.2f}  {errors[form]:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
