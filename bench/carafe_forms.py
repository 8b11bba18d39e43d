"""FreqFusion's CARAFE export forms side by side on ONNX Runtime, OpenVINO and ExecuTorch (XNNPACK): one call
exported alone per form (edgeseg.models.carafe.CARAFE_FORMS), checked against mmcv's definition, timed interleaved
in one run. The profiles' `[export_form] carafe` comes from this table (export_targets/*.toml).

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
    ap.add_argument("--runtimes", default="onnxruntime,openvino,executorch",
                    help="comma list of onnxruntime, openvino, executorch, litert (default %(default)s)")
    args = ap.parse_args(argv)
    want = set(args.runtimes.split(","))
    unknown = want - {"onnxruntime", "openvino", "executorch", "litert"}
    if unknown:
        ap.error(f"--runtimes: unknown {', '.join(sorted(unknown))}")

    from edgeseg.cpu import host_cpu

    h, w = (int(v) for v in args.hw.lower().split("x"))
    k, s = args.kernel, args.scale
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.channels, h, w, generator=g)
    mask = torch.randn(1, k * k, h * s, w * s, generator=g).softmax(1)
    ref = carafe_reference(x, mask, k, s).numpy()
    feed = {"x": x.numpy(), "m": mask.numpy()}
    runners, errors, off = {}, {}, {}
    with tempfile.TemporaryDirectory() as d:
        for form in CARAFE_FORMS:
            path = Path(d) / f"{form}.onnx"
            if want & {"onnxruntime", "openvino"}:  # OpenVINO reads the same ONNX file
                torch.onnx.export(Call(form, (h, w), k, s), (x, mask), str(path), dynamo=True, opset_version=18,
                                  input_names=["x", "m"], verbose=False)
            if "onnxruntime" in want:
                import onnxruntime as ort

                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                errors[("onnxruntime", form)] = float(np.abs(sess.run(None, feed)[0] - ref).max())
                runners[("onnxruntime", form)] = lambda sess=sess: sess.run(None, feed)
            if "openvino" in want:
                import openvino as ov

                req = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                           "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
                errors[("openvino f32", form)] = float(np.abs(req.infer(feed)[0] - ref).max())
                runners[("openvino f32", form)] = lambda req=req: req.infer(feed)
            if "executorch" in want:
                method, ops = _executorch_method(Call(form, (h, w), k, s), x, mask, args.threads)
                errors[("executorch", form)] = float(np.abs(method.execute([x, mask])[0].numpy() - ref).max())
                runners[("executorch", form)] = lambda method=method: method.execute([x, mask])
                off[form] = ops
            if "litert" in want:
                run = _litert_runner(Call(form, (h, w), k, s), x, mask, args.threads)
                errors[("litert", form)] = float(np.abs(run() - ref).max())
                runners[("litert", form)] = run
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
        print(f"{rt:14s} {form:14s} {np.median(t):8.2f}  {errors[(rt, form)]:.1e}")
    for form, ops in off.items():
        print(f"executorch {form}: ops outside XNNPACK (portable kernels): {', '.join(ops) or 'none'}")
    return 0


def _executorch_method(module: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, threads: int):
    """The call lowered like edgeseg's ExecuTorch exporter does (XNNPACK partitioner), loaded from memory; also the
    ops left on portable kernels."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from edgeseg.targets.executorch.session import set_threads

    ep = torch.export.export(module.eval(), (x, mask))
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    ops = sorted({str(n.target).split(".")[-2] if "." in str(n.target) else str(n.target)
                  for n in edge.exported_program().graph.nodes
                  if n.op == "call_function" and "executorch_call_delegate" not in str(n.target)
                  and "getitem" not in str(n.target)})
    buf = edge.to_executorch().buffer
    set_threads(threads)
    _KEEP.append(buf)  # the loaded program reads this buffer: it must outlive the method
    return Runtime.get().load_program(buf).load_method("forward"), ops


_KEEP: list = []


def _litert_runner(module: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, threads: int):
    """The call through litert_torch.convert (as edgeseg's LiteRT exporter converts), run by the LiteRT Interpreter
    (default XNNPACK delegate) with `threads` threads; returns a function that runs it once."""
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    with tempfile.TemporaryDirectory() as d:
        litert_torch.convert(module.eval(), (x, mask)).export(f"{d}/m.tflite")
        data = Path(f"{d}/m.tflite").read_bytes()
    _KEEP.append(data)
    interp = Interpreter(model_content=data, num_threads=threads)
    interp.allocate_tensors()
    ins = sorted(interp.get_input_details(), key=lambda d: d["index"])
    out = interp.get_output_details()[0]["index"]

    def run():
        interp.set_tensor(ins[0]["index"], x.numpy())
        interp.set_tensor(ins[1]["index"], mask.numpy())
        interp.invoke()
        return interp.get_tensor(out)
    return run


if __name__ == "__main__":
    sys.exit(main())
