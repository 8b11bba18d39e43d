"""Jetson TensorRT target package (profile export_targets/jetson-tensorrt.toml).

A target package holds everything specific to one runtime; generic code (edgeseg.export, edgeseg.runtime,
edgeseg.targets) names none. Parts:
  exporter.py: a TensorRT-friendly ONNX (symmetric int8 QDQ), the trtexec command and an on-device script;
  run here through the onnx package's session (the profile's runtime = "onnx")
"""
# The artifact is an ONNX file: the exporter reuses the onnx package's export and QDQ quantization. The only
# import between target packages, declared here and checked by tests/test_structure.py.
BUILDS_ON = ("onnx",)

from edgeseg.targets import Flow

FLOW = Flow(extra=None, contract_models=(),
            contract_note="the engine is built on the Jetson; tests/test_export.py checks the ONNX, its QDQ and the "
                          "ONNX Runtime run here")
