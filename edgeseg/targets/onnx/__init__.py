"""ONNX Runtime target package (profile export_targets/onnx.toml).

A target package holds everything specific to one runtime; generic code (edgeseg.export, edgeseg.runtime,
edgeseg.targets) names none. Parts:
  exporter.py: torch.onnx.export (dynamo) at static shapes; int8 as QDQ
  quantize.py: ONNX Runtime's quantize_static with edgeseg's float policy and calibration
  session.py: the ONNX Runtime session (also runs jetson-tensorrt's ONNX here), its per-op profiler and device-kit runner
"""

from edgeseg.targets import Flow

FLOW = Flow(extra=None, contract_models=None, quiet={"fp32": (), "int8": ()})
