"""LiteRT (TensorFlow Lite) target package (profile export_targets/litert.toml), for Android phones.

A target package holds everything specific to one runtime; generic code (edgeseg.export, edgeseg.runtime,
edgeseg.targets) names none. Parts:
  exporter.py: litert_torch.convert at the static export size; int8 full-integer through ai-edge-quantizer
  quantize.py: the calibrated full-integer quantization
  inspection.py: op histogram, XNNPACK partitions and the ops left off XNNPACK
  session.py: the LiteRT Interpreter (XNNPACK delegate, pinned threads), profiler and device-kit runner
"""

from edgeseg.targets import Flow

FLOW = Flow(extra="litert", contract_models=(),
            contract_note="tests/test_export_litert.py runs the fp32 and int8 round trips with LiteRT's own checks "
                          "(XNNPACK partitions, int8 tensors)",
            quiet={"fp32": (), "int8": ()})
