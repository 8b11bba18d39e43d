"""OpenVINO target package (profile export_targets/openvino.toml).

A target package holds everything specific to one runtime; generic code (edgeseg.export, edgeseg.runtime,
edgeseg.targets) names none. Parts:
  exporter.py: ov.convert_model of the exported program; fp16 weights; int8 through NNCF or a QAT graph
  quantize.py: NNCF post-training quantization with edgeseg's float policy
  inspection.py: what the IR holds (precisions, FakeQuantize nodes, the float islands)
  session.py: the OpenVINO session (inference precision from the CPU's flags), profiler and device-kit runner
"""

from edgeseg.targets import Flow

FLOW = Flow(extra="openvino", contract_models=(),
            contract_note="tests/test_export_openvino.py runs the fp32 round trip of every variant, with the "
                          "inference-precision settings only OpenVINO has",
            quiet={"fp32": (), "int8": ()}, vendor_says="not found in decomp table")
