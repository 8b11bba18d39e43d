"""ONNX Runtime target package (profile export_targets/onnx.toml).

A target package holds everything specific to one runtime; generic code (edgeseg.export, edgeseg.runtime,
edgeseg.targets) names none. Parts:
  exporter.py: torch.onnx.export (dynamo) at static shapes; int8 as QDQ
  quantize.py: ONNX Runtime's quantize_static with edgeseg's float policy and calibration
  session.py: the ONNX Runtime session (also runs jetson-tensorrt's ONNX here), its per-op profiler and device-kit runner
"""

from edgeseg.targets import Flow

# int8 agreement of tiny_ops measured on an Intel Xeon (AVX-512, VNNI, AMX): 0.992; the floor is that minus 0.08,
# as ONNX Runtime's weights are 7-bit (reduce_range) on AVX2 CPUs without VNNI
FLOW = Flow(extra=None, contract_models=None, int8={"tiny_ops": 0.91}, quiet={"fp32": (), "int8": ()},
            device_kit=(("fp32", {}), ("int8", {}),
                        ("fp32", {"input_dtype": "uint8", "input_layout": "NHWC", "output": "argmax"})))
