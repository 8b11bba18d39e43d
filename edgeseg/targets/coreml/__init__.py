"""Core ML target package (profile export_targets/coreml.toml). Core ML cannot execute on Linux: here an
artifact is converted and inspected; the macOS path is real.

A target package holds everything specific to one runtime; generic code (edgeseg.export, edgeseg.runtime,
edgeseg.targets) names none. Parts:
  exporter.py: ct.convert of the exported program to an ML program (.mlpackage) at fp32, fp16, int8
  lowering.py: lowerings of ops coremltools has no converter for
  quantize.py: Core ML's PT2E quantizer (w8a8) and weight-only int8
  session.py: the Core ML session (macOS), its Swift snippet and device-kit runner
"""

from edgeseg.targets import Flow

FLOW = Flow(extra="coreml", contract_models=(),
            contract_note="Core ML cannot execute on Linux: tests/test_export_coreml.py converts every variant and "
                          "inspects the program",
            # int8 weight-only: the W8A8 calibration flow takes minutes on 2 cores (test_export_coreml covers it)
            quiet={"fp32": (), "int8": ("--option", 'int8_mode="weights"')}, vendor_says="Removing op")
