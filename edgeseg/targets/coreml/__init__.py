"""Core ML target package (profile export_targets/coreml.toml). Core ML cannot execute on Linux: here an
artifact is converted and inspected; the macOS path is real.

A target package holds everything specific to one runtime; generic code (edgeseg.export, edgeseg.runtime,
edgeseg.targets) names none. Parts:
  exporter.py: ct.convert of the exported program to an ML program (.mlpackage) at fp32, fp16, int8
  lowering.py: lowerings of ops coremltools has no converter for
  quantize.py: Core ML's PT2E quantizer (w8a8) and weight-only int8
  session.py: the Core ML session (macOS), its Swift snippet and device-kit runner
"""
